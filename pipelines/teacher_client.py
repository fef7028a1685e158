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


def _classify(exc: BaseException) -> tuple[str, bool, float | None]:
    """(kind, retryable, retry_after) for an exception the openai client raised."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        raise FatalTeacherError(
            f"the teacher endpoint refused the request ({exc.status_code}): {_message(exc)}. "
            "Check the API key variable (--api-key-env) and the model name."
        ) from None
    if isinstance(exc, openai.NotFoundError):
        # A wrong model name or base URL fails every call alike. Rejecting each row instead
        # would also make a rerun skip them all (404 is not transient) after the fix.
        raise FatalTeacherError(
            f"the teacher endpoint answered 404: {_message(exc)}. Check --model and --base-url "
            "(an OpenAI-compatible base URL usually ends in /v1)."
        ) from None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True, None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", True, None
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        retry_after = retry_after_seconds(exc.response.headers if exc.response else None)
        return str(code), code in (408, 409, 429) or code >= 500, retry_after
    return type(exc).__name__, False, None


def _message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


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
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key.get(), max_retries=0, timeout=timeout_s
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
                    resp = await self._client.chat.completions.create(
                        model=self.model, messages=list(messages), **self.sampling
                    )
                except Exception as exc:  # noqa: BLE001 - each failure is classified below
                    try:
                        kind, retryable, retry_after = _classify(exc)
                    except FatalTeacherError as fatal:
                        self.fatal = self.fatal or fatal
                        raise
                    self.limiter.settle(estimate, 0)
                    error = f"api_error: {kind}: {_message(exc)}"
                else:
                    usage = resp.usage
                    pt = usage.prompt_tokens if usage else 0
                    ct = usage.completion_tokens if usage else 0
                    self.limiter.settle(estimate, pt + ct)
                    self.spent_usd += self.prices.cost(pt, ct)
                    text = resp.choices[0].message.content if resp.choices else None
                    return CallResult(text or "", pt, ct, attempt)
            self.stats.by_error[kind] = self.stats.by_error.get(kind, 0) + 1
            if not retryable or attempt > self.retry.max_retries:
                return CallResult(None, attempts=attempt, error=error)
            self.stats.retries += 1
            await asyncio.sleep(self.retry.delay(attempt - 1, retry_after, self._rng))

    async def close(self) -> None:
        await self._client.close()
