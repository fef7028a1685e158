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
import copy
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python serve/app.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batching import GreedyBatcher
from serve.placement import (
    MODELS,
    PlacementError,
    autoscaler_running,
    check_fits,
    growable_node_types,
    parse_node_types,
    size_to_cluster,
)
from serve.validate import MAX_BODY_BYTES, check_text, read_json
from socratic.answers import ANSWER_KINDS
from socratic.formats import NO_ANSWER, parse_solver
from socratic.generate import Completion, Generator
from socratic.solve import DEFAULT_MAX_STEPS, Solved, decomposer_form_of, solve_async

MAX_PROBLEM_CHARS = 2000
MAX_STEPS_LIMIT = 16
log = logging.getLogger("ray.serve")

__all__ = ["Ingress", "PlacementError", "StudentModel", "build_app"]


@serve.deployment(max_ongoing_requests=32)
class StudentModel:
    """One student model; concurrent `generate` calls become one batched forward pass.

    Batching is `serve.batching.GreedyBatcher`, not `@serve.batch`: Serve's batcher forms small
    batches under load and makes a lone call wait its timeout (see that module for the numbers).
    A prompt longer than the model's positions leave room for is cut as offline evaluation
    cuts it (`socratic.generate.bound_prompt`: the problem line and the newest steps stay), so
    a problem that evaluation scores is answered the same over HTTP; the reply counts the cut
    calls in `truncated`. Refusing instead (413, as before) failed the solver mid-solve, since
    its prompt grows with every step. With `num_gpus` the model runs on the GPU, in
    bf16 unless `dtype` says otherwise. Batch sizes, queue waits and tokens go to
    `ray.serve.metrics` (Prometheus); `stats()` reads the same counts, bounded.
    """

    def __init__(
        self,
        model_dir: str,
        max_new_tokens: int = 128,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        num_threads: int | None = None,
        num_gpus: float = 0,
        dtype: str | None = None,
        calculator: bool = False,
    ) -> None:
        device = "cuda" if num_gpus else "cpu"
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        self.model = Generator(
            model_dir,
            max_new_tokens=max_new_tokens,
            num_threads=num_threads,
            dtype=dtype,
            device=device,
        )
        self.max_new_tokens = max_new_tokens
        # The calculator runs inside decoding (socratic/generate.py), one setting per replica,
        # so a batch never mixes rows decoded with it and without it.
        self.calculator = calculator
        self.metrics = ModelMetrics()
        self.tokens = 0
        self.batcher = GreedyBatcher(
            self._complete, max_batch_size, batch_wait_timeout_s, on_batch=self.metrics.batch
        )

    def _complete(self, prompts: list[str]) -> list[Completion]:
        completions = self.model.complete(prompts, calculator=self.calculator)
        n = sum(c.completion_tokens for c in completions)
        self.tokens += n
        self.metrics.tokens(sum(c.prompt_tokens for c in completions), n)
        return completions

    async def generate(self, prompt: str) -> Completion:
        """One prompt's completion (text, token counts, calculator counts); concurrent calls
        share one left-padded `generate`."""
        return await self.batcher(prompt)

    def stats(self) -> dict[str, Any]:
        """Calls, batches and a count per batch size since the last reset (bounded: one key per
        size); tests and the load benchmark read it. Prometheus has the same as histograms."""
        return {
            "calls": self.batcher.calls,
            "batches": self.batcher.batches,
            "batch_size_counts": dict(self.batcher.size_counts),
            "tokens": self.tokens,
        }

    def reset_stats(self) -> None:
        self.batcher.size_counts.clear()
        self.tokens = 0


class ModelMetrics:
    """The replica's Prometheus metrics (Serve tags each with its deployment and replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.batch_size = metrics.Histogram(
            "socratic_batch_size",
            description="prompts per batched generate call",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.queue_wait = metrics.Histogram(
            "socratic_queue_wait_s",
            description="seconds a prompt waited for its batch to start",
            boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
        )
        self.generated = metrics.Counter(
            "socratic_generated_tokens", description="tokens generated"
        )
        self.prompt = metrics.Counter("socratic_prompt_tokens", description="prompt tokens read")

    def batch(self, size: int, waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        for w in waits_s:
            self.queue_wait.observe(w)

    def tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt.inc(prompt)
        if generated:
            self.generated.inc(generated)


def request_id() -> str:
    """Serve's id for the request being handled; the proxy returns it as `x-request-id`, so a
    500's detail and the replica's log line can be matched. Empty outside a request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


def failure(e: BaseException, rid: str = "") -> tuple[int, str]:
    """The HTTP status and detail for an error raised inside the solving loop: an overloaded,
    starting or lost replica is a 503 (retrying can help); anything else is a 500 that names the
    request id, logged with its traceback under that id, since retrying the same problem on the
    same models fails the same way.

    Defined above `Ingress` on purpose: `@serve.ingress` serialises the class by value when it
    is decorated, and a global defined later is missing in the replica (NameError, a 500)."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = getattr(e, "cause", None) or e
    if isinstance(e, BackPressureError | DeploymentUnavailableError):
        return 503, f"the models are overloaded or starting ({type(e).__name__}); retry later"
    if isinstance(e, rex.RayActorError | rex.ActorUnavailableError | asyncio.TimeoutError):
        return 503, f"a model replica was lost ({type(e).__name__}); retry"
    log.error("solving loop failed (request id %s)", rid or "-", exc_info=e)
    return 500, f"the models failed on this request ({type(cause).__name__}); request id {rid}"


api = FastAPI(
    title="socratic-distill",
    description="Solve a problem with a Socratic decomposer and subproblem solver.",
)
PLAYGROUND = Path(__file__).resolve().parent / "static" / "index.html"


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The last net: an error no handler expected is logged with its traceback and answered as
    JSON with the request id, never as a bare 500 page."""
    status, detail = failure(exc, request_id())
    return JSONResponse({"detail": detail}, status_code=status)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress(api)
class Ingress:
    """The solving loop over HTTP; holds no model. `GET /` is the playground page."""

    def __init__(
        self,
        decomposer: DeploymentHandle,
        solver: DeploymentHandle,
        calculator: bool = True,
        answer_kind: str = "number",
        max_problem_chars: int = MAX_PROBLEM_CHARS,
        default_max_steps: int = DEFAULT_MAX_STEPS,
        max_body_bytes: int = MAX_BODY_BYTES,
        decomposer_form: str = "all",
    ) -> None:
        if answer_kind not in ANSWER_KINDS:
            raise ValueError(f"answer_kind must be one of {ANSWER_KINDS}, not {answer_kind!r}")
        self.decomposer, self.solver = decomposer, solver
        self.calculator = calculator
        self.answer_kind = answer_kind
        self.max_problem_chars = max_problem_chars
        self.default_max_steps = default_max_steps
        self.max_body_bytes = max_body_bytes
        self.decomposer_form = decomposer_form  # the loop its decomposer was trained for
        self.page = PLAYGROUND.read_text(encoding="utf-8")
        self.cancelled = 0  # streaming solves stopped because their client went away

    async def _decompose(self, prompt: str) -> Completion:
        return await self.decomposer.generate.remote(prompt)

    async def _solve_step(self, prompt: str) -> Completion:
        return await self.solver.generate.remote(prompt)

    def _parse(self, body: Any) -> tuple[str, int, bool, str]:
        if not isinstance(body, dict):
            raise HTTPException(422, 'body must be a JSON object like {"problem": "..."}')
        unknown = set(body) - {"problem", "max_steps", "stream", "answer_kind"}
        if unknown:
            raise HTTPException(422, f"unknown fields: {', '.join(sorted(unknown))}")
        problem = body.get("problem")
        if not isinstance(problem, str):
            raise HTTPException(422, "'problem' is required and must be a string")
        if len(problem) > self.max_problem_chars:
            raise HTTPException(
                413,
                f"'problem' has {len(problem)} characters; the limit is {self.max_problem_chars}",
            )
        problem = check_text(problem, "problem")
        if not problem.strip():
            raise HTTPException(422, "'problem' is empty")
        max_steps = body.get("max_steps", self.default_max_steps)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int):
            raise HTTPException(422, "'max_steps' must be an integer")
        if not 1 <= max_steps <= MAX_STEPS_LIMIT:
            raise HTTPException(422, f"'max_steps' must be between 1 and {MAX_STEPS_LIMIT}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HTTPException(422, "'stream' must be true or false")
        kind = body.get("answer_kind", self.answer_kind)
        if kind not in ANSWER_KINDS:
            raise HTTPException(422, f"'answer_kind' must be one of {', '.join(ANSWER_KINDS)}")
        return problem, max_steps, stream, kind

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/solve")
    async def solve(self, request: Request):  # noqa: ANN201 - JSON or an SSE stream
        """`{"problem": str, "max_steps"?: int, "stream"?: bool, "answer_kind"?: "number" |
        "yesno" | "choice" | "text"}` -> answer, steps, timings; with `"stream": true`,
        server-sent events: one `step` per solved step, then `done` (or `error` with a status
        and a detail). The answer is read from the last step as evaluation reads it for that
        kind: a number, yes/no, a choice letter (the options belong in `problem`, as the
        students saw them in training) or a short text."""
        body = await read_json(request, self.max_body_bytes)
        problem, max_steps, stream, kind = self._parse(body)
        kw = {"max_steps": max_steps, "calculator": self.calculator, "answer_kind": kind,
              "decomposer_form": self.decomposer_form}  # fmt: skip
        if not stream:
            t0 = time.perf_counter()
            try:
                sol = await solve_async(problem, self._decompose, self._solve_step, **kw)
            except Exception as e:  # noqa: BLE001 - every failure gets a status and a detail
                status, detail = failure(e, request_id())
                raise HTTPException(status, detail) from None
            out = sol.to_dict()
            out["timings"]["request_s"] = round(time.perf_counter() - t0, 4)
            return JSONResponse(out)
        events = self._events(problem, kw, request_id())
        return StreamingResponse(events, media_type="text/event-stream")

    async def _events(self, problem: str, kw: dict[str, Any], rid: str = "") -> AsyncIterator[str]:
        """One `step` event per solved step (with its time and, where the calculator changed
        the student's arithmetic, what the student wrote), then `done` or `error`. A client
        that goes away cancels the solve: Starlette closes this generator, and the `finally`
        stops the loop before its next model call (it would otherwise run to the end, unread)."""
        queue: asyncio.Queue[Solved | None] = asyncio.Queue()
        forced: list[int] = []  # results the calculator forced into each step's decoding
        written: list[str] = []  # the student's own answers, where the fallback changed them
        t0 = last = time.perf_counter()

        async def solve_step(prompt: str) -> Completion:
            reply = await self._solve_step(prompt)
            forced.append(reply.calculator_forced)
            written.append(parse_solver(reply.text) or NO_ANSWER)
            return reply

        async def on_step(event: Solved) -> None:
            await queue.put(event)

        task = asyncio.create_task(
            solve_async(problem, self._decompose, solve_step, on_step=on_step, **kw)
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                now = time.perf_counter()
                payload = {"k": event.k, **event.step.to_dict()}
                payload.update(step_s=round(now - last, 4), elapsed_s=round(now - t0, 4))
                student = written[event.k - 1] if len(written) >= event.k else None
                n_forced = forced[event.k - 1] if len(forced) >= event.k else 0
                if n_forced:
                    payload["calculator"] = {"forced": n_forced}
                elif student is not None and student != event.step.answer:
                    payload["calculator"] = {"student": student}
                last = now
                yield f"event: step\ndata: {json.dumps(payload)}\n\n"
            try:
                sol = task.result()
            except Exception as e:  # noqa: BLE001 - the stream must end with a reason, not a hang
                status, detail = failure(e, rid)
                error = {"status": status, "detail": detail}
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            out = sol.to_dict()
            out["timings"]["request_s"] = round(time.perf_counter() - t0, 4)
            yield f"event: done\ndata: {json.dumps(out)}\n\n"
        finally:
            if not task.done():
                task.cancel()
                self.cancelled += 1


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve/config.yaml` and for `python serve/app.py`.

    args: decomposer, solver (model dirs); optional max_new_tokens, max_batch_size,
    batch_wait_timeout_s, num_threads, calculator, answer_kind (`number` | `yesno` | `choice` |
    `text`; a request may name its own), num_gpus
    and dtype (per model replica); decomposer_form (`all` | `iterative`, default: what the
    decomposer dir's provenance.json says); and `decomposer_options`, `solver_options`,
    `ingress_options`: Serve deployment options (autoscaling_config, num_replicas,
    max_ongoing_requests, ray_actor_options, ...). Replicas whose options state no `num_cpus`
    get a share of the cluster's CPUs, and an app whose minimum replicas cannot be placed
    raises `PlacementError` here, at once, naming what it asked for and what the cluster has.
    Keep resources and scaling in these args, not in the YAML's `deployments:` (which Serve
    applies after this builder, unchecked).

    On an autoscaling cluster the check counts the nodes the autoscaler can add: their node
    types come from the GCS (`serve.placement.growable_node_types`; ray_cluster.yaml publishes
    them) or from the optional `node_types` arg, a list of resource dicts (`{"CPU": 48, "GPU":
    4}`) or `{name, resources, max_workers}` entries, which replaces what the GCS says (for a
    cluster whose autoscaler publishes nothing). A replica that fits only a node type not yet
    present is logged and Serve waits for the node; one that no node and no node type could
    ever hold raises `PlacementError`. `node_types: []` checks against present nodes only.
    """
    import ray

    model_kw = {
        k: args[k]
        for k in (
            "max_new_tokens",
            "max_batch_size",
            "batch_wait_timeout_s",
            "num_threads",
            "dtype",
        )
        if k in args
    }
    num_gpus = args.get("num_gpus", 0)
    options = {
        "Decomposer": copy.deepcopy(args.get("decomposer_options", {})),
        "Solver": copy.deepcopy(args.get("solver_options", {})),
        "Ingress": copy.deepcopy(args.get("ingress_options", {})),
    }
    if num_gpus:
        for name in MODELS:
            options[name].setdefault("ray_actor_options", {}).setdefault("num_gpus", num_gpus)
    cluster = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if args.get("node_types") is not None:
        node_types = parse_node_types(args["node_types"])
        may_grow = False
    else:
        node_types = growable_node_types()
        may_grow = node_types is None and autoscaler_running()
    options = size_to_cluster(options, cluster, node_types, nodes)
    check_fits(options, cluster, nodes, node_types, may_grow=may_grow)
    gpus = {n: options[n]["ray_actor_options"].get("num_gpus", 0) for n in MODELS}
    decomposer = StudentModel.options(name="Decomposer", **options["Decomposer"]).bind(
        args["decomposer"], num_gpus=gpus["Decomposer"], **model_kw
    )
    solver = StudentModel.options(name="Solver", **options["Solver"]).bind(
        args["solver"],
        num_gpus=gpus["Solver"],
        calculator=args.get("calculator", True),
        **model_kw,
    )
    return Ingress.options(**options["Ingress"]).bind(
        decomposer,
        solver,
        calculator=args.get("calculator", True),
        answer_kind=args.get("answer_kind", "number"),
        # the loop the decomposer was trained for (its provenance.json), unless args say
        decomposer_form=args.get("decomposer_form") or decomposer_form_of(args["decomposer"]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    import threading

    import ray

    from socratic.ray_address import resolve_address

    p = argparse.ArgumentParser(description="Serve a decomposer + solver pair.")
    p.add_argument("--decomposer", required=True, help="exported decomposer dir")
    p.add_argument("--solver", required=True, help="exported solver dir")
    p.add_argument(
        "--decomposer-form",
        choices=("all", "iterative"),
        help="all sub-questions at once, or one per step given the answers so far (default: "
        "what the decomposer dir's provenance.json says, else all)",
    )
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--num-cpus", type=float, help="logical CPUs of a new local cluster")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--no-calculator", action="store_true", help="keep the students' arithmetic")
    p.add_argument(
        "--answer-kind",
        choices=ANSWER_KINDS,
        default="number",
        help="what the final answer is (a request may say otherwise)",
    )
    p.add_argument(
        "--model-cpus",
        type=float,
        help="CPUs per model replica (default: a share of the cluster's)",
    )
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per model replica")
    p.add_argument("--dtype", help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument(
        "--ready-timeout-s",
        type=float,
        default=90.0,
        help="give up, saying why, if the app is not running by then",
    )
    a = p.parse_args(argv)
    address = resolve_address(a.address)
    local = {"num_cpus": a.num_cpus} if address == "local" and a.num_cpus else {}
    ray.init(address=address, configure_logging=False, **local)
    args: dict[str, Any] = {
        "decomposer": a.decomposer,
        "solver": a.solver,
        "max_new_tokens": a.max_new_tokens,
        "max_batch_size": a.max_batch_size,
        "calculator": not a.no_calculator,
        "answer_kind": a.answer_kind,
        "num_gpus": a.num_gpus,
    }
    if a.decomposer_form:
        args["decomposer_form"] = a.decomposer_form
    if a.dtype:
        args["dtype"] = a.dtype
    if a.model_cpus is not None:
        for key in ("decomposer_options", "solver_options"):
            args[key] = {"ray_actor_options": {"num_cpus": a.model_cpus}}
    try:
        app = build_app(args)
    except PlacementError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        ray.shutdown()
        return 2
    serve.start(
        http_options={"host": a.host, "port": a.port, "request_timeout_s": a.request_timeout_s}
    )
    failed: list[BaseException] = []
    ready = threading.Event()

    def deploy() -> None:
        try:
            serve.run(app, name="socratic", route_prefix="/")
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)
        ready.set()

    threading.Thread(target=deploy, daemon=True).start()
    if not ready.wait(a.ready_timeout_s) or failed:
        why = f"{failed[0]}" if failed else f"not running after {a.ready_timeout_s:g} s"
        print(f"error: the app did not start: {why}\n{_placement_report()}", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
        return 1
    print(f"serving on http://{a.host}:{a.port}/  (playground; API: /solve, docs: /docs); "
          "Ctrl-C stops", flush=True)  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _placement_report() -> str:
    """Each deployment's state and Serve's message, and the cluster's free and total resources."""
    import ray

    lines = []
    try:
        app = serve.status().applications.get("socratic")
        for name, d in (app.deployments if app else {}).items():
            lines.append(f"  {name}: {d.status} {d.replica_states} {d.message}".rstrip())
    except Exception as e:  # noqa: BLE001 - a report must not hide the first error
        lines.append(f"  (serve status unavailable: {e})")
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if "memory" not in k}
    total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if "memory" not in k}
    lines.append(f"  cluster resources free {free} of {total}")
    return "\n".join(lines)


if __name__ == "__main__":
    from serve.app import main as _main

    sys.exit(_main())
