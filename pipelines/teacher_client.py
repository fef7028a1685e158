"""The teacher client: one `AsyncOpenAI` with bounded calls in flight, rate limits, retries.

Any OpenAI-compatible endpoint works (OpenAI, vLLM, our own `serve/local_teacher.py`): calls go
through the `openai` client with its own retries off (`max_retries=0`), because the retries are
ours: we count them, honour `Retry-After`, back off with jitter, and turn a call that still fails
into a rejected row with its reason instead of an exception that kills the job. A refused key or
an unknown model (401/403/404) stops everything, since every later call would fail the same way.
What to ask and how to judge the answer lives in `pipelines/prompting.py`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class FatalTeacherError(RuntimeError):
    """The endpoint refused our credentials or model: stop the job, every call would fail."""


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


def fatal_for(code: int, message: str) -> FatalTeacherError | None:
    """The error that stops a run for an HTTP status no retry can fix (401, 403, 404)."""
    if code in (401, 403):
        return FatalTeacherError(
            f"the teacher endpoint refused the request ({code}): {message}. "
            "Check the API key variable (--api-key-env) and the model name."
        )
    if code == 404:
        return FatalTeacherError(
            f"the teacher endpoint answered 404: {message}. Check --model and --base-url "
            "(an OpenAI-compatible base URL usually ends in /v1)."
        )
    return None


def classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """(kind, retryable, retry_after) for an exception the openai client (or aiohttp) raised."""
    import openai

    if isinstance(exc, (HTTPStatusFailure, openai.APIStatusError)):
        code = exc.status_code
        fatal = fatal_for(code, error_message(exc))
        if fatal is not None:
            # A wrong key, model name or base URL fails every call alike. Rejecting each row
            # instead would also make a rerun skip them all (404 is not transient) after the fix.
            raise fatal from None
        if isinstance(exc, HTTPStatusFailure):
            if 200 <= code < 300:
                return "malformed_response", False, None
            headers: Mapping[str, str] | None = {k.lower(): v for k, v in exc.headers.items()}
        else:
            headers = exc.response.headers if exc.response else None
        return str(code), code in (408, 409, 429) or code >= 500, retry_after_seconds(headers)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, openai.APITimeoutError)):
        return "timeout", True, None
    if type(exc).__module__.startswith("aiohttp") or isinstance(exc, openai.APIConnectionError):
        return "connection", True, None
    return type(exc).__name__, False, None


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


class HTTPStatusFailure(Exception):
    """A non-2xx reply on the aiohttp path, with what `classify` needs from it."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code, self.headers, self.body = status, headers, body


class AiohttpChat:
    """Chat completions over one `aiohttp` session: the OpenAI wire protocol, nothing else.

    Measured on 2 loaded cores against the 200 ms test server, 64 in flight: 0.32 ms of CPU per
    call, against 4.4 ms for `openai.AsyncOpenAI` (3.1 ms with its aiohttp transport): the
    client's request building and pydantic parsing, not the network, were the pipeline's CPU
    per row. Opt-in (`--http-client aiohttp`) where thousands of calls per second matter.
    """

    def __init__(self, base_url: str | None, api_key: Secret, timeout_s: float) -> None:
        self.url = (base_url or "https://api.openai.com/v1").rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key.get()}"}
        self._timeout_s = timeout_s
        self._session: Any = None

    async def create(self, model: str, messages: list, **sampling: Any) -> tuple[str, int, int]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(limit=0),
            )
        payload = {"model": model, "messages": messages, **sampling}
        async with self._session.post(self.url, json=payload) as r:
            try:
                body = await r.json(content_type=None)
            except ValueError:
                body = None
            if r.status >= 400 or not isinstance(body, dict):
                raise HTTPStatusFailure(r.status, dict(r.headers), body)
        choices = body.get("choices") or [{}]
        usage = body.get("usage") or {}
        text = (choices[0].get("message") or {}).get("content") or ""
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class BudgetExhausted(RuntimeError):
    """The spend cap (`--max-cost-usd`) is reached: no new call starts; the row stays to do."""


@dataclass(frozen=True)
class Prices:
    """USD per million prompt and completion tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


class TeacherClient:
    """One `AsyncOpenAI` client with a bound on requests in flight, rate limits and retries.

    One async client with many requests in flight is what is fast for I/O-bound teacher calls
    (ENVIRONMENT.md: 45.7 vs 3.9 rows/s for many sync actors on 2 cores). The first fatal status
    (401/403/404) stops the client: calls waiting for a slot then raise without being sent, so a
    wrong key costs at most `max_in_flight` calls whatever the dataset size. A spend cap works
    the same way, counted from the usage each reply reports: calls already in flight finish
    (they are paid for), no new one starts.
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
        http_client: str = "openai",
    ) -> None:
        import openai

        self.model = model
        self.sampling = dict(sampling or {})
        self.retry = retry or RetryPolicy()
        self.limiter = RateLimiter(rpm, tpm)
        self.stats = TeacherStats()
        self.prices = prices or Prices()
        self.budget_usd = budget_usd
        self.spent_usd = 0.0
        self.fatal: FatalTeacherError | None = None
        self._semaphore = asyncio.Semaphore(max_in_flight)
        self._rng = random.Random(seed)
        self._aiohttp = None
        if http_client == "aiohttp":
            self._aiohttp = AiohttpChat(base_url, api_key, timeout_s)
        elif http_client != "openai":
            raise ValueError(f"http_client must be openai or aiohttp, got {http_client!r}")
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key.get(), max_retries=0, timeout=timeout_s
        )

    async def _create(self, messages: list) -> tuple[str, int, int]:
        if self._aiohttp is not None:
            return await self._aiohttp.create(self.model, messages, **self.sampling)
        resp = await self._client.chat.completions.create(
            model=self.model, messages=messages, **self.sampling
        )
        usage = resp.usage
        text = resp.choices[0].message.content if resp.choices else None
        return (
            text or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    def _check_can_start(self) -> None:
        if self.fatal is not None:
            raise FatalTeacherError(str(self.fatal))
        if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
            raise BudgetExhausted(
                f"spend ${self.spent_usd:.4f} reached the cap ${self.budget_usd:.4f}"
            )

    async def complete(self, messages: Sequence[Mapping[str, str]]) -> CallResult:
        estimate = sum(len(m["content"]) for m in messages) / 4 + self.sampling.get(
            "max_tokens", 512
        )
        attempt = 0
        while True:
            attempt += 1
            self._check_can_start()
            await self.limiter.acquire(estimate)
            async with self._semaphore:
                self._check_can_start()  # checked again: a call may have failed while we waited
                self.stats.calls += 1
                try:
                    text, pt, ct = await self._create(list(messages))
                except Exception as exc:  # noqa: BLE001 - each failure is classified below
                    try:
                        kind, retryable, retry_after = classify(exc)
                    except FatalTeacherError as fatal:
                        self.fatal = self.fatal or fatal
                        raise
                    self.limiter.settle(estimate, 0)
                    error = f"api_error: {kind}: {error_message(exc)}"
                else:
                    self.limiter.settle(estimate, pt + ct)
                    self.spent_usd += self.prices.cost(pt, ct)
                    return CallResult(text, pt, ct, attempt)
            self.stats.by_error[kind] = self.stats.by_error.get(kind, 0) + 1
            if not retryable or attempt > self.retry.max_retries:
                return CallResult(None, attempts=attempt, error=error)
            self.stats.retries += 1
            await asyncio.sleep(self.retry.delay(attempt - 1, retry_after, self._rng))

    async def close(self) -> None:
        if self._aiohttp is not None:
            await self._aiohttp.close()
        await self._client.close()
