"""Ray Serve: the decomposer and the solver as two autoscaled deployments behind one ingress.

    serve run serve/config.yaml                       # or: serve deploy serve/config.yaml
    python serve/app.py --decomposer DIR --solver DIR # local, binds 127.0.0.1:8000

`StudentModel` serves one exported student (a plain HF dir) and batches concurrent `generate`
calls into one left-padded `model.generate` (greedily, `serve/batching.py`, not `@serve.batch`).
`Decomposer` and `Solver` are two deployments of it, each with its own replicas, autoscaling and
resources, because the solver is called once per sub-question and so takes several times the
decomposer's load. `Ingress` holds no model: it runs `socratic.solve.solving_loop` through the
two handles and scales on its own. It bounds problem size and steps, answers bad input with a
4xx that says what is wrong, and sheds load with 503 (`max_ongoing_requests` /
`max_queued_requests`) instead of queueing without end.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class on
# the ingress methods, not a string it cannot resolve inside Serve's wrapped class.
import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python serve/app.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batching import GreedyBatcher
from socratic.generate import Generator
from socratic.solve import DEFAULT_MAX_STEPS, Solved, solve_async

MAX_PROBLEM_CHARS = 2000
MAX_STEPS_LIMIT = 16


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 1})
class StudentModel:
    """One student model; concurrent `generate` calls become one batched forward pass.

    Batching is `serve.batching.GreedyBatcher`, not `@serve.batch`: Serve's batcher forms small
    batches under load and makes a lone call wait its timeout (see that module for the numbers).
    """

    def __init__(
        self,
        model_dir: str,
        max_new_tokens: int = 128,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        num_threads: int | None = None,
    ) -> None:
        self.model = Generator(model_dir, max_new_tokens=max_new_tokens, num_threads=num_threads)
        self.batcher = GreedyBatcher(self.model, max_batch_size, batch_wait_timeout_s)

    async def generate(self, prompt: str) -> str:
        """One prompt's completion; concurrent calls share one left-padded `generate`."""
        return await self.batcher(prompt)

    def stats(self) -> dict[str, Any]:
        """Calls and batch sizes seen by this replica (tests and the load benchmark read it)."""
        sizes = self.batcher.batch_sizes
        return {"calls": sum(sizes), "batches": len(sizes), "batch_sizes": list(sizes)}

    def reset_stats(self) -> None:
        self.batcher.batch_sizes = []


api = FastAPI(
    title="socratic-distill",
    description="Solve a problem with a Socratic decomposer and subproblem solver.",
)


@serve.deployment(
    max_ongoing_requests=64, max_queued_requests=128, ray_actor_options={"num_cpus": 0.1}
)
@serve.ingress(api)
class Ingress:
    """The solving loop over HTTP; holds no model."""

    def __init__(
        self,
        decomposer: DeploymentHandle,
        solver: DeploymentHandle,
        calculator: bool = True,
        max_problem_chars: int = MAX_PROBLEM_CHARS,
        default_max_steps: int = DEFAULT_MAX_STEPS,
    ) -> None:
        self.decomposer, self.solver = decomposer, solver
        self.calculator = calculator
        self.max_problem_chars = max_problem_chars
        self.default_max_steps = default_max_steps

    async def _decompose(self, prompt: str) -> str:
        return await self.decomposer.generate.remote(prompt)

    async def _solve_step(self, prompt: str) -> str:
        return await self.solver.generate.remote(prompt)

    def _parse(self, body: Any) -> tuple[str, int, bool]:
        if not isinstance(body, dict):
            raise HTTPException(422, 'body must be a JSON object like {"problem": "..."}')
        unknown = set(body) - {"problem", "max_steps", "stream"}
        if unknown:
            raise HTTPException(422, f"unknown fields: {', '.join(sorted(unknown))}")
        problem = body.get("problem")
        if not isinstance(problem, str):
            raise HTTPException(422, "'problem' is required and must be a string")
        if not problem.strip():
            raise HTTPException(422, "'problem' is empty")
        if len(problem) > self.max_problem_chars:
            raise HTTPException(
                413,
                f"'problem' has {len(problem)} characters; the limit is {self.max_problem_chars}",
            )
        max_steps = body.get("max_steps", self.default_max_steps)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int):
            raise HTTPException(422, "'max_steps' must be an integer")
        if not 1 <= max_steps <= MAX_STEPS_LIMIT:
            raise HTTPException(422, f"'max_steps' must be between 1 and {MAX_STEPS_LIMIT}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPException(422, "'stream' must be true or false")
        return problem, max_steps, stream

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/solve")
    async def solve(self, request: Request):  # noqa: ANN201 - JSON or an SSE stream
        """`{"problem": str, "max_steps"?: int, "stream"?: bool}` -> answer, steps, timings;
        with `"stream": true`, server-sent events: one `step` per solved step, then `done`."""
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, "body is not valid JSON") from None
        problem, max_steps, stream = self._parse(body)
        kw = {"max_steps": max_steps, "calculator": self.calculator}
        if not stream:
            t0 = time.perf_counter()
            sol = await solve_async(problem, self._decompose, self._solve_step, **kw)
            out = sol.to_dict()
            out["timings"]["request_s"] = round(time.perf_counter() - t0, 4)
            return JSONResponse(out)
        return StreamingResponse(self._events(problem, kw), media_type="text/event-stream")

    async def _events(self, problem: str, kw: dict[str, Any]) -> AsyncIterator[str]:
        queue: asyncio.Queue[Solved | None] = asyncio.Queue()

        async def on_step(event: Solved) -> None:
            await queue.put(event)

        task = asyncio.create_task(
            solve_async(problem, self._decompose, self._solve_step, on_step=on_step, **kw)
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        while (event := await queue.get()) is not None:
            payload = {"k": event.k, **event.step.to_dict()}
            yield f"event: step\ndata: {json.dumps(payload)}\n\n"
        try:
            sol = task.result()
        except Exception as e:  # noqa: BLE001 - the stream must end with a reason, not a hang
            yield f"event: error\ndata: {json.dumps({'error': str(e)})}\n\n"
            return
        yield f"event: done\ndata: {json.dumps(sol.to_dict())}\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve/config.yaml` and for `python serve/app.py`.

    args: decomposer, solver (model dirs); optional max_new_tokens, max_batch_size,
    batch_wait_timeout_s, num_threads, calculator; and `decomposer_options`,
    `solver_options`, `ingress_options`: Serve deployment options (autoscaling_config,
    num_replicas, max_ongoing_requests, ray_actor_options, ...) for code that builds the app
    in Python. The YAML config sets the same per deployment under `deployments:`.
    """
    model_kw = {
        k: args[k]
        for k in ("max_new_tokens", "max_batch_size", "batch_wait_timeout_s", "num_threads")
        if k in args
    }
    decomposer = StudentModel.options(name="Decomposer", **args.get("decomposer_options", {})).bind(
        args["decomposer"], **model_kw
    )
    solver = StudentModel.options(name="Solver", **args.get("solver_options", {})).bind(
        args["solver"], **model_kw
    )
    return Ingress.options(**args.get("ingress_options", {})).bind(
        decomposer, solver, calculator=args.get("calculator", True)
    )


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(description="Serve a decomposer + solver pair locally.")
    p.add_argument("--decomposer", required=True, help="exported decomposer dir")
    p.add_argument("--solver", required=True, help="exported solver dir")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--no-calculator", action="store_true", help="keep the students' arithmetic")
    a = p.parse_args(argv)
    ray.init(configure_logging=False)
    serve.start(
        http_options={"host": a.host, "port": a.port, "request_timeout_s": a.request_timeout_s}
    )
    serve.run(
        build_app(
            {
                "decomposer": a.decomposer,
                "solver": a.solver,
                "max_new_tokens": a.max_new_tokens,
                "max_batch_size": a.max_batch_size,
                "calculator": not a.no_calculator,
            }
        ),
        name="socratic",
        route_prefix="/",
    )
    print(f"serving on http://{a.host}:{a.port}/solve  (docs: /docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    from serve.app import main as _main

    sys.exit(_main())
