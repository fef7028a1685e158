"""A stand-in teacher LLM: a local server that speaks the OpenAI chat-completions protocol.

The one test server of the project: the tests, the benchmarks and a newcomer without an API key
all run this (`python -m serve.fake_teacher --dataset sample`); it lives outside `tests/` because
`benchmarks/` may not import `tests/`. `--record-times` keeps (arrival, finish) wall-clock times
of every chat request, returned and cleared by `GET /_bench/times` (what
`benchmarks/annotate_throughput.py` reads to tell Ray start-up from the steady state).

Why a real HTTP server and not a mocked client: the annotation pipeline talks to its teacher
through the real `openai` client, and most of what can go wrong there (retry-after headers,
status codes mapped to exception classes, timeouts, dropped connections, many requests at once)
lives in the client and the transport. A mock would test our idea of the client, not the client.

The teacher answers deterministically from gold data: the user message names the problem on a
line `Problem: <question>`, and the reply is the problem's gold steps in the unified student
format (when the system message asks for `Q1:` lines) or its gold solution in the CoT format.
A `FaultPlan` turns chosen requests into failures (see `FAULTS`), so tests can check how the
pipeline retries, rejects and counts without a flaky network or a paid API.

How the faults reach an `openai` client with `max_retries=0`:

* "429" -> `openai.RateLimitError`; the `retry-after` response header carries
  `FaultPlan.retry_after_s` (seconds, as text), read with `e.response.headers["retry-after"]`.
* "500", "503" -> `openai.InternalServerError`; "400" -> `openai.BadRequestError`;
  "401" -> `openai.AuthenticationError` (also sent for a wrong key when `api_key` is set);
  "403" -> `openai.PermissionDeniedError`. Each has an OpenAI-style body (`e.code`, `e.type`).
* "slow" -> the answer comes after `slow_s` extra seconds; a client timeout shorter than that
  raises `openai.APITimeoutError`.
* "close" -> the request is read, then the socket is shut down with no response at all; the
  client raises `openai.APIConnectionError` ("Connection error.") at once (not a timeout).
* "wrong", "malformed", "empty" -> HTTP 200 with a bad answer, for the pipeline's checks.
* "wrong_step" -> HTTP 200, the gold steps with one intermediate `<<expr=value>>` result off by
  one (the final answer still right): what only a per-step check catches.

The Batch API is served too: `/v1/files` (multipart upload with `purpose=batch`, metadata,
content, delete) and `/v1/batches` (create, retrieve, list with `limit`/`after`, cancel). Each line
of a batch is answered by the same function as a chat request (`TeacherServer._answer`), so the
per-request faults, the wrong answers and the counters apply to batch lines alike; a batch line
counts as a request in `stats()` (and in `batch_requests`). A batch is worked through as it is
polled: it stays `in_progress` for `FaultPlan.batch_polls` retrieves, answering a share of its
lines at each, then ends. `FaultPlan.batch_faults` gives the fate of successive batches:

* "ok" -> `completed`; answers in the output file, error statuses (a "500" or "400" fault, say)
  in the error file as `response.status_code` >= 400 lines, as OpenAI writes them.
* "expire" -> `expired` once `expire_fraction` of its lines are answered; the output file holds
  those, the error file a `batch_expired` line for each of the rest.
* "lose_output" -> `completed`, with an `output_file_id` whose file answers 404 (paid, gone).
* "fail" -> `failed` at the first poll (`errors`: token_limit_exceeded), nothing answered.

A "slow" fault does not delay a batch line, and a "close" fault becomes a 500 line. A cancelled
batch keeps what it answered and writes nothing for the rest. Files and batches survive `reset()`
(they are the provider's state, not the test's counters).

A server in another process (the CLI at the bottom) is driven over HTTP: `POST /_control/plan`
(a FaultPlan as JSON), `POST /_control/reset`, `GET /_control/stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.policy
import json
import math
import os
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from socratic.answers import format_answer, parse_number
from socratic.formats import clean, cot_target, unified_target
from socratic.records import YES_NO, Problem, Step

FAULTS = (
    "ok",
    "wrong",
    "wrong_step",
    "malformed",
    "empty",
    "slow",
    "429",
    "500",
    "503",
    "400",
    "401",
    "403",
    "close",
)
BATCH_FAULTS = ("ok", "expire", "lose_output", "fail")
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_EXPIRED = "This request could not be executed before the completion window expired."
UNKNOWN_PROBLEM = "I do not recognise this problem."
MALFORMED = "Sure! Let me think about this problem step by step."
FALLBACK_QUESTION = "What is the answer to the question?"
SOCRATIC_MARKER = "Q1:"
PROBLEM_PREFIX = "Problem: "

# (type, code, message) of the OpenAI-style error body sent with each status.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", "permission_denied", "You are not allowed to use this model."),
    404: ("invalid_request_error", "not_found", "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", "overloaded", "The engine is currently overloaded."),
}
_STATUS_FAULTS = {"400": 400, "401": 401, "403": 403, "429": 429, "500": 500, "503": 503}
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")


@dataclass
class FaultPlan:
    """Which requests fail, and how. Precedence: per_problem > first > rates > default.

    `per_problem` maps a Problem.id to the faults for its successive requests (consumed in
    order, then the rest of the plan applies), so a test can say "this problem fails twice, then
    succeeds" whatever order a concurrent pipeline sends its requests in. `first` gives the faults
    of the first len(first) well-formed requests in arrival order. `rates` are per-request
    probabilities, drawn with the server's seeded RNG from a single draw per request (so each
    fault has exactly its rate; their sum must not exceed 1).
    """

    default: str = "ok"
    rates: dict[str, float] = field(default_factory=dict)
    per_problem: dict[str, list[str]] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)
    retry_after_s: float | None = 1.0
    slow_s: float = 5.0
    # The Batch API: retrieves a batch stays `in_progress` for, the fate of successive batches
    # (BATCH_FAULTS, in creation order, then "ok"), and the share an "expire" batch answers.
    batch_polls: int = 1
    batch_faults: list[str] = field(default_factory=list)
    expire_fraction: float = 0.5
    file_deletes_fail: bool = False  # DELETE /v1/files/{id} answers 500 (the file stays)

    def __post_init__(self) -> None:
        named = [self.default, *self.rates, *self.first]
        named += [f for faults in self.per_problem.values() for f in faults]
        unknown = sorted({f for f in named if f not in FAULTS})
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; faults are {', '.join(FAULTS)}")
        if any(p < 0 for p in self.rates.values()) or sum(self.rates.values()) > 1 + 1e-9:
            raise ValueError(f"rates must be >= 0 and sum to at most 1, got {self.rates}")
        if self.slow_s < 0 or (self.retry_after_s is not None and self.retry_after_s < 0):
            raise ValueError("slow_s and retry_after_s must be >= 0")
        bad = sorted({f for f in self.batch_faults if f not in BATCH_FAULTS})
        if bad:
            raise ValueError(f"unknown batch fault(s) {bad}; they are {', '.join(BATCH_FAULTS)}")
        if self.batch_polls < 0 or not 0 <= self.expire_fraction <= 1:
            raise ValueError("batch_polls must be >= 0 and expire_fraction within [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "rates": dict(self.rates),
            "per_problem": {k: list(v) for k, v in self.per_problem.items()},
            "first": list(self.first),
            "retry_after_s": self.retry_after_s,
            "slow_s": self.slow_s,
            "batch_polls": self.batch_polls,
            "batch_faults": list(self.batch_faults),
            "expire_fraction": self.expire_fraction,
            "file_deletes_fail": self.file_deletes_fail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultPlan:
        """A plan from JSON; unknown keys are an error so a typo cannot silently mean "ok"."""
        extra = set(data) - set(cls().to_dict())
        if extra:
            raise ValueError(f"unknown FaultPlan field(s) {sorted(extra)}")
        retry = data.get("retry_after_s", 1.0)
        return cls(
            default=str(data.get("default", "ok")),
            rates={str(k): float(v) for k, v in (data.get("rates") or {}).items()},
            per_problem={
                str(k): [str(f) for f in v] for k, v in (data.get("per_problem") or {}).items()
            },
            first=[str(f) for f in data.get("first") or []],
            retry_after_s=None if retry is None else float(retry),
            slow_s=float(data.get("slow_s", 5.0)),
            batch_polls=int(data.get("batch_polls", 1)),
            batch_faults=[str(f) for f in data.get("batch_faults") or []],
            expire_fraction=float(data.get("expire_fraction", 0.5)),
            file_deletes_fail=bool(data.get("file_deletes_fail", False)),
        )


# --- what the teacher writes -----------------------------------------------------------------


def gold_steps(problem: Problem) -> list[Step]:
    """The steps the teacher answers with; a problem without steps still gets a valid reply."""
    if problem.steps:
        return list(problem.steps)
    return [Step(FALLBACK_QUESTION, f"The answer is {problem.answer}.")]


def wrong_answer(gold: str) -> str:
    """A final answer that is certainly not `gold`: yes/no swapped, numbers plus one."""
    if gold in YES_NO:
        return "no" if gold == "yes" else "yes"
    value = parse_number(gold)
    return format_answer(value + 1) if value is not None else f"not {gold}"


def _replace_final(text: str, gold: str, wrong: str) -> str:
    """`text` with its final answer changed from gold to wrong.

    The change must survive how the pipeline reads answers: `extract_answer` prefers the last
    calculator annotation's result, and `apply_calculator` recomputes annotations, so the last
    annotation computing the gold becomes `<<EXPR+1=WRONG>>` (a consistent arithmetic slip), and
    the last plain occurrence of the gold becomes the wrong answer.
    """
    if gold in YES_NO:
        hits = list(re.finditer(rf"\b{gold}\b", text, re.IGNORECASE))
        if not hits:
            return f"{text} So the answer is {wrong}."
        last = hits[-1]
        return text[: last.start()] + wrong + text[last.end() :]
    changed = False
    spans = [m.span() for m in _ANNOTATION.finditer(text)]
    plain = [
        m
        for m in re.finditer(rf"(?<![\d.,/]){re.escape(gold)}(?!\d|[.,/]\d)", text)
        if not any(a <= m.start() < b for a, b in spans)
    ]
    if plain:
        last = plain[-1]
        text, changed = text[: last.start()] + wrong + text[last.end() :], True
    annotations = list(_ANNOTATION.finditer(text))
    value = parse_number(gold)
    if annotations and value is not None and parse_number(annotations[-1][2]) == value:
        a = annotations[-1]
        text, changed = text[: a.start()] + f"<<{a[1]}+1={wrong}>>" + text[a.end() :], True
    return text if changed else f"{text} The answer is {wrong}."


def _wrong_intermediate(steps: list[Step]) -> list[Step]:
    """`steps` with the first calculator result before the final one off by one."""
    spans = [(i, m) for i, s in enumerate(steps) for m in _ANNOTATION.finditer(s.answer)]
    for i, m in spans[:-1]:
        value = parse_number(m[2])
        if value is None:
            continue
        text = steps[i].answer
        bad = f"<<{m[1]}={format_answer(value + 1)}>>"
        steps[i] = replace(steps[i], answer=text[: m.start()] + bad + text[m.end() :])
        return steps
    return steps


def teacher_content(
    problem: Problem, socratic: bool, *, wrong: bool = False, wrong_step: bool = False
) -> str:
    """The reply to a request about `problem`: unified steps (Socratic) or a CoT solution."""
    answer = wrong_answer(problem.answer) if wrong else problem.answer
    if socratic:
        steps = gold_steps(problem)
        if wrong_step:
            steps = _wrong_intermediate(steps)
        if wrong:
            last = steps[-1]
            steps[-1] = replace(last, answer=_replace_final(last.answer, problem.answer, answer))
        return unified_target(steps)
    return cot_target(problem.solution or f"The answer is {problem.answer}.", answer)


def _words(content: Any) -> int:
    return len(_text(content).split())


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
    kind, code, default = _ERRORS.get(status, ("server_error", None, "Error."))
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


class _BadRequest(ValueError):
    """A request the teacher refuses with 400; the message goes into the error body."""


@dataclass
class _Answer:
    """What the teacher answers one chat request: a status and body, or a dropped socket."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


@dataclass
class _Batch:
    """A batch's state on the server: its object, its parsed lines, and what they got."""

    obj: dict[str, Any]
    requests: list[tuple[str, Any]]  # (custom_id, request body)
    fault: str
    polls: int = 0
    answered: int = 0
    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)


# --- the server ------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets connections when 32+ clients start at once
    daemon_threads = True
    teacher: TeacherServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a machine with
        # slow DNS; the name is only used in log lines.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and went away is what the "slow" fault is for, not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's connection pool expects
    # Headers and body go out in two writes; with Nagle on, a keep-alive connection then waits
    # for the client's delayed ACK (~40 ms) on every response.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.teacher._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.teacher._track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.teacher._get(self)

    def do_POST(self) -> None:  # noqa: N802
        self.server.teacher._post(self)

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.teacher._delete(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if os.environ.get("TEACHER_SERVER_LOG") == "1":
            super().log_message(format, *args)

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:  # RFC 9112 chunked coding: hex size line, data, CRLF; 0 ends it
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def drop(self) -> None:
        """Answer nothing: shut the socket so the client sees a closed connection, not a hang."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class TeacherServer:
    """An OpenAI-compatible chat-completions server answering from gold problems.

    Use as a context manager (`with TeacherServer(problems) as server:`) and point a client at
    `server.base_url`. Thread-safe: handler threads share one lock for the plan and counters.
    """

    def __init__(
        self,
        problems: Iterable[Problem] = (),
        *,
        latency_s: float = 0.0,
        model: str = "test-teacher",
        api_key: str | None = None,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        record_times: bool = False,
    ) -> None:
        self.problems = {clean(p.question): p for p in problems}
        self.record_times = record_times
        self._times: list[tuple[float, float]] = []  # (arrival, finish) per chat request
        self.latency_s = latency_s
        self.model = model
        self.api_key = api_key
        self.seed = seed
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.teacher = self
        # The Batch API's state (the provider's, so `reset()` keeps it): files and batches.
        self._batch_lock = threading.Lock()
        self._files: dict[str, tuple[dict[str, Any], bytes | None]] = {}
        self._batches: dict[str, _Batch] = {}
        self._batch_order: list[str] = []
        self.set_plan(FaultPlan())
        self.reset_stats()

    # --- lifecycle ---

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> TeacherServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="teacher-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections so no handler thread lingers."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # --- plan and stats ---

    def set_plan(self, plan: FaultPlan) -> None:
        """Install a plan; reseeds the RNG and restarts `first`, so a plan replays exactly."""
        with self._lock:
            self._plan = plan
            self._queues = {k: list(v) for k, v in plan.per_problem.items()}
            self._batch_faults = list(plan.batch_faults)
            self._arrivals = 0
            self._rng = random.Random(self.seed)

    def reset_stats(self) -> None:
        with self._lock:
            self._requests = 0
            self._unknown = 0
            self._by_fault: Counter[str] = Counter()
            self._by_problem: Counter[str] = Counter()
            self._by_status: Counter[int] = Counter()
            self._auth: set[str] = set()
            self._batch_requests = 0
            self._files_uploaded = 0
            self._batches_new = 0

    def reset(self) -> None:
        """A fresh server: default plan ("ok" for everything) and zeroed stats."""
        self.set_plan(FaultPlan())
        self.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset. `by_status` has no entry for "close" (nothing sent).

        Batch lines count like chat requests (`requests`, `by_problem`, `by_fault`, `by_status`
        with each line's status); `batch_requests` is how many of them came in batches.
        """
        with self._lock:
            return {
                "requests": self._requests,
                "by_fault": dict(self._by_fault),
                "by_problem": dict(self._by_problem),
                "by_status": dict(self._by_status),
                "unknown_problems": self._unknown,
                "auth_headers_seen": set(self._auth),
                "batch_requests": self._batch_requests,
                "files_uploaded": self._files_uploaded,
                "batches_created": self._batches_new,
            }

    def _choose(self, problem: Problem | None) -> tuple[str, FaultPlan]:
        with self._lock:
            plan = self._plan
            index, self._arrivals = self._arrivals, self._arrivals + 1
            # One draw per request whatever decides it, so request k's draw never depends on
            # which earlier requests per_problem or first took.
            draw = self._rng.random()
            fault = None
            queue = self._queues.get(problem.id) if problem is not None else None
            if queue:
                fault = queue.pop(0)
            elif index < len(plan.first):
                fault = plan.first[index]
            else:
                total = 0.0
                for name, rate in plan.rates.items():
                    total += rate
                    if draw < total:
                        fault = name
                        break
            fault = fault or plan.default
            self._by_fault[fault] += 1
            if problem is None:
                self._unknown += 1
            else:
                self._by_problem[problem.id] += 1
            return fault, plan

    # --- request handling ---

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._by_status[status] += 1

    def _reply(
        self, h: _Handler, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        self._count_status(status)
        h.send_json(status, payload, headers)

    def _authorised(self, h: _Handler) -> bool:
        if self.api_key is None or h.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        self._reply(h, 401, _error_body(401))
        return False

    def _get(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        path = url.path.rstrip("/")
        if path == "/_bench/times":
            with self._lock:
                times, self._times = self._times, []
            h.send_json(200, {"times": times})
        elif path == "/_control/stats":
            stats = self.stats()
            stats["auth_headers_seen"] = sorted(stats["auth_headers_seen"])
            stats["by_status"] = {str(k): v for k, v in stats["by_status"].items()}
            h.send_json(200, stats)
        elif path == "/v1/models":
            if self._authorised(h):
                model = {"id": self.model, "object": "model", "created": 0, "owned_by": "tests"}
                h.send_json(200, {"object": "list", "data": [model]})
        elif path.startswith(("/v1/files", "/v1/batches")):
            if self._authorised(h):
                self._batch_api(h, "GET", path, parse_qs(url.query), b"")
        else:
            h.send_json(404, _error_body(404, f"No route GET {path}"))

    def _post(self, h: _Handler) -> None:
        path = urlsplit(h.path).path.rstrip("/")
        body = h.read_body()
        if path == "/v1/chat/completions":
            self._chat(h, body)
        elif path.startswith(("/v1/files", "/v1/batches")):
            if self._authorised(h):
                self._batch_api(h, "POST", path, {}, body)
        elif path == "/_control/plan":
            try:
                plan = FaultPlan.from_dict(json.loads(body))
            except (ValueError, TypeError, AttributeError) as e:
                h.send_json(400, _error_body(400, f"bad plan: {e}"))
                return
            self.set_plan(plan)
            h.send_json(200, {"ok": True, "plan": plan.to_dict()})
        elif path == "/_control/reset":
            self.reset()
            h.send_json(200, {"ok": True})
        else:
            h.send_json(404, _error_body(404, f"No route POST {path}"))

    def _delete(self, h: _Handler) -> None:
        path = urlsplit(h.path).path.rstrip("/")
        if path.startswith("/v1/files/"):
            if self._authorised(h):
                self._batch_api(h, "DELETE", path, {}, b"")
        else:
            h.send_json(404, _error_body(404, f"No route DELETE {path}"))

    def _chat(self, h: _Handler, raw: bytes) -> None:
        if not self.record_times:
            self._chat_once(h, raw)
            return
        start = time.time()
        try:
            self._chat_once(h, raw)
        finally:
            end = time.time()
            with self._lock:
                self._times.append((start, end))

    def _chat_once(self, h: _Handler, raw: bytes) -> None:
        with self._lock:
            self._requests += 1
            number = self._requests
            if auth := h.headers.get("Authorization"):
                self._auth.add(auth)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        if not self._authorised(h):
            return
        try:
            request = _parse_request(raw)
        except _BadRequest as e:
            self._reply(h, 400, _error_body(400, str(e)))
            return
        answer = self._answer(number, request)
        if answer.drop:
            h.drop()
            return
        self._reply(h, answer.status, answer.body, answer.headers)

    def _answer(self, number: int, request: Any, *, batch: bool = False) -> _Answer:
        """The teacher's answer to one chat request (a parsed body), online or in a batch."""
        if batch:
            try:
                request = _validate_request(request)
            except _BadRequest as e:
                return _Answer(400, _error_body(400, str(e)))
        messages = request["messages"]
        problem = self.problems.get(_problem_text(messages))
        fault, plan = self._choose(problem)
        if fault == "close":
            if not batch:
                return _Answer(0, None, drop=True)
            fault = "500"  # a batch has no socket to drop: the line fails as a server error
        if fault in _STATUS_FAULTS:
            status = _STATUS_FAULTS[fault]
            headers = {}
            if status == 429 and plan.retry_after_s is not None:
                headers["Retry-After"] = f"{plan.retry_after_s:g}"
            message = f"{_ERRORS[status][2]} (teacher_server: injected fault {fault!r})"
            return _Answer(status, _error_body(status, message), headers)
        if fault == "slow" and not batch:
            time.sleep(plan.slow_s)
        socratic = any(
            m.get("role") in ("system", "developer") and SOCRATIC_MARKER in _text(m.get("content"))
            for m in messages
        )
        if fault == "malformed":
            content = MALFORMED
        elif fault == "empty":
            content = ""
        elif problem is None:
            content = UNKNOWN_PROBLEM
        else:
            content = teacher_content(
                problem, socratic, wrong=fault == "wrong", wrong_step=fault == "wrong_step"
            )
        return _Answer(200, self._completion(number, request, content))

    def _completion(self, n: int, request: Mapping[str, Any], content: str) -> dict[str, Any]:
        prompt = sum(_words(m.get("content")) for m in request["messages"])
        completion = _words(content)
        return {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }

    # --- the Batch API: files and batches ---

    def files(self) -> dict[str, dict[str, Any]]:
        """File objects by id (an output file a "lose_output" batch lost is listed, empty)."""
        with self._batch_lock:
            return {k: dict(obj) for k, (obj, _) in self._files.items()}

    def batches(self) -> list[dict[str, Any]]:
        """Batch objects, oldest first."""
        with self._batch_lock:
            return [json.loads(json.dumps(self._batches[b].obj)) for b in self._batch_order]

    def _batch_api(
        self, h: _Handler, method: str, path: str, query: Mapping[str, list[str]], body: bytes
    ) -> None:
        parts = path.split("/")[2:]  # ["files", id?, "content"?] or ["batches", id?, "cancel"?]
        if auth := h.headers.get("Authorization"):
            with self._lock:
                self._auth.add(auth)
        try:
            with self._batch_lock:
                status, payload = self._batch_route(h, method, parts, query, body)
        except _BadRequest as e:
            status, payload = 400, _error_body(400, str(e))
        if isinstance(payload, bytes):
            h.send_bytes(status, payload, "application/octet-stream")
        else:
            h.send_json(status, payload)

    def _batch_route(
        self,
        h: _Handler,
        method: str,
        parts: list[str],
        query: Mapping[str, list[str]],
        body: bytes,
    ) -> tuple[int, Any]:
        kind, rest = parts[0], parts[1:]
        if kind == "files":
            if method == "POST" and not rest:
                return 200, self._upload(h.headers.get("Content-Type") or "", body)
            file = self._files.get(rest[0]) if rest else None
            if file is None or (len(rest) > 1 and rest[1:] != ["content"]):
                return 404, _error_body(404, f"No such File object: {'/'.join(rest)}")
            obj, content = file
            if method == "DELETE" and len(rest) == 1:
                if self._plan.file_deletes_fail:
                    return 500, _error_body(500, "injected fault: the file was not deleted")
                del self._files[rest[0]]
                return 200, {"id": rest[0], "object": "file", "deleted": True}
            if method == "GET" and len(rest) == 2:
                if content is None:  # what a "lose_output" batch left: listed, not there
                    return 404, _error_body(404, f"No such File object: {rest[0]}")
                return 200, content
            if method == "GET":
                return 200, obj
        elif kind == "batches":
            if method == "POST" and not rest:
                return 200, self._create_batch(json.loads(body or b"{}"))
            if method == "GET" and not rest:
                return 200, self._list_batches(query)
            batch = self._batches.get(rest[0]) if rest else None
            if batch is None:
                return 404, _error_body(404, f"No batch found with id '{rest[0] if rest else ''}'")
            if method == "GET" and len(rest) == 1:
                self._advance(batch)
                return 200, batch.obj
            if method == "POST" and rest[1:] == ["cancel"]:
                if batch.obj["status"] in ("validating", "in_progress", "finalizing"):
                    batch.obj.update(status="cancelling", cancelling_at=int(time.time()))
                return 200, batch.obj
        return 404, _error_body(404, f"No route {method} /v1/{'/'.join(parts)}")

    def _new_file(self, filename: str, purpose: str, content: bytes | None) -> str:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(content or b""),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self._files[file_id] = (obj, content)
        return file_id

    def _upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        fields = _multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "batch":
            raise _BadRequest(f"purpose must be 'batch' here, got {purpose!r}")
        if "file" not in fields:
            raise _BadRequest("a multipart field 'file' is required")
        filename, content = fields["file"]
        with self._lock:
            self._files_uploaded += 1
        return self._files[self._new_file(filename or "upload.jsonl", purpose, content)][0]

    def _create_batch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        file = self._files.get(str(request.get("input_file_id")))
        if file is None or file[1] is None:
            raise _BadRequest(f"input_file_id {request.get('input_file_id')!r} is not a file")
        endpoint = request.get("endpoint")
        if endpoint != BATCH_ENDPOINT:
            raise _BadRequest(f"endpoint must be {BATCH_ENDPOINT}, got {endpoint!r}")
        if request.get("completion_window") != "24h":
            raise _BadRequest("completion_window must be '24h'")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        with self._lock:
            fault = self._batch_faults.pop(0) if self._batch_faults else "ok"
            self._batches_new += 1
        requests, errors = _batch_lines(file[1])
        obj: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": request["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(requests), "completed": 0, "failed": 0},
            "metadata": request.get("metadata"),
        }
        if errors or fault == "fail":
            data = errors or [
                {
                    "code": "token_limit_exceeded",
                    "message": "Enqueued token limit reached (teacher_server: injected fault).",
                    "param": None,
                    "line": None,
                }
            ]
            obj.update(status="failed", failed_at=now, errors={"object": "list", "data": data})
        self._batches[batch_id] = _Batch(obj, requests, fault)
        self._batch_order.append(batch_id)
        return obj

    def _list_batches(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        limit = max(1, min(100, int((query.get("limit") or ["20"])[0])))
        ids = self._batch_order[::-1]  # newest first, as OpenAI lists them
        after = (query.get("after") or [None])[0]
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        page = ids[:limit]
        return {
            "object": "list",
            "data": [self._batches[b].obj for b in page],
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
            "has_more": len(ids) > limit,
        }

    def _advance(self, b: _Batch) -> None:
        """One poll of a batch: answer its next share of lines, or end it."""
        obj = b.obj
        if obj["status"] in ("completed", "failed", "expired", "cancelled"):
            return
        now = int(time.time())
        if obj["status"] == "cancelling":
            self._finish(b, "cancelled")
            return
        if obj["status"] == "validating":
            obj.update(status="in_progress", in_progress_at=now)
        b.polls += 1
        total = len(b.requests)
        polls = self._plan.batch_polls
        done = b.polls > polls
        target = total if done else math.ceil(total * b.polls / (polls + 1))
        if b.fault == "expire":
            target = min(target, int(total * self._plan.expire_fraction))
        while b.answered < target:
            self._answer_line(b, *b.requests[b.answered])
        counts = obj["request_counts"]
        counts.update(completed=len(b.output), failed=len(b.errors))
        if done:
            self._finish(b, "expired" if b.fault == "expire" else "completed")

    def _answer_line(self, b: _Batch, custom_id: str, body: Any) -> None:
        with self._lock:
            self._requests += 1
            self._batch_requests += 1
            number = self._requests
        answer = self._answer(number, body, batch=True)
        self._count_status(answer.status)
        b.answered += 1
        line = {
            "id": f"batch_req_{number}",
            "custom_id": custom_id,
            "response": {
                "status_code": answer.status,
                "request_id": f"req_{number}",
                "body": answer.body,
            },
            "error": None,
        }
        (b.output if answer.status == 200 else b.errors).append(json.dumps(line).encode())

    def _finish(self, b: _Batch, status: str) -> None:
        now = int(time.time())
        obj = b.obj
        if status == "expired":
            for custom_id, _ in b.requests[b.answered :]:
                error = {"code": "batch_expired", "message": BATCH_EXPIRED}
                line = {"id": None, "custom_id": custom_id, "response": None, "error": error}
                b.errors.append(json.dumps(line).encode())
        if b.output:
            lost = b.fault == "lose_output"
            content = None if lost else b"\n".join(b.output) + b"\n"
            obj["output_file_id"] = self._new_file(
                f"{obj['id']}_output.jsonl", "batch_output", content
            )
        if b.errors:
            obj["error_file_id"] = self._new_file(
                f"{obj['id']}_error.jsonl", "batch_output", b"\n".join(b.errors) + b"\n"
            )
        failed = sum(1 for line in b.errors if b'"batch_expired"' not in line)
        obj["request_counts"].update(completed=len(b.output), failed=failed)
        obj.update(status=status, finalizing_at=now)
        obj[f"{status}_at"] = now


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, content)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise _BadRequest(f"expected multipart/form-data, got {content_type!r}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise _BadRequest("the multipart body does not parse")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _batch_lines(content: bytes) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """(custom_id, body) per line of a batch input file, and its validation errors, if any."""
    requests: list[tuple[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(n: int, message: str) -> None:
        errors.append({"code": "invalid_request", "message": message, "param": None, "line": n})

    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            error(n, "line is not JSON")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            error(n, "each line needs a string custom_id")
            continue
        if item["custom_id"] in seen:
            error(n, f"duplicate custom_id {item['custom_id']!r}")
            continue
        if item.get("method") != "POST" or item.get("url") != BATCH_ENDPOINT:
            error(n, f"each line must POST to {BATCH_ENDPOINT}")
            continue
        seen.add(item["custom_id"])
        requests.append((item["custom_id"], item.get("body")))
    if not requests and not errors:
        error(0, "the input file has no requests")
    return requests, errors


def _parse_request(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _BadRequest(f"request body is not JSON: {e}") from e
    return _validate_request(request)


def _validate_request(request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise _BadRequest("request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise _BadRequest("every message needs a 'role'")
    if request.get("n") not in (None, 1):
        raise _BadRequest(f"only n=1 is supported, got n={request.get('n')!r}")
    if request.get("stream"):
        raise _BadRequest("streaming is not supported")
    return request


def _problem_text(messages: list[dict[str, Any]]) -> str | None:
    """The problem named by the last user message's `Problem: ` line, cleaned, if any."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        return None
    for line in _text(users[-1].get("content")).splitlines():
        line = line.lstrip()
        if line.startswith(PROBLEM_PREFIX):
            return clean(line[len(PROBLEM_PREFIX) :])
    return None


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve a dataset's gold answers until SIGTERM/SIGINT; prints `TEACHER_SERVER_URL=...`."""
    import dataclasses

    from socratic.adapters import DatasetOptions, DatasetSpec, load_problems

    parser = argparse.ArgumentParser(prog="python -m serve.fake_teacher")
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--split", default="all")
    parser.add_argument("--path", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--model", default="test-teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key-env", default=None, help="require the key in this env var")
    parser.add_argument("--record-times", action="store_true",
                        help="keep each chat request's (arrival, finish); GET /_bench/times")
    # A custom dataset's fields, as annotate takes them (`--question-field Q --answer-kind text`)
    for f in dataclasses.fields(DatasetOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, default=None)
    args = parser.parse_args(argv)

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that variable is not set")
    args.dataset_config, args.hub_id, args.limit = args.config, None, None
    try:
        spec = DatasetSpec.from_config(args)
    except ValueError as e:
        parser.error(str(e))
    problems = list(load_problems(spec))

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = TeacherServer(
        problems,
        latency_s=args.latency,
        model=args.model,
        api_key=api_key,
        seed=args.seed,
        host=args.host,
        port=args.port,
        record_times=args.record_times,
    )
    with server:
        print(f"TEACHER_SERVER_URL={server.base_url}", flush=True)
        print(f"teacher_server: {len(problems)} problems, model {args.model}", file=sys.stderr)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
