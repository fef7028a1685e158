"""The teacher client: one HTTP client with bounded calls in flight, rate limits, retries.

Any OpenAI-compatible endpoint works (OpenAI, vLLM, our own `serve/local_teacher.py`). Online
calls go through plain aiohttp by default (`AiohttpChat`: 6-10x less CPU per call than the
`openai` client, measured), or through `openai.AsyncOpenAI` with its own retries off
(`max_retries=0`, `--http-client openai`). The retries are ours: we count them, honour
`Retry-After`, back off with jitter, and turn a call that still fails into a rejected row with
its reason instead of an exception that kills the job.

Errors are types, mapped once at the client boundary (`teacher_error`): `FatalTeacherError`
(a refused key, an unknown model: every later call would fail the same way, so the run stops),
`TransientTeacherError` (retried, with the server's `retry_after`) and `ContentTeacherError`
(this row gets no usable answer: rejected). Every call passes a gate first (`CallGate`): the
stop signal and the spend cap, per client here (`LocalGate`) or per run across Ray actors
(`pipelines/run_ledger.py`). What to ask and how to judge the answer lives in
`pipelines/prompting.py`.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# --- rate limits -------------------------------------------------------------------------------


class RateLimiter:
    """Requests-per-minute and tokens-per-minute token buckets, shared by every call of an actor.

    Providers limit both, so limiting requests alone (as `ray.data.llm` does) still trips 429s on
    long prompts. A call first reserves its estimated tokens; `settle` charges the difference
    once the real usage is known, so the budget follows what the provider actually counted.
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._clock, self._sleep = clock, sleep
        self._requests = float(rpm or 0)
        self._tokens = float(tpm or 0)
        self._last = clock()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    def _refill(self) -> None:
        now = self._clock()
        dt, self._last = now - self._last, now
        if self.rpm:
            self._requests = min(self.rpm, self._requests + dt * self.rpm / 60)
        if self.tpm:
            self._tokens = min(self.tpm, self._tokens + dt * self.tpm / 60)

    def _wait_for(self, tokens: float) -> float:
        waits = [0.0]
        if self.rpm and self._requests < 1:
            waits.append((1 - self._requests) * 60 / self.rpm)
        if self.tpm:
            need = min(tokens, self.tpm)  # a call bigger than the bucket waits for a full one
            if self._tokens < need:
                waits.append((need - self._tokens) * 60 / self.tpm)
        return max(waits)

    async def acquire(self, tokens: float) -> None:
        async with self._lock:  # one waiter at a time keeps the order fair (first come first go)
            while True:
                self._refill()
                wait = self._wait_for(tokens)
                if wait <= 0:
                    break
                self.waited_s += wait
                await self._sleep(wait)
            if self.rpm:
                self._requests -= 1
            if self.tpm:
                self._tokens -= tokens

    def settle(self, estimated: float, actual: float) -> None:
        if self.tpm:
            self._tokens -= actual - estimated


# --- errors ------------------------------------------------------------------------------------


class TeacherError(RuntimeError):
    """A teacher call that failed, as one of three kinds, whichever HTTP client made it.

    Each client's own exceptions (the `openai` client's, aiohttp's, a bad status or body) are
    mapped to these once, at the client boundary (`teacher_error`), as httpx maps its
    transport's errors: callers branch on the type, never on a message. `kind` is the label a
    rejected row's reason carries (`api_error: <kind>: <message>`): the HTTP status, or
    `timeout`, `connection`, `malformed_response`, `content_filter`; `status` is the HTTP status
    where there was one.

    Picklable with every field: Ray pickles an exception raised in an actor to hand it to the
    driver, and `Exception`'s own pickling would call `cls(*args)` and drop the rest.
    """

    default_kind = "error"

    def __init__(self, message: str = "", *, kind: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind or self.default_kind
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,), dict(self.__dict__))

    @property
    def reason(self) -> str:
        """What a row rejected for this error says (`pipelines.prompting.is_transient` reads it)."""
        return f"api_error: {self.kind}: {self.message}"


class FatalTeacherError(TeacherError):
    """Retrying cannot help and every later call would fail alike: stop the run (a refused key,
    an unknown model or base URL; the spend cap, as `BudgetExhausted`)."""

    default_kind = "fatal"


class TransientTeacherError(TeacherError):
    """Try this call again later: rate limited, a 5xx, a timeout, a dropped connection.
    `retry_after` is the wait the server asked for (seconds), if it said."""

    default_kind = "transient"

    def __init__(
        self,
        message: str = "",
        *,
        kind: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, kind=kind, status=status)
        self.retry_after = retry_after


class ContentTeacherError(TeacherError):
    """This row's call gets no usable answer, and asking again would get the same: a reply that
    is no completion (malformed JSON, no choices), a content filter, a request the endpoint
    refuses as asked (400, 422). The row is rejected with its reason; the run goes on."""

    default_kind = "content"


class BudgetExhausted(FatalTeacherError):
    """The spend cap (`--max-cost-usd`) would be passed: no new call starts; the row stays to do."""

    default_kind = "budget"


def fatal_for(code: int, message: str) -> FatalTeacherError | None:
    """The error that stops a run for an HTTP status no retry can fix (401, 403, 404)."""
    if code in (401, 403):
        return FatalTeacherError(
            f"the teacher endpoint refused the request ({code}): {message}. "
            "Check the API key variable (--api-key-env) and the model name.",
            kind=str(code),
            status=code,
        )
    if code == 404:
        return FatalTeacherError(
            f"the teacher endpoint answered 404: {message}. Check --model and --base-url "
            "(an OpenAI-compatible base URL usually ends in /v1).",
            kind="404",
            status=404,
        )
    return None


def status_error(
    status: int, headers: Mapping[str, str] | None, body: Any, default: str
) -> TeacherError:
    """The error for a reply with `status` (an error status, or a 2xx whose body is no
    completion). A wrong key, model name or base URL fails every call alike, so it stops the
    run: rejecting each row instead would also make a rerun skip them all after the fix."""
    message = body_message(body, default)
    fatal = fatal_for(status, message)
    if fatal is not None:
        return fatal
    if 200 <= status < 300:
        return ContentTeacherError(message, kind="malformed_response", status=status)
    if status in (408, 409, 429) or status >= 500:
        lower = {k.lower(): v for k, v in headers.items()} if headers else None
        return TransientTeacherError(
            message, kind=str(status), status=status, retry_after=retry_after_seconds(lower)
        )
    return ContentTeacherError(message, kind=str(status), status=status)


def teacher_error(exc: BaseException) -> TeacherError:
    """The one mapping of whatever a call raised (the `openai` client, aiohttp, the runtime) to
    the `TeacherError` tree. Anything unknown rejects the row (`ContentTeacherError` named by
    its type) rather than killing the job: one bad row must not stop a run (ray #59194)."""
    if isinstance(exc, TeacherError):
        return exc
    message = error_message(exc)
    module = type(exc).__module__
    if module.startswith("openai"):
        import openai

        if isinstance(exc, openai.APIStatusError):
            headers = exc.response.headers if exc.response is not None else None
            return status_error(exc.status_code, headers, exc.body, message)
        if isinstance(exc, openai.APITimeoutError):  # before its base, APIConnectionError
            return TransientTeacherError(message, kind="timeout")
        if isinstance(exc, openai.APIConnectionError):
            return TransientTeacherError(message, kind="connection")
        if isinstance(exc, openai.APIResponseValidationError):
            return ContentTeacherError(message, kind="malformed_response")
    if isinstance(exc, json.JSONDecodeError):  # the openai client's, for a body that is no JSON
        return ContentTeacherError(message, kind="malformed_response")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # aiohttp's ServerTimeoutError too
        return TransientTeacherError(message, kind="timeout")
    if module.startswith("aiohttp"):
        import aiohttp

        if isinstance(exc, aiohttp.InvalidURL):
            return FatalTeacherError(f"the teacher URL is not valid: {message}", kind="url")
        if isinstance(exc, aiohttp.ClientError):
            return TransientTeacherError(message, kind="connection")
    return ContentTeacherError(message, kind=type(exc).__name__)


def reply_text(content: str | None, finish_reason: str | None, status: int = 200) -> str:
    """The text of a completion's first choice; a filtered one is an error, not an answer."""
    if finish_reason == "content_filter":
        raise ContentTeacherError(
            "the endpoint's content filter stopped the reply", kind="content_filter", status=status
        )
    return content or ""


def body_message(body: Any, default: str) -> str:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), else `default`.

    Online replies and Batch API error lines carry the same body, so both read it here."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])[:200]
    return default


def error_message(exc: BaseException) -> str:
    """A short message for a failed call: the error body's, else the exception's first line."""
    default = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return body_message(getattr(exc, "body", None), default)


# --- calling -----------------------------------------------------------------------------------


class Secret:
    """An API key that never prints: its repr is masked, so no log line or error can leak it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    base_s: float = 1.0
    cap_s: float = 60.0
    max_retry_after_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
        backoff = rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_s))
        return backoff


@dataclass
class CallResult:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error: str | None = None  # set when every attempt failed: "api_error: <kind>: <message>"


@dataclass
class TeacherStats:
    calls: int = 0
    retries: int = 0
    by_error: dict[str, int] = field(default_factory=dict)


def retry_after_seconds(
    headers: Mapping[str, str] | None, now: float | None = None
) -> float | None:
    """`Retry-After` (seconds or an HTTP date) or `retry-after-ms`, in seconds."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class AiohttpChat:
    """Chat completions over one `aiohttp` session: the OpenAI wire protocol, nothing else.

    Measured on 2 loaded cores against the 200 ms test server, 64 in flight: 0.32 ms of CPU per
    call, against 4.4 ms for `openai.AsyncOpenAI` (3.1 ms with its aiohttp transport): the
    client's request building and pydantic parsing, not the network, were the pipeline's CPU
    per row. The default for online calls (`--http-client`). Raises `TeacherError`s only;
    `close()` closes the session and its pooled connections (else aiohttp reports each one as
    unclosed when the process exits).
    """

    def __init__(self, base_url: str | None, api_key: Secret, timeout_s: float) -> None:
        self.url = (base_url or "https://api.openai.com/v1").rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key.get()}"}
        self._timeout_s = timeout_s
        self._session: Any = None

    async def create(self, model: str, messages: list, **sampling: Any) -> tuple[str, int, int]:
        try:
            return await self._post({"model": model, "messages": messages, **sampling})
        except Exception as exc:  # noqa: BLE001 - the client boundary: mapped, nothing else out
            raise teacher_error(exc) from exc

    async def _post(self, payload: dict[str, Any]) -> tuple[str, int, int]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(limit=0),
            )
        async with self._session.post(self.url, json=payload) as r:
            try:
                body = await r.json(content_type=None)
            except ValueError:
                body = None
            if r.status >= 400 or not isinstance(body, dict):
                raise status_error(r.status, r.headers, body, f"HTTP {r.status}")
            status = r.status
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ContentTeacherError("the reply has no choices", kind="malformed_response")
        usage = body.get("usage") or {}
        message = choices[0].get("message") or {}
        text = reply_text(message.get("content"), choices[0].get("finish_reason"), status)
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


@dataclass(frozen=True)
class Prices:
    """USD per million prompt and completion tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


# Chat framing per message and per call, in tokens, above any chat template's (OpenAI's: 4 and 3).
FRAMING_TOKENS = 8


def prompt_token_bound(messages: Sequence[Mapping[str, Any]]) -> int:
    """At most this many prompt tokens, whatever the tokenizer: byte-level BPE tokens are at
    least one byte each, so UTF-8 bytes plus framing bound the count (about 4x the usual count
    of English text: a bound, for the spend cap, not an estimate)."""
    return sum(len(str(m.get("content") or "").encode()) + FRAMING_TOKENS for m in messages) + (
        FRAMING_TOKENS
    )


# --- the stop signal and the spend cap -----------------------------------------------------------


@dataclass
class Ticket:
    """A call let through a gate: its worst-case cost, reserved until `settle`; `probe` when it
    holds one of the run's slots for calls made before any reply proved key and model right."""

    bound_usd: float
    probe: bool = False


class CallGate(Protocol):
    """What a call passes before it is sent, and reports after: the stop signal (the first fatal
    error) and the spend cap, counting calls in flight at their bound. `LocalGate` is one
    client's; `pipelines.run_ledger.LedgerGate` shares one per run across Ray actors."""

    @property
    def stopped(self) -> FatalTeacherError | None: ...

    async def admit(self, bound_usd: float) -> Ticket:
        """Let a call start, or raise: a copy of the stop error, or `BudgetExhausted`."""
        ...

    def settle(self, ticket: Ticket, cost_usd: float, *, answered: bool) -> None: ...

    def fail(self, error: FatalTeacherError) -> None: ...

    async def close(self) -> None: ...


class LocalGate:
    """The stop signal and the spend cap of one client (no Ray): the benchmark's, the tests',
    an annotator's without a run ledger. A call starts only while spent + the bounds of the calls
    in flight + its own bound stay within the cap, so the cap holds wherever the endpoint keeps
    to `max_tokens`; once a call fails fatally, none starts."""

    def __init__(self, budget_usd: float | None = None) -> None:
        self.budget_usd = budget_usd
        self.spent_usd = 0.0
        self.in_flight_usd = 0.0
        self._stop: FatalTeacherError | None = None

    @property
    def stopped(self) -> FatalTeacherError | None:
        return self._stop

    async def admit(self, bound_usd: float) -> Ticket:
        if self._stop is not None:
            raise copy.copy(self._stop)
        if self.budget_usd is not None:
            committed = self.spent_usd + self.in_flight_usd
            if committed + bound_usd > self.budget_usd:
                raise BudgetExhausted(
                    f"spend ${self.spent_usd:.4f} + ${self.in_flight_usd:.4f} in flight + this "
                    f"call's bound ${bound_usd:.4f} would pass the cap ${self.budget_usd:.4f}"
                )
        self.in_flight_usd += bound_usd
        return Ticket(bound_usd)

    def settle(self, ticket: Ticket, cost_usd: float, *, answered: bool) -> None:
        self.in_flight_usd -= ticket.bound_usd
        self.spent_usd += cost_usd

    def fail(self, error: FatalTeacherError) -> None:
        self._stop = self._stop or error

    async def close(self) -> None:
        return None


class TeacherClient:
    """One HTTP client (aiohttp by default) with a bound on requests in flight, rate limits,
    retries, and a gate (the stop signal and spend cap) every call passes.

    One async client with many requests in flight is what is fast for I/O-bound teacher calls
    (ENVIRONMENT.md: 45.7 vs 3.9 rows/s for many sync actors on 2 cores). The first fatal error
    (401/403/404) stops the gate: calls waiting for a slot then raise without being sent, so a
    wrong key costs at most `max_in_flight` calls whatever the dataset size (per run, with a
    shared gate). The spend cap reserves each call's worst case (`prompt_token_bound` +
    `max_tokens` at the prices) before it starts and settles the real usage after.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None,
        api_key: Secret,
        max_in_flight: int = 32,
        timeout_s: float = 60.0,
        rpm: float | None = None,
        tpm: float | None = None,
        retry: RetryPolicy | None = None,
        sampling: Mapping[str, Any] | None = None,
        seed: int = 0,
        prices: Prices | None = None,
        budget_usd: float | None = None,
        http_client: str = "aiohttp",
        gate: CallGate | None = None,
    ) -> None:
        self.model = model
        self.sampling = dict(sampling or {})
        self.retry = retry or RetryPolicy()
        self.limiter = RateLimiter(rpm, tpm)
        self.stats = TeacherStats()
        self.prices = prices or Prices()
        self.gate: CallGate = gate if gate is not None else LocalGate(budget_usd)
        self.spent_usd = 0.0
        self.fatal: FatalTeacherError | None = None
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._rng = random.Random(seed)
        self._aiohttp: AiohttpChat | None = None
        self._client: Any = None
        if http_client == "aiohttp":
            self._aiohttp = AiohttpChat(base_url, api_key, timeout_s)
        elif http_client == "openai":
            import openai

            self._client = openai.AsyncOpenAI(
                base_url=base_url, api_key=api_key.get(), max_retries=0, timeout=timeout_s
            )
        else:
            raise ValueError(f"http_client must be openai or aiohttp, got {http_client!r}")

    async def _create(self, messages: list) -> tuple[str, int, int]:
        """One call; raises `TeacherError`s only, whichever client makes it."""
        if self._aiohttp is not None:
            return await self._aiohttp.create(self.model, messages, **self.sampling)
        try:
            resp = await self._client.chat.completions.create(
                model=self.model, messages=messages, **self.sampling
            )
        except Exception as exc:  # noqa: BLE001 - the client boundary: mapped, nothing else out
            raise teacher_error(exc) from exc
        if not resp.choices:
            raise ContentTeacherError("the reply has no choices", kind="malformed_response")
        choice = resp.choices[0]
        text = reply_text(choice.message.content if choice.message else None, choice.finish_reason)
        usage = resp.usage
        return (
            text,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    def call_bound_usd(self, messages: Sequence[Mapping[str, Any]]) -> float:
        """The most a call with `messages` can cost: the prompt's token bound, `max_tokens`."""
        if not (self.prices.prompt or self.prices.completion):
            return 0.0
        return self.prices.cost(prompt_token_bound(messages), self.sampling.get("max_tokens", 512))

    async def complete(self, messages: Sequence[Mapping[str, str]]) -> CallResult:
        """The answer, or a `CallResult` with the error that rejects the row. Raises only
        `FatalTeacherError` (the run must stop) and `BudgetExhausted` (the cap: not called)."""
        estimate = sum(len(m["content"]) for m in messages) / 4 + self.sampling.get(
            "max_tokens", 512
        )
        bound = self.call_bound_usd(messages)
        attempt = 0
        while True:
            attempt += 1
            if self.gate.stopped is not None:
                raise copy.copy(self.gate.stopped)
            await self.limiter.acquire(estimate)
            async with self._semaphore:
                try:
                    ticket = await self.gate.admit(bound)
                except BaseException:
                    self.limiter.settle(estimate, 0)
                    raise
                self.stats.calls += 1
                cost, answered = 0.0, False
                try:
                    text, pt, ct = await self._create(list(messages))
                except TeacherError as err:
                    self.limiter.settle(estimate, 0)
                    status = err.status or 0
                    answered = isinstance(err, ContentTeacherError) and 200 <= status < 300
                    if isinstance(err, FatalTeacherError):
                        self.fatal = self.fatal or err
                        self.gate.fail(err)
                        raise
                    error = err
                else:
                    self.limiter.settle(estimate, pt + ct)
                    cost, answered = self.prices.cost(pt, ct), True
                    self.spent_usd += cost
                    return CallResult(text, pt, ct, attempt)
                finally:
                    self.gate.settle(ticket, cost, answered=answered)
            self.stats.by_error[error.kind] = self.stats.by_error.get(error.kind, 0) + 1
            if not isinstance(error, TransientTeacherError) or attempt > self.retry.max_retries:
                return CallResult(None, attempts=attempt, error=error.reason)
            self.stats.retries += 1
            await asyncio.sleep(self.retry.delay(attempt - 1, error.retry_after, self._rng))

    async def close(self) -> None:
        """Close the HTTP session (every pooled connection) and the gate; safe to call twice."""
        try:
            if self._aiohttp is not None:
                await self._aiohttp.close()
            if self._client is not None:
                client, self._client = self._client, None
                await client.close()
        finally:
            await self.gate.close()
