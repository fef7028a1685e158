"""Greedy batching for a model replica: whatever queued while the model was busy is the next batch.

Why not `@serve.batch`: in Ray 2.60 its loop forms the next batch while the current one is still
running, from the calls that arrive within `batch_wait_timeout_s` of the first, and parks it
behind the running one. Under load the batches stay near arrival rate x timeout (a mean of ~2
at 32 clients, measured in benchmarks/serve_load.py), and a call to an idle model always waits
the full timeout. Here the model takes the whole backlog (up to `max_batch_size`) the moment it
is free, and an idle model starts at once: batches grow with load, and a lone call waits for
nothing. `batch_wait_timeout_s` (default 0) is an optional pause before a partial batch, for
models whose batches are much cheaper per item than single calls.

What it saw is bounded: totals and a count per batch size (at most `max_batch_size` keys), and
an `on_batch(size, waits_s)` hook for metrics (the replica sends them to `ray.serve.metrics`).
A list of every batch would grow for as long as the replica lives.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class GreedyBatcher(Generic[In, Out]):
    """Coalesces concurrent `await batcher(item)` calls into calls of `fn(items) -> outs`.

    `fn` is blocking (a model's `generate`) and runs in a thread, so the replica's event loop
    keeps accepting calls, which queue up for the next batch meanwhile. One batch runs at a
    time. An exception from `fn` goes to every caller of that batch; a caller that gave up
    (cancelled) is dropped before its batch starts. `on_batch(size, waits_s)` hears each batch
    as it starts, with how long each of its calls queued."""

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.on_batch = on_batch
        self.size_counts: Counter[int] = Counter()  # batch size -> batches of that size
        self._pending: list[tuple[In, asyncio.Future[Out], float]] = []
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self, item: In) -> Out:
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut, time.perf_counter()))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while True:
            if self.batch_wait_timeout_s and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_timeout_s)
            self._pending = [p for p in self._pending if not p[1].done()]
            if not self._pending:
                return
            batch = self._pending[: self.max_batch_size]
            del self._pending[: len(batch)]
            self.size_counts[len(batch)] += 1
            if self.on_batch is not None:
                now = time.perf_counter()
                self.on_batch(len(batch), [now - t for _, _, t in batch])
            try:
                outs = await asyncio.to_thread(self.fn, [x for x, _, _ in batch])
                if len(outs) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(outs)} results")
            except Exception as e:  # noqa: BLE001 - each caller of this batch gets the error
                for _, f, _ in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f, _), out in zip(batch, outs, strict=True):
                if not f.done():
                    f.set_result(out)

    @property
    def calls(self) -> int:
        return sum(k * n for k, n in self.size_counts.items())

    @property
    def batches(self) -> int:
        return sum(self.size_counts.values())
