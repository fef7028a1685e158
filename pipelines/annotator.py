"""The Ray Data actor that calls the teacher, and how it gets the API key.

The key is read from each node's environment, never passed as an argument: Ray keeps actor
arguments in its GCS. Ray ships this class to its workers by reference to this module.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pyarrow as pa

from pipelines.annotate_config import AnnotateConfig
from pipelines.journal import Journal
from pipelines.judging import teacher_row
from pipelines.prompting import Prompt
from pipelines.teacher_client import (
    BudgetExhausted,
    FatalTeacherError,
    RetryPolicy,
    Secret,
    TeacherClient,
)
from socratic.records import annotation_table, problem_from_row


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
    """

    def __init__(self, cfg: AnnotateConfig, budget_usd: float | None = None) -> None:
        self.cfg = cfg
        self.prompts: dict[str, Prompt] = {}
        self.journal = Journal(cfg.output)
        self.client = TeacherClient(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key=actor_api_key(cfg),
            max_in_flight=cfg.max_in_flight,
            timeout_s=cfg.timeout,
            rpm=cfg.rpm / cfg.actors if cfg.rpm else None,
            tpm=cfg.tpm / cfg.actors if cfg.tpm else None,
            retry=RetryPolicy(max_retries=cfg.max_retries, base_s=cfg.retry_base),
            sampling=cfg.sampling,
            seed=cfg.seed,
            prices=cfg.prices,
            budget_usd=budget_usd,
            http_client=cfg.http_client,
        )

    async def _one(self, item: dict[str, Any]) -> dict[str, Any] | None:
        p = problem_from_row(item)
        if p.answer_kind not in self.prompts:  # parse each prompt file once, not per row
            self.prompts[p.answer_kind] = self.cfg.prompt_for(p.answer_kind)
        prompt = self.prompts[p.answer_kind]
        try:
            result = await self.client.complete(prompt.messages(p, self.cfg.with_gold_solution))
        except BudgetExhausted:
            return None  # never called: no row, so the rerun does it
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
        rows = await asyncio.gather(*(self._one(item) for item in batch.to_pylist()))
        return annotation_table(r for r in rows if r is not None)


def annotator_kwargs(cfg: AnnotateConfig, budget_usd: float | None) -> dict[str, Any]:
    """What Ray stores for each actor (in the GCS): configuration, never the key."""
    return {"cfg": cfg, "budget_usd": budget_usd}
