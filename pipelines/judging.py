"""Annotation rows from answers: a teacher reply or the dataset's own steps, judged alike.

One module for the online path (`pipelines/annotator.py`), the Batch API
(`pipelines/batch_api.py`) and `--mode gold`, so that a row means the same whichever wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa

from pipelines.annotate_config import GOLD_TEACHER, AnnotateConfig
from pipelines.prompting import NO_GOLD_STEPS, WRONG_STEP, check_steps, decomposition_id, judge
from pipelines.teacher_client import CallResult
from socratic.formats import unified_target
from socratic.records import REJECTED, Problem, annotation_row, annotation_table, problem_from_row


def gold_batch(batch: pa.Table) -> pa.Table:
    """`--mode gold`: the dataset's own decomposition, judged like a teacher's would be."""
    rows = []
    for item in batch.to_pylist():
        p = problem_from_row(item)
        common = dict(
            sample=item["sample"],
            teacher=GOLD_TEACHER,
            prompt_version=GOLD_TEACHER,
            style="socratic",
            cache_key=item["cache_key"],
        )
        if not p.steps:
            rows.append(
                annotation_row(
                    p, steps=(), predicted=None, status=REJECTED, reason=NO_GOLD_STEPS, **common
                )
            )
            continue
        text = unified_target(p.steps)
        v = judge(p, text, "socratic")
        rows.append(
            annotation_row(
                p,
                steps=p.steps,
                predicted=v.predicted,
                status=v.status,
                reason=v.reason,
                raw=text,
                decomposition=decomposition_id(p.steps),
                **common,
            )
        )
    return annotation_table(rows)


def with_kind(cfg: AnnotateConfig, p: Problem) -> Problem:
    """`p` with the custom dataset's stated answer kind. A row carries its kind (`answer_kind`),
    but the Batch API's item files keep only the fields they need, and a choice letter or a
    short text judged as a number would be rejected however right it is."""
    if cfg.answer_kind and p.answer_kind != cfg.answer_kind:
        return replace(p, answer_kind=cfg.answer_kind)
    return p


def verdict_fields(cfg: AnnotateConfig, p: Problem, text: str, style: str) -> dict[str, Any]:
    """How a teacher reply is judged (the online and the Batch API path alike): steps,
    predicted, status, reason, and the per-step check, for the problem's answer kind."""
    p = with_kind(cfg, p)
    v = judge(p, text, style)
    out = dict(steps=v.steps, predicted=v.predicted, status=v.status, reason=v.reason)
    if style != "socratic" or not v.steps or cfg.step_check == "off":
        return out
    wrong, fixed = check_steps(v.steps)
    out["step_check"] = "ok"
    if wrong and cfg.step_check == "repair":
        r = judge(p, unified_target(fixed), style)
        out.update(steps=fixed, predicted=r.predicted, status=r.status, reason=r.reason)
        out["step_check"] = "repaired"
    elif wrong:
        out["step_check"] = "wrong"
        if v.status != REJECTED:
            out.update(status=REJECTED, reason=WRONG_STEP)
    return out


def teacher_row(
    cfg: AnnotateConfig,
    p: Problem,
    item: Mapping[str, Any],
    result: CallResult,
    *,
    teacher: str,
    prompt_version: str,
    style: str,
) -> dict[str, Any]:
    """The annotation row of one teacher call: judged, or rejected with its API error."""
    p = with_kind(cfg, p)
    common = dict(
        sample=item["sample"],
        teacher=teacher,
        prompt_version=prompt_version,
        style=style,
        cache_key=item["cache_key"],
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        attempts=result.attempts,
    )
    if result.error is not None:
        return annotation_row(
            p, steps=(), predicted=None, status=REJECTED, reason=result.error, **common
        )
    v = verdict_fields(cfg, p, result.text or "", style)
    return annotation_row(
        p, raw=result.text, decomposition=decomposition_id(v["steps"]), **v, **common
    )
