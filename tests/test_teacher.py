"""Teacher-side pieces without the network: prompts, cache keys, judging, rate limits, backoff."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pipelines.prompting import PROMPTS_DIR, Prompt, cache_key, is_transient, judge
from pipelines.teacher_client import RateLimiter, RetryPolicy, Secret, retry_after_seconds
from socratic.adapters import DatasetSpec, load_problems
from socratic.formats import parse_unified, unified_target
from socratic.records import Problem, Step

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))
YESNO = Problem("strategyqa/dev/x", "strategyqa", "dev", "Is water wet?", "yes", "Water is wet.")


@pytest.mark.parametrize("path", sorted(PROMPTS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_prompts_load_and_their_examples_parse(path: Path) -> None:
    prompt = Prompt.load(path)
    assert prompt.version and prompt.examples
    kind = next((k for k in ("yesno", "choice", "text") if k in path.stem), "number")
    gold = {"yesno": "yes", "choice": "A", "text": "x", "number": "0"}[kind]
    for ex in prompt.examples:  # few-shot answers must be in the very format we parse
        problem = Problem("x/y/0", "x", "y", ex["question"], gold, answer_kind=kind)
        if prompt.style == "socratic":
            assert parse_unified(ex["response"])
        assert judge(problem, ex["response"], prompt.style).predicted is not None


def test_messages_end_with_the_problem_and_optional_solution() -> None:
    p = SAMPLE[0]
    prompt = Prompt.default("socratic", "number")
    msgs = prompt.messages(p, with_solution=True)
    assert msgs[0]["role"] == "system" and "Q1:" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * len(prompt.examples) + ["user"]
    assert msgs[-1]["content"].startswith(f"Problem: {p.question}\nReference solution")
    assert p.solution.splitlines()[0] in msgs[-1]["content"]
    assert prompt.messages(p, with_solution=False)[-1]["content"] == f"Problem: {p.question}"
    assert Prompt.default("socratic", "yesno").version == "socratic-yesno-v1"


def test_prompt_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("version: v\nstyle: poem\nsystem: s\nuser: 'Problem: {question}'\n")
    with pytest.raises(ValueError, match=r"p\.yaml: style must be one of"):
        Prompt.load(bad)
    bad.write_text("style: cot\nsystem: s\n")
    with pytest.raises(ValueError, match="lacks version, user"):
        Prompt.load(bad)


def test_cache_key_changes_with_everything_that_shapes_a_call() -> None:
    base = dict(
        model="m",
        messages=[{"role": "user", "content": "Problem: x"}],
        sampling={"temperature": 0.0, "max_tokens": 8},
        prompt_version="v1",
        problem_id="d/s/0",
        sample=0,
    )
    key = cache_key(**base)
    assert key == cache_key(**base)
    variants = [
        {"model": "m2"},
        {"messages": [{"role": "user", "content": "Problem: y"}]},
        {"sampling": {"temperature": 0.7, "max_tokens": 8}},
        {"prompt_version": "v2"},
        {"problem_id": "d/s/1"},
        {"sample": 1},
    ]
    assert len({cache_key(**{**base, **v}) for v in variants} | {key}) == len(variants) + 1


def test_judge() -> None:
    p = SAMPLE[0]
    ok = judge(p, unified_target(p.steps), "socratic")
    assert (ok.status, ok.reason, ok.predicted, ok.steps) == ("accepted", None, p.answer, p.steps)
    wrong = unified_target([*p.steps[:-1], Step(p.steps[-1].question, "It is 999999.")])
    assert judge(p, wrong, "socratic").reason == "wrong_answer"
    assert judge(p, "Sure, let me think.", "socratic").reason == "unparseable"
    assert judge(p, "  ", "socratic").reason == "empty_response"
    assert judge(p, f"some steps\nAnswer: {p.answer}", "cot").status == "accepted"
    assert judge(p, "some steps, no final line", "cot").reason == "unparseable"
    yes = judge(YESNO, "Q1: Is water a liquid?\nA1: It is. So the answer is yes.", "socratic")
    assert yes.status == "accepted"


def test_transient_reasons() -> None:
    for r in [
        "api_error: 429: slow down",
        "api_error: 503: x",
        "api_error: timeout: t",
        "api_error: connection: reset",
        "api_error: 502: bad gateway",
    ]:
        assert is_transient(r), r
    for r in [None, "wrong_answer", "unparseable", "api_error: 400: bad", "api_error: 404: no"]:
        assert not is_transient(r), r


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds(
        {"retry-after": "Wed, 25 Nov 2026 10:00:10 GMT"}, now=1795600800.0
    ) == pytest.approx(10.0)
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds(None) is None


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=8.0, max_retry_after_s=30.0)
    rng = random.Random(0)
    for attempt in range(6):
        d = policy.delay(attempt, None, rng)
        assert 0 <= d <= min(8.0, 2**attempt)
    assert policy.delay(0, 5.0, rng) >= 5.0
    assert policy.delay(0, 500.0, rng) == 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_rate_limiter_bounds_requests_and_tokens_per_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=6000, clock=clock, sleep=clock.sleep)

    async def go() -> None:
        for _ in range(120):
            await limiter.acquire(10)

    asyncio.run(go())
    # A full bucket of 60 goes at once; the other 60 are paced at one per second.
    assert clock.now == pytest.approx(60.0)
    clock2 = FakeClock()
    tokens = RateLimiter(rpm=None, tpm=600, clock=clock2, sleep=clock2.sleep)

    async def big() -> None:
        for _ in range(4):
            await tokens.acquire(300)  # 1200 tokens against 600/min: 600 up front, 600 paced

    asyncio.run(big())
    assert clock2.now == pytest.approx(60.0)
    tokens.settle(estimated=300, actual=900)  # the provider counted more than we guessed
    assert tokens._tokens == pytest.approx(-600.0)


def test_secret_never_prints() -> None:
    s = Secret("sk-live-123")
    assert "sk-live" not in repr(s) and "sk-live" not in str(s) and "sk-live" not in f"{s}"
    assert s.get() == "sk-live-123"
