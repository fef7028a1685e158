"""Ray Data runs of the annotation job, one per chunk of problem-samples (online and gold).

The driver holds one chunk at a time, never the dataset; between chunks it counts the spend
and, after a first wave, revises the estimate. (`--batch-api` runs in `pipelines/batch_api.py`.)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.annotate_config import AnnotateConfig
from pipelines.annotator import TeacherAnnotator, annotator_kwargs
from pipelines.journal import clear_journal, output_fs
from pipelines.judging import gold_batch
from pipelines.output import parquet_files
from pipelines.spend import cost_of, format_revised, revise_estimate
from pipelines.teacher_client import FatalTeacherError
from socratic.records import ANNOTATION_SCHEMA

log = logging.getLogger("annotate")


def _fatal_cause(exc: BaseException) -> FatalTeacherError | None:
    """Find a FatalTeacherError under Ray's exception wrappers (by type, then by message)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FatalTeacherError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    text = str(exc)
    marker = "FatalTeacherError: "
    if marker in text:
        return FatalTeacherError(text.split(marker, 1)[1].splitlines()[0])
    return None


def run_chunk(cfg: AnnotateConfig, chunk: list[dict[str, Any]], budget: float | None) -> None:
    import ray

    batch_size = cfg.max_in_flight
    ds = ray.data.from_items(chunk, override_num_blocks=max(1, -(-len(chunk) // batch_size)))
    if cfg.mode == "gold":
        ds = ds.map_batches(gold_batch, batch_format="pyarrow", batch_size=batch_size)
    else:
        ds = ds.map_batches(
            TeacherAnnotator,
            fn_constructor_kwargs=annotator_kwargs(
                cfg, None if budget is None else budget / cfg.actors
            ),
            batch_format="pyarrow",
            batch_size=batch_size,
            # Several batches at once per actor: the client's semaphore (max_in_flight)
            # stays full between batches instead of draining in waves.
            compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_concurrent_calls_per_actor=4),
            num_cpus=cfg.actor_cpus,
        )
    target = cfg.output if "://" in cfg.output else output_fs(cfg.output)[1]
    try:
        ds.write_parquet(target, schema=ANNOTATION_SCHEMA)
    except Exception as e:
        fatal = _fatal_cause(e)
        if fatal is not None:
            raise FatalTeacherError(str(fatal)) from None
        raise


def run_online(
    cfg: AnnotateConfig,
    fs: pafs.FileSystem,
    root: str,
    chunks: Iterator[list[dict[str, Any]]],
    estimate: dict[str, Any] | None = None,
) -> str | None:
    """Online calls, one Ray Data run per chunk; returns why it stopped early, if it did.

    With `estimate`, the first chunk is a first wave (`first_wave`): its real usage revises the
    estimate (`estimate["revised"]`), and a revision above `--max-cost-usd` stops the run."""
    import ray

    spent, stopped, sent = 0.0, None, 0
    for i, chunk in enumerate(chunks):
        log.info("annotating %d problem-samples (%d so far)", len(chunk), sent)
        sent += len(chunk)
        if not ray.is_initialized():
            from socratic.ray_address import resolve_address

            ray.init(address=resolve_address(cfg.address), configure_logging=False)
        budget = None if cfg.max_cost_usd is None else cfg.max_cost_usd - spent
        before = set(parquet_files(fs, root))
        run_chunk(cfg, chunk, budget)
        del chunk  # before the next is built: two chunks alive at once fragment the heap
        if cfg.mode == "teacher":
            clear_journal(fs, root)  # every journaled row of the chunk is in Parquet now
        written = set(parquet_files(fs, root)) - before
        if cfg.max_cost_usd is not None:
            spent += cost_of(fs, written, cfg.prices)
            if spent >= cfg.max_cost_usd:
                stopped = f"--max-cost-usd {cfg.max_cost_usd:g} reached (spent ${spent:.4f})"
                break
        if i == 0 and estimate is not None:
            columns = ["prompt_tokens", "completion_tokens"]
            wave = pa.concat_tables(
                [pq.read_table(f, filesystem=fs, columns=columns) for f in sorted(written)]
            ) if written else pa.table({c: pa.array([], pa.int64()) for c in columns})  # fmt: skip
            revised = estimate["revised"] = revise_estimate(cfg, estimate, wave)
            print(format_revised(revised), flush=True)
            cost = revised["cost_usd"]
            if cfg.max_cost_usd is not None and cost is not None and cost > cfg.max_cost_usd:
                stopped = (
                    f"the estimate after the first wave, ${cost:.4f}, is above --max-cost-usd "
                    f"{cfg.max_cost_usd:g}: {wave.num_rows} calls made; a rerun into the same "
                    "output with a higher cap goes on from there"
                )
                break
    deque(chunks, maxlen=0)  # after a stop: the rest still counts as this run's expected rows
    del chunks
    return stopped
