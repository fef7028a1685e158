"""The Ray Data actor that calls the teacher, and how it gets the API key.

The key is read from each node's environment, never passed as an argument: Ray keeps actor
arguments in its GCS. Ray ships this class to its workers by reference to this module.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from typing import Any

import pyarrow as pa

from pipelines.annotate_config import AnnotateConfig
from pipelines.journal import Journal
from pipelines.judging import teacher_row
from pipelines.prompting import Prompt
from pipelines.run_ledger import LedgerRef
from pipelines.teacher_client import (
    BudgetExhausted,
    FatalTeacherError,
    RetryPolicy,
    Secret,
    TeacherClient,
)
from socratic.records import annotation_table, problem_from_row

log = logging.getLogger("annotate")
CLOSE_TIMEOUT_S = 5.0  # for closing the client at actor exit


def check_api_key(cfg: AnnotateConfig) -> None:
    """Fail before any work when the driver's environment lacks the key (the actors read it
    from their node's environment themselves; it is never passed to them)."""
    if not os.environ.get(cfg.api_key_env) and cfg.base_url is None:
        raise SystemExit(
            f"error: ${cfg.api_key_env} is not set. Export your API key there, or pass "
            "--api-key-env NAME, or --base-url for an endpoint that needs no key."
        )


def actor_api_key(cfg: AnnotateConfig) -> Secret:
    """The key from this node's environment: never a constructor argument, which Ray keeps in
    its GCS (and shows in the dashboard) for as long as the actor lives."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return Secret(key)
    if cfg.base_url is None:
        raise FatalTeacherError(
            f"${cfg.api_key_env} is not set on this Ray node ({os.uname().nodename}): set it in "
            "the environment of every node that runs annotation actors"
        )
    return Secret("EMPTY")  # local OpenAI-compatible servers (vLLM, ours) accept any key


class TeacherAnnotator:
    """Ray Data actor: many teacher calls in flight on one event loop (I/O bound, not CPU).

    Every finished row goes to the journal before it is returned, so an answer is durable the
    moment it arrives rather than when Ray Data has written the whole block.

    With the run's ledger (`ledger`, `pipelines/run_ledger.py`) every call passes the run's one
    stop signal and spend cap. A fatal error (or a key missing on this node) then stops the
    run's calls everywhere, and the actor's batches end without rows for the calls not made:
    the chunk drains, and the driver raises the ledger's error, typed. Without one (a direct,
    in-process use) the gate is this actor's own, and the error is raised from `__call__`.

    `close()` closes the HTTP session and gives back what the gate holds. Ray Data has no end
    hook for a callable class but its destructor: on a graceful actor exit it drops the instance
    (`_MapWorker.__ray_shutdown__`), so `__del__` runs `close()` on the loop the calls ran on.
    Else aiohttp reports its session and every pooled connection as unclosed on stderr.
    """

    def __init__(self, cfg: AnnotateConfig, ledger: LedgerRef | None = None) -> None:
        self.cfg = cfg
        self.prompts: dict[str, Prompt] = {}
        self.journal = Journal(cfg.output)
        self._ledger = ledger
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        gate = ledger.gate(block_calls=cfg.max_in_flight) if ledger is not None else None
        try:
            key = actor_api_key(cfg)
        except FatalTeacherError as e:
            if gate is None:
                raise
            # Raised here, Ray would hand the driver only its text (ActorDiedError): the
            # ledger carries it instead, typed, and every call is refused.
            gate.fail(e)
            key = Secret("")
        self.client = TeacherClient(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key=key,
            max_in_flight=cfg.max_in_flight,
            timeout_s=cfg.timeout,
            rpm=cfg.rpm / cfg.actors if cfg.rpm else None,
            tpm=cfg.tpm / cfg.actors if cfg.tpm else None,
            retry=RetryPolicy(max_retries=cfg.max_retries, base_s=cfg.retry_base),
            sampling=cfg.sampling,
            seed=cfg.seed,
            prices=cfg.prices,
            budget_usd=cfg.max_cost_usd,
            http_client=cfg.http_client,
            gate=gate,
        )

    async def _one(self, item: dict[str, Any]) -> dict[str, Any] | None:
        p = problem_from_row(item)
        if p.answer_kind not in self.prompts:  # parse each prompt file once, not per row
            self.prompts[p.answer_kind] = self.cfg.prompt_for(p.answer_kind)
        prompt = self.prompts[p.answer_kind]
        try:
            result = await self.client.complete(prompt.messages(p, self.cfg.with_gold_solution))
        except FatalTeacherError:  # the run stops (BudgetExhausted: the cap): no row, so the
            return None  # rerun does it
        row = teacher_row(
            self.cfg,
            p,
            item,
            result,
            teacher=self.cfg.model,
            prompt_version=prompt.version,
            style=prompt.style,
        )
        self.journal.add(row)
        return row

    async def __call__(self, batch: pa.Table) -> pa.Table:
        self._loop = asyncio.get_running_loop()
        stop = self.client.gate.stopped
        if stop is None:
            rows = await asyncio.gather(*(self._one(item) for item in batch.to_pylist()))
            stop = self.client.gate.stopped
        else:
            rows = []  # stopped: the rest of the chunk drains without a call
        if stop is not None and self._ledger is None and not isinstance(stop, BudgetExhausted):
            raise copy.copy(stop)
        return annotation_table(r for r in rows if r is not None)

    async def close(self) -> None:
        """Close the client (its HTTP session, its gate) and the journal; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.client.close()
        finally:
            self.journal.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                self._closed = True  # no call ever ran on a loop that is still there
                self.journal.close()
                return
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                loop.create_task(self.close())
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout=CLOSE_TIMEOUT_S)
            else:
                loop.run_until_complete(self.close())
        except Exception as e:  # noqa: BLE001 - a destructor must not raise
            log.warning("closing the teacher client at actor exit failed: %s", e)


def annotator_kwargs(cfg: AnnotateConfig, ledger: LedgerRef | None) -> dict[str, Any]:
    """What Ray stores for each actor (in the GCS): configuration and the ledger's handle,
    never the key."""
    return {"cfg": cfg, "ledger": ledger}
