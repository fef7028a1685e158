"""The replica's greedy batcher, on a real event loop with a blocking fake model (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve.batching import GreedyBatcher


class SlowModel:
    """Upper-cases its inputs after `delay_s`, recording each batch; can be told to fail."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s, self.batches, self.fail = delay_s, [], False
        self.running = threading.Event()

    def __call__(self, items: list[str]) -> list[str]:
        self.running.set()
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return [x.upper() for x in items]


def test_a_lone_call_starts_at_once() -> None:
    model = SlowModel(delay_s=0.0)
    batcher = GreedyBatcher(model, max_batch_size=8)

    async def go() -> float:
        t = time.perf_counter()
        assert await batcher("a") == "A"
        return time.perf_counter() - t

    assert asyncio.run(go()) < 0.05
    assert batcher.size_counts == {1: 1}


def test_calls_that_queue_while_the_model_runs_form_the_next_batch() -> None:
    model = SlowModel(delay_s=0.1)
    heard: list[tuple[int, int]] = []
    batcher = GreedyBatcher(
        model, max_batch_size=4, on_batch=lambda n, waits: heard.append((n, len(waits)))
    )

    async def go() -> list[str]:
        first = asyncio.create_task(batcher("a"))
        await asyncio.to_thread(model.running.wait)  # the model is busy with ["a"]
        rest = [asyncio.create_task(batcher(x)) for x in "bcdefg"]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(go()) == list("ABCDEFG")  # each caller gets its own result
    assert model.batches == [["a"], ["b", "c", "d", "e"], ["f", "g"]]
    assert batcher.size_counts == {1: 1, 4: 1, 2: 1}  # bounded: one key per batch size
    assert (batcher.calls, batcher.batches) == (7, 3)
    assert heard == [(1, 1), (4, 4), (2, 2)]


def test_a_failed_batch_fails_its_callers_only() -> None:
    model = SlowModel(delay_s=0.05)
    batcher = GreedyBatcher(model, max_batch_size=2)

    async def go() -> tuple[list, str]:
        model.fail = True
        results = await asyncio.gather(batcher("a"), batcher("b"), return_exceptions=True)
        model.fail = False
        return results, await batcher("c")

    results, after = asyncio.run(go())
    assert [str(r) for r in results] == ["model exploded", "model exploded"]
    assert after == "C"  # the batcher keeps serving after a failure


def test_a_cancelled_caller_is_dropped_before_its_batch() -> None:
    model = SlowModel(delay_s=0.1)
    batcher = GreedyBatcher(model, max_batch_size=8)

    async def go() -> list[str]:
        first = asyncio.create_task(batcher("a"))
        await asyncio.to_thread(model.running.wait)
        gone = asyncio.create_task(batcher("gone"))
        kept = asyncio.create_task(batcher("b"))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(first, kept)

    assert asyncio.run(go()) == ["A", "B"]
    assert model.batches == [["a"], ["b"]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        GreedyBatcher(SlowModel(), max_batch_size=0)
