"""Annotate a dataset with teacher decompositions on Ray Data, into resumable Parquet.

    ray job submit --working-dir . -- python pipelines/annotate.py \\
        --dataset gsm8k --split train --output s3://bucket/gsm8k-train --model gpt-4o-mini

Pipeline: problems, read lazily in chunks of `--chunk-rows` -> drop those already answered in
--output -> one async actor (aiohttp by default, bounded requests in flight, rate limits,
retries; the run's stop signal and spend cap shared by every actor, `run_ledger.py`) calls the
teacher -> parse the reply into steps -> verify the last step's answer against gold and every
`<<expr=value>>` with the calculator -> journal the row at once -> Parquet. Accepted and
rejected rows are both written (nothing a user paid for is thrown away), and
`summary.json` beside them counts what is in the Parquet, not what was sent.

Resume: a rerun into the same output calls the teacher only for (problem, sample) pairs with no
row yet, in Parquet or in the journal (`pipelines/journal.py`) an interrupted run left. A row
rejected for a transient reason (429, 5xx, timeout, connection) is dropped from its file and
retried; a file an interrupted run left half-written is removed. Either way every problem ends
present exactly once per sample. One run at a time per output: a second run into an output a
live run holds refuses, naming it; a killed run's lock is taken over (`output_lock.py`).
`--mode gold` writes the dataset's own human decompositions
with the same schema and no teacher call (the paper's human-annotation set-up).

Spend: before any call the run prints an estimate (calls, tokens, USD); `--max-cost-usd` refuses
to start above it and stops cleanly once real usage reaches it; `--dry-run` stops after it.

`--batch-api` sends the same requests through the OpenAI Batch API instead (at its discount,
`--batch-discount`): JSONL files uploaded, batches created, polled and collected in the driver,
each answer judged into the same row as online (`pipelines/batch_api.py`). No Ray actors are
involved; a rerun collects batches an earlier run left running rather than paying again.

The API key is read from the environment only (`--api-key-env`, default OPENAI_API_KEY): the
driver checks it is set, and each actor reads it from its own node's environment, so it never
travels in actor arguments (which Ray stores in its GCS), Parquet, the summary, logs or the
job's runtime env.

The job's parts, one module each: `annotate_config.py` (the flags), `output.py` (the output
folder and resume), `work_items.py` (the calls to make), `spend.py` (the estimate and the cap),
`judging.py` (answers into rows), `annotator.py` (the actor), `chunks.py` (the Ray Data runs),
`batch_api.py` (the Batch API) and `summary.py`; this one runs them in order.
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/annotate.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.annotate_config import AnnotateConfig
from pipelines.annotator import TeacherAnnotator, annotator_kwargs, check_api_key
from pipelines.batch_api import BatchRunner
from pipelines.chunks import run_online
from pipelines.journal import output_fs
from pipelines.keys import KeySet
from pipelines.output import parquet_files, prepare_output
from pipelines.output_lock import OutputLock, OutputLocked
from pipelines.spend import SpendRefused, estimate_spend, format_estimate, wave_size
from pipelines.summary import format_summary, summarize
from pipelines.teacher_client import FatalTeacherError
from pipelines.work_items import first_wave, iter_work_items, todo_chunks, todo_items
from socratic.adapters import DatasetSpec, load_problems
from socratic.config import parse_config

# What other code and the tests import from the job's entry point (each lives in the module
# the docstring names).
__all__ = [
    "AnnotateConfig",
    "OutputLocked",
    "SpendRefused",
    "TeacherAnnotator",
    "annotator_kwargs",
    "format_summary",
    "iter_work_items",
    "main",
    "output_fs",
    "parquet_files",
    "prepare_output",
    "run",
]

log = logging.getLogger("annotate")
# In flight per actor from which the openai client's own CPU, not the teacher, bounds an actor.
# `benchmarks/teacher_client_cpu.py` (200 ms test teacher, 2026-12-06): 1.0 ms of CPU a call at
# 64 in flight, 1.5 ms at 512 (624 calls/s, ideal 2560); aiohttp 0.14-0.17 ms. A larger
# keep-alive pool (httpx Limits) did not change it.
OPENAI_CLIENT_BUSY_IN_FLIGHT = 256


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Annotate and return the summary (also written to `<output>/summary.json`).

    Local paths are made absolute here, on the driver, before any actor gets the config; the
    output's lock (`pipelines/output_lock.py`) is held from before the resume step touches the
    output until the run ends, however it ends. Raises `OutputLocked` when another run has it."""
    cfg = cfg.with_absolute_paths()
    lock = OutputLock(*output_fs(cfg.output), "annotate", force=cfg.force_unlock)
    try:
        return _annotate(cfg, lock)
    finally:
        lock.release()


def _annotate(cfg: AnnotateConfig, lock: OutputLock) -> dict[str, Any]:
    t0 = time.perf_counter()
    fs, root = output_fs(cfg.output)
    if cfg.mode == "teacher":
        check_api_key(cfg)
    warnings = []
    if cfg.mode == "teacher" and cfg.samples > 1 and cfg.temperature == 0:
        warnings.append(
            f"--samples {cfg.samples} at --temperature 0: the samples will mostly be the same "
            "answer (marked by their equal `decomposition`); raise --temperature for variety"
        )
        log.warning(warnings[-1])
    online_openai = cfg.mode == "teacher" and not cfg.batch_api and cfg.http_client == "openai"
    if online_openai and cfg.max_in_flight >= OPENAI_CLIENT_BUSY_IN_FLIGHT:
        log.warning(
            "--max-in-flight %d with the openai client: it spends ~1.5 ms of CPU a call at that "
            "concurrency, so an actor's core tops out near 600 calls/s; --http-client aiohttp "
            "(~0.2 ms) or more --actors go further",
            cfg.max_in_flight,
        )
    lock.acquire()  # before the resume step: it removes files a live run would be writing
    state = prepare_output(fs, root)
    runner, pending = None, KeySet()
    if cfg.batch_api:
        runner = BatchRunner(cfg, fs, root)
        pending = runner.pending_keys()  # in batches an earlier run left: collected, not paid
    estimate, wave = None, 0
    if cfg.mode == "teacher":
        estimate = estimate_spend(cfg, state.done.union(pending) if pending.count else state.done)
        print(format_estimate(estimate), flush=True)
        wave = wave_size(cfg, estimate)
        cost = estimate["cost_usd"]
        if wave and cost is not None:
            cost = cost * wave / estimate["calls"]  # the wave's bound: all the cap must allow now
            print(f"a first wave of {wave} calls (at most ${cost:.4f}) refines it", flush=True)
        if cfg.max_cost_usd is not None and cost is not None and cost > cfg.max_cost_usd:
            what = f"the first wave's bound ${cost:.4f}" if wave else f"the estimate ${cost:.4f}"
            hint = "" if wave or cfg.batch_api else ", or --estimate-wave N to measure replies"
            raise SpendRefused(
                f"{what} is above --max-cost-usd {cfg.max_cost_usd:g}; nothing was called. Raise "
                f"the cap, lower --max-tokens or --samples, or --limit the run{hint}."
            )
    if cfg.dry_run:
        return {"dry_run": True, "estimate": estimate, "already_done": len(state.done)}

    keys = KeySet()  # this run's expected rows
    spec = DatasetSpec.from_config(cfg)
    if runner is not None:
        items = todo_items(iter_work_items(cfg, load_problems(spec)), state.done, pending, keys)
        report = runner.run(items)
        deque(items, maxlen=0)  # after a stop: the rest still counts as this run's expected rows
        del items
        stopped, batches = report.stopped, report.summary()
        warnings += report.warnings
    else:
        chunks = todo_chunks(
            iter_work_items(cfg, load_problems(spec)), state.done, cfg.chunk_rows, keys
        )
        if wave:
            chunks = first_wave(chunks, wave)
        online_estimate = estimate if wave else None
        stopped = run_online(cfg, fs, root, chunks, online_estimate)
        batches = None

    summary = summarize(cfg, fs, root, keys, state, time.perf_counter() - t0, estimate, stopped)
    if batches is not None:
        summary["batches"] = batches
    summary["warnings"] = warnings
    with fs.open_output_stream(posixpath.join(root, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(AnnotateConfig, argv)
    log.info("config: %s", json.dumps({k: v for k, v in asdict(cfg).items()}, default=str))
    try:
        summary = run(cfg)
    except FatalTeacherError as e:
        print(
            f"error: {e}\nRows written before the failure are kept; rerun to resume.",
            file=sys.stderr,
        )
        return 2
    except SpendRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OutputLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    if summary.get("dry_run"):
        return 0  # the estimate is printed already
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    # Run through the importable module, so that nothing Ray ships is pickled as a `__main__`
    # copy: workers import `pipelines.annotator.TeacherAnnotator` and the rest by reference.
    from pipelines.annotate import main as _main

    sys.exit(_main())
