"""The annotation run's summary: counts of what is in the Parquet now, not of what was sent.

Read a group of files at a time, keeping only counts and key digests, so the driver's memory
stays bounded at millions of rows; `format_summary` is what the job prints.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.annotate_config import GOLD_TEACHER, AnnotateConfig
from pipelines.keys import KeySet, key_digests
from pipelines.output import ResumeState, column_sum, parquet_files
from socratic.adapters import DatasetSpec, load_stats
from socratic.records import REJECTED

# Rows `summarize` holds at once. It bounds the driver's memory: at 300k rows the summary's
# peak was +255 MiB over the run's with 200k-row groups, +110 with 20k (/proc VmHWM).
SUMMARY_GROUP_ROWS = 20_000


def _row_groups(fs: pafs.FileSystem, root: str, columns: Sequence[str]) -> Iterator[pa.Table]:
    """`columns` of every Parquet file under `root`, about `SUMMARY_GROUP_ROWS` at a time."""
    rows = SUMMARY_GROUP_ROWS
    group: list[pa.Table] = []
    n = 0
    for path in parquet_files(fs, root):
        group.append(pq.read_table(path, filesystem=fs, columns=list(columns)))
        n += group[-1].num_rows
        if n >= rows:
            yield pa.concat_tables(group)
            group, n = [], 0
    if group:
        yield pa.concat_tables(group)


def _reason_group(reason: str) -> str:
    """`api_error: 429: Too many requests` -> `api_error: 429`, so reasons count by kind."""
    parts = reason.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "api_error" else reason


def summarize(
    cfg: AnnotateConfig,
    fs: pafs.FileSystem,
    root: str,
    keys: KeySet,
    state: ResumeState,
    wall_s: float,
    estimate: dict[str, Any] | None = None,
    stopped: str | None = None,
) -> dict[str, Any]:
    """Counts from what is in the Parquet now, for this run's (problem, sample) pairs.

    `keys` are this run's; those not in `state.done` were new to it. The files are read a group
    at a time and only counts and 16-byte digests are kept (`pipelines/keys.py`): reading every
    row's columns at once cost the driver ~700 bytes per row at the end of a run, and Arrow
    `is_in` over the key strings most of that again."""
    columns = ["id", "cache_key", "status", "reason", "prompt_tokens", "completion_tokens"]
    columns += ["attempts", "step_check", "decomposition"]
    seen = np.zeros(len(keys), bool)  # per distinct expected key: has a row
    n_rows = n_new = accepted = prompt_tokens = completion_tokens = calls = first_calls = 0
    reasons: Counter[str] = Counter()
    step_checks: Counter[str] = Counter()
    decompositions = KeySet()  # (problem, decomposition) of each row that has one
    for table in _row_groups(fs, root, columns):
        digests = key_digests(table["cache_key"])
        mine, where = keys.find(digests)
        rows = table.filter(pa.array(mine))
        seen[where[mine]] = True
        new = rows.filter(pa.array(~state.done.find(digests[mine])[0]))
        n_rows, n_new = n_rows + rows.num_rows, n_new + new.num_rows
        accepted += column_sum(pc.equal(rows["status"], "accepted").cast(pa.int64()))
        rejected = rows.filter(pc.equal(rows["status"], REJECTED))
        reasons.update(_reason_group(r) for r in rejected["reason"].to_pylist())
        step_checks.update(x for x in rows["step_check"].to_pylist() if x is not None)
        prompt_tokens += column_sum(new["prompt_tokens"])
        completion_tokens += column_sum(new["completion_tokens"])
        calls += column_sum(new["attempts"])
        first_calls += column_sum(pc.greater(new["attempts"], 0).cast(pa.int64()))
        if cfg.samples > 1:  # one sample a problem cannot repeat a decomposition
            decomposed = rows.filter(pc.is_valid(rows["decomposition"]))
            ids, ds = decomposed["id"].to_pylist(), decomposed["decomposition"].to_pylist()
            decompositions.update(json.dumps(pair) for pair in zip(ids, ds, strict=True))
    distinct = int(seen.sum())
    repeated = decompositions.count - len(decompositions)
    # Bad dataset records left out under --skip-bad-records, as this run's load counted them.
    loaded = load_stats(DatasetSpec.from_config(cfg))
    cost = None
    if cfg.priced:
        cost = round(cfg.prices.cost(prompt_tokens, completion_tokens) * cfg.price_factor, 6)
    return {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "mode": cfg.mode,
        "teacher": cfg.model if cfg.mode == "teacher" else GOLD_TEACHER,
        "output": cfg.output,
        "skipped_records": loaded.skipped_records if loaded else 0,
        "skipped_record_errors": list(loaded.skipped_examples) if loaded else [],
        "rows": n_rows,
        "expected_rows": keys.count,
        "missing_rows": keys.count - distinct,
        "duplicate_rows": n_rows - distinct,
        "accepted": accepted,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(reasons.most_common()),
        "step_check": dict(step_checks),
        "repeated_decompositions": repeated,
        "written_this_run": n_new,
        "resumed_rows": n_rows - n_new,
        "journal_rows_recovered": state.journal_rows_recovered,
        "partial_files_removed": len(state.partial_files_removed),
        "transient_rows_retried": state.transient_rows_dropped,
        "teacher_calls": calls,
        "retries": calls - first_calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": cost,
        "estimate": estimate,
        "estimated_cost_usd": None if estimate is None else estimate["cost_usd"],
        "revised_cost_usd": (estimate or {}).get("revised", {}).get("cost_usd"),
        "stopped": stopped,
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(n_new / wall_s, 2) if wall_s > 0 else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()) or "none"
    checks = ", ".join(f"{k} {v}" for k, v in s["step_check"].items()) or "none"
    lines = [
        f"annotated {s['dataset']}/{s['split']} ({s['mode']}, teacher {s['teacher']})"
        f" -> {s['output']}",
        f"  rows {s['rows']}/{s['expected_rows']} (missing {s['missing_rows']}, duplicates "
        f"{s['duplicate_rows']}): accepted {s['accepted']}, rejected {s['rejected']} ({reasons})",
        f"  this run: {s['written_this_run']} rows written, {s['resumed_rows']} resumed, "
        f"{s['teacher_calls']} teacher calls, {s['retries']} retries, "
        f"{s['transient_rows_retried']} transient failures retried, "
        f"{s['partial_files_removed']} partial files removed",
        f"  tokens: {s['prompt_tokens']} prompt + {s['completion_tokens']} completion"
        + (f", cost ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else "")
        + (
            f" (estimated ${s['estimated_cost_usd']:.4f})"
            if s.get("estimated_cost_usd") is not None
            else ""
        )
        + (
            f" (after the first wave ${s['revised_cost_usd']:.4f})"
            if s.get("revised_cost_usd") is not None
            else ""
        ),
        f"  step checks: {checks}; {s['repeated_decompositions']} repeated decompositions "
        "(same sub-questions as an earlier sample of the problem)",
        f"  wall {s['wall_s']} s, {s['rows_per_s']} rows/s",
    ]
    if s["journal_rows_recovered"]:
        lines.insert(3, f"  {s['journal_rows_recovered']} answered rows recovered from the journal")
    if s.get("skipped_records"):
        first = s["skipped_record_errors"][0] if s.get("skipped_record_errors") else ""
        lines.insert(
            2,
            f"  skipped {s['skipped_records']} bad dataset records (--skip-bad-records)"
            + (f"; the first: {first}" if first else ""),
        )
    if s.get("batches"):
        lines += format_batches(s["batches"])
    if s.get("stopped"):
        lines.append(
            f"  stopped: {s['stopped']} after {s['written_this_run']} rows; "
            f"{s['missing_rows']} still to do: rerun into the same output to resume"
        )
    lines += [f"  warning: {w}" for w in s.get("warnings", [])]
    return "\n".join(lines)


def format_batches(b: dict[str, Any]) -> list[str]:
    """The summary's Batch API lines: batches by state, resubmissions, and losses said loudly."""
    states = ", ".join(f"{k} {v}" for k, v in b["by_status"].items()) or "none"
    lines = [
        f"  Batch API: {b['batches']} batches ({b['new']} submitted, {b['resumed']} from an "
        f"earlier run): {states}; {b['requests']} requests sent, {b['resubmitted_requests']} of "
        f"them resubmitted ({b['expired']} expired, {b['failed']} failed batches), "
        f"{b['unanswered_requests']} unanswered after {b['max_rounds']} rounds; "
        f"{b['provider_files_deleted']} files deleted at the provider once collected",
    ]
    if b["ids"]:
        shown = ", ".join(b["ids"][:8]) + (
            f" and {len(b['ids']) - 8} more" if len(b["ids"]) > 8 else ""
        )
        lines.append(f"  batch ids: {shown}")
    if b["lost_output_files"]:
        lines.append(
            f"  LOST: {b['lost_output_files']} output file(s) could not be downloaded: "
            f"{b['lost_output_requests']} answers were paid for and are gone (resubmitted)"
        )
    if b["still_running"]:
        lines.append(
            f"  still running: {', '.join(b['still_running'])}: rerun into the same output to "
            "collect them (nothing is paid twice)"
        )
    return lines
