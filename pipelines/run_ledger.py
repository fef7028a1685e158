"""One annotation run's shared stop signal and spend: a small Ray actor every annotator asks.

A gate per actor (`teacher_client.LocalGate`) let N actors make N x `--max-in-flight` calls with
a wrong key, and overshoot the cap by the calls in flight in every actor. The driver therefore
starts one `RunLedger` per run (`start_ledger`) and hands its handle to the annotator actors,
each of which passes every call through a `LedgerGate` on it. The ledger holds:

* the stop error: the first `FatalTeacherError` any actor met (the object itself, pickled with
  its fields). Every later call anywhere is refused, and the driver raises that error once the
  chunk's Ray Data run has drained: typed, never parsed out of Ray's exception messages.
* probe slots: until one reply has shown that the key and model work (`verified`), at most
  `probe_limit` (`--max-in-flight`) calls are in flight in the whole run, so a wrong key costs
  at most that many calls however many actors there are.
* the money: what was spent (as reported) plus what each actor holds (its calls in flight at
  their bound, and an allowance not yet given to a call) never passes the cap. A call starts
  only once its bound (`TeacherClient.call_bound_usd`) is held, and settles its real cost after.

Cost: no round trip per call. An actor asks for probe slots only until the key is verified,
reserves money a block of calls at a time (a share of what is left, down to one call near the
cap), and reports its spend and learns a stop in one round trip every `SYNC_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any

from pipelines.teacher_client import BudgetExhausted, FatalTeacherError, Ticket

log = logging.getLogger("annotate.ledger")

SYNC_S = 0.5  # how often an actor reports its spend and learns of a stop, without a call needing it


class LedgerBook:
    """The ledger's arithmetic, without Ray (so it can be tested and reasoned about alone)."""

    def __init__(self, cap_usd: float | None, probe_limit: int) -> None:
        self.cap_usd = cap_usd
        self.probe_limit = probe_limit
        self.spent_usd = 0.0
        self.held: dict[str, float] = {}  # per actor: bounds of its calls in flight + allowance
        self.verified = False
        self.probes = 0
        self.stop: FatalTeacherError | None = None
        self.cap_reached = False
        self.epoch = 0  # chunks ended: reports from an earlier chunk's actors are stale
        self.calls: dict[str, int] = {}

    def room(self) -> float:
        if self.cap_usd is None:
            return math.inf
        return self.cap_usd - self.spent_usd - sum(self.held.values())

    def report(self, client: str, epoch: int, spent_delta: float, held: float | None) -> bool:
        """An actor's spend since its last report and what it holds now (None: it is done).
        False for a stale report (an earlier chunk's actor, counted from Parquet already)."""
        if epoch != self.epoch:
            return False
        self.spent_usd += spent_delta
        if held is None:
            self.held.pop(client, None)
        else:
            self.held[client] = held
        return True

    def reserve(self, client: str, need: float, want: float) -> float:
        """Money for `client`'s next calls: at least `need` (or 0: refused, the cap is reached),
        at most `want`, and no more than a share of what is left, so that near the cap every
        actor still gets its calls one at a time rather than one actor holding it all."""
        room = self.room()
        if need > room + 1e-12:
            self.cap_reached = True
            return 0.0
        share = room / (2 * (len(self.held) + (client not in self.held)))
        grant = min(room, want, max(need, share))
        self.held[client] = self.held.get(client, 0.0) + grant
        return grant

    def end_chunk(self, spent_usd: float | None) -> None:
        """A chunk's Ray Data run is over: its actors hold nothing any more, and what they paid
        is in Parquet (`spent_usd`, counted by the driver), which a lost report cannot miss."""
        self.held.clear()
        if spent_usd is not None:
            self.spent_usd = max(self.spent_usd, spent_usd)
        self.epoch += 1

    def state(self) -> dict[str, Any]:
        return {
            "stop": self.stop,
            "cap_reached": self.cap_reached,
            "spent_usd": self.spent_usd,
            "held_usd": sum(self.held.values()),
            "verified": self.verified,
            "probes": self.probes,
            "epoch": self.epoch,
            "calls": dict(self.calls),
        }


class RunLedger:
    """The Ray actor (async, zero CPUs) around a `LedgerBook`; see the module docstring."""

    def __init__(self, cap_usd: float | None, probe_limit: int) -> None:
        self.book = LedgerBook(cap_usd, probe_limit)
        self._changed = asyncio.Condition()

    def _count(self, name: str) -> None:
        self.book.calls[name] = self.book.calls.get(name, 0) + 1

    async def probe(self) -> tuple[str, FatalTeacherError | None]:
        """`verified` (no slot needed), `slot` (one of the probe slots, to give back with
        `end_probe`) or `stopped`; waits while every slot is out and nothing is known yet."""
        self._count("probe")
        book = self.book
        async with self._changed:
            while True:
                if book.stop is not None:
                    return "stopped", book.stop
                if book.verified:
                    return "verified", None
                if book.probes < book.probe_limit:
                    book.probes += 1
                    return "slot", None
                await self._changed.wait()

    async def end_probe(self, answered: bool, stop: FatalTeacherError | None = None) -> None:
        """A probe slot given back; `stop`, the fatal error that call met, is set in the same
        step. Ray does not keep an async actor's calls in the order they were sent, so a
        separate `stop` could arrive after a waiting probe had taken the freed slot: one call
        more than `--max-in-flight` with a wrong key (seen in CI)."""
        self._count("end_probe")
        async with self._changed:
            self.book.probes -= 1
            self.book.verified = self.book.verified or answered
            if stop is not None and self.book.stop is None:
                self.book.stop = stop
                log.error("run stopped: %s", stop)
            self._changed.notify_all()

    async def stop(self, error: FatalTeacherError) -> None:
        self._count("stop")
        async with self._changed:
            if self.book.stop is None:
                self.book.stop = error
                log.error("run stopped: %s", error)
            self._changed.notify_all()

    async def reserve(
        self, client: str, epoch: int, need: float, want: float, spent_delta: float, held: float
    ) -> tuple[float, FatalTeacherError | None]:
        self._count("reserve")
        if not self.book.report(client, epoch, spent_delta, held):
            return 0.0, self.book.stop
        return self.book.reserve(client, need, want), self.book.stop

    async def sync(
        self, client: str, epoch: int, spent_delta: float, held: float | None
    ) -> FatalTeacherError | None:
        self._count("sync")
        self.book.report(client, epoch, spent_delta, held)
        return self.book.stop

    async def end_chunk(self, spent_usd: float | None) -> dict[str, Any]:
        self.book.end_chunk(spent_usd)
        return self.book.state()

    async def state(self) -> dict[str, Any]:
        return self.book.state()


@dataclass(frozen=True)
class LedgerRef:
    """What an annotator actor gets (in its constructor arguments): the ledger's handle, the
    chunk it belongs to, and whether money is counted."""

    handle: Any
    epoch: int
    capped: bool

    def gate(self, block_calls: int) -> LedgerGate:
        return LedgerGate(
            self.handle, epoch=self.epoch, capped=self.capped, block_calls=block_calls
        )


def ledger_name(output: str) -> str:
    """`annotate-ledger-<output hash>-<random>`: which run it serves, in `ray list actors`."""
    digest = hashlib.sha256(output.encode()).hexdigest()[:12]
    return f"annotate-ledger-{digest}-{uuid.uuid4().hex[:6]}"


def start_ledger(output: str, cap_usd: float | None, probe_limit: int) -> Any:
    """The run's ledger actor (owned by the driver: it dies with it). Kill it at the run's end."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=1000)(RunLedger)
    return actor.options(name=ledger_name(output)).remote(cap_usd, probe_limit)


class LedgerGate:
    """An annotator's `CallGate` on the run's ledger (`teacher_client.CallGate`).

    Locally it keeps what the ledger granted and not yet given to a call (`available`), the
    bounds of its calls in flight (`in_flight`) and the spend not yet reported (`unreported`);
    `available + in_flight` is what the ledger counts as held by it, so the ledger's spent + held
    is never less than the truth between two reports.
    """

    def __init__(self, ledger: Any, *, epoch: int, capped: bool, block_calls: int) -> None:
        self._ledger = ledger
        self._epoch = epoch
        self._capped = capped
        self._block_calls = max(1, block_calls)
        self.client_id = uuid.uuid4().hex[:12]
        self._stop: FatalTeacherError | None = None
        self._verified = False
        self._probe_lock = asyncio.Lock()
        self._money_lock = asyncio.Lock()
        self.available = 0.0
        self.in_flight = 0.0
        self.unreported = 0.0
        self.cap_reached = False
        self.round_trips = 0
        self._sync_task: asyncio.Task | None = None
        self._closed = False

    @property
    def stopped(self) -> FatalTeacherError | None:
        return self._stop

    def _learn(self, stop: FatalTeacherError | None) -> None:
        if stop is not None and self._stop is None:
            self._stop = stop

    def _raise_if_stopped(self) -> None:
        if self._stop is not None:
            raise copy.copy(self._stop)

    async def admit(self, bound_usd: float) -> Ticket:
        self._raise_if_stopped()
        if self._sync_task is None and not self._closed:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        probe = False
        if not self._verified:
            probe = await self._probe()
        try:
            if self._capped and bound_usd > 0:
                await self._reserve(bound_usd)
        except BaseException:
            if probe:
                self._ledger.end_probe.remote(False, self._stop)
            raise
        self.in_flight += bound_usd
        return Ticket(bound_usd, probe)

    async def _probe(self) -> bool:
        async with self._probe_lock:  # one request to the ledger at a time; the rest wait here
            if self._verified:
                return False
            self._raise_if_stopped()
            self.round_trips += 1
            answer, stop = await self._ledger.probe.remote()
            self._learn(stop)
            self._raise_if_stopped()
            if answer == "verified":
                self._verified = True
                return False
            return True

    async def _reserve(self, bound: float) -> None:
        if self.available >= bound:
            self.available -= bound
            return
        async with self._money_lock:
            while self.available < bound:
                if self.cap_reached:
                    raise BudgetExhausted("the run's --max-cost-usd is reached")
                need = bound - self.available
                want = max(need, bound * self._block_calls - self.available)
                delta, self.unreported = self.unreported, 0.0
                held = self.available + self.in_flight
                self.round_trips += 1
                grant, stop = await self._ledger.reserve.remote(
                    self.client_id, self._epoch, need, want, delta, held
                )
                self._learn(stop)
                self._raise_if_stopped()
                if grant <= 0:
                    self.cap_reached = True
                    raise BudgetExhausted(
                        "the run's --max-cost-usd is reached: the spend so far, the calls in "
                        "flight at their bound and this call's bound would pass it"
                    )
                self.available += grant
            self.available -= bound

    def settle(self, ticket: Ticket, cost_usd: float, *, answered: bool) -> None:
        self.in_flight -= ticket.bound_usd
        self.unreported += cost_usd
        self.available += max(0.0, ticket.bound_usd - cost_usd)
        if ticket.probe:
            self._verified = self._verified or answered
            self._ledger.end_probe.remote(answered, self._stop)

    def fail(self, error: FatalTeacherError) -> None:
        if self._stop is None:
            self._stop = error
            self._ledger.stop.remote(error)

    async def _sync(self, final: bool = False) -> None:
        async with self._money_lock:  # after a reserve's grant is counted here, never before
            delta, self.unreported = self.unreported, 0.0
            held = None if final else self.available + self.in_flight
            self.round_trips += 1
            stop = await self._ledger.sync.remote(self.client_id, self._epoch, delta, held)
        self._learn(stop)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the ledger gone (the run ended): stop syncing
                log.debug("ledger sync failed (%s); no more syncs", e)
                return

    async def close(self) -> None:
        """Report the last spend and give back what is held (the run's other actors may use
        it); safe to call twice, and harmless once the ledger is gone."""
        if self._closed:
            return
        self._closed = True
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sync_task
        try:
            await self._sync(final=True)
        except Exception as e:  # noqa: BLE001 - the ledger gone: the driver counts from Parquet
            log.debug("final ledger sync failed: %s", e)
