"""Ray Data runs of the annotation job, one per chunk of problem-samples (online and gold).

The driver holds one chunk at a time, never the dataset; between chunks it counts the spend
and, after a first wave, revises the estimate. Every chunk's actors share the run's ledger
(`pipelines/run_ledger.py`): one stop signal and one spend cap for the whole run.
(`--batch-api` runs in `pipelines/batch_api.py`.)
"""

from __future__ import annotations

import contextlib
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
from pipelines.run_ledger import LedgerRef, start_ledger
from pipelines.spend import cost_of, format_revised, revise_estimate
from pipelines.teacher_client import FatalTeacherError
from socratic.records import ANNOTATION_SCHEMA

log = logging.getLogger("annotate")


def fatal_cause(exc: BaseException) -> FatalTeacherError | None:
    """The `FatalTeacherError` in an exception Ray raised, found by type: the exception itself
    (`RayTaskError.as_instanceof_cause()` makes Ray's error an instance of its cause's class),
    `RayTaskError.cause`, and `__cause__` / `__context__` chains. Nothing is parsed out of a
    message: a cause Ray kept only as text (a Ray Data `UserCodeException`'s, an actor's
    constructor's) is not found here, which is why the annotators report a fatal error to the
    run's ledger, typed, instead of raising it through Ray Data."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError's: the error as the actor raised it
        if isinstance(e, FatalTeacherError) and not isinstance(cause, BaseException):
            return e
        stack.extend([e.__cause__, e.__context__, cause])
        if hasattr(e, "as_instanceof_cause"):
            with contextlib.suppress(Exception):  # a cause class Ray cannot subclass
                stack.append(e.as_instanceof_cause())
    return None


def run_chunk(cfg: AnnotateConfig, chunk: list[dict[str, Any]], ledger: LedgerRef | None) -> None:
    import ray

    batch_size = cfg.max_in_flight
    ds = ray.data.from_items(chunk, override_num_blocks=max(1, -(-len(chunk) // batch_size)))
    if cfg.mode == "gold":
        ds = ds.map_batches(gold_batch, batch_format="pyarrow", batch_size=batch_size)
    else:
        ds = ds.map_batches(
            TeacherAnnotator,
            fn_constructor_kwargs=annotator_kwargs(cfg, ledger),
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
        if ledger is not None:  # the run's own stop, when there was one, says best what happened
            stop = ray.get(ledger.handle.state.remote())["stop"]
            if stop is not None:
                raise stop from None
        fatal = fatal_cause(e)
        if fatal is not None:
            raise fatal from None
        raise


def _after_first_wave(
    cfg: AnnotateConfig, fs: pafs.FileSystem, written: set[str], estimate: dict[str, Any]
) -> str | None:
    """Revise the estimate from the first wave's real usage; why to stop, if the revision is
    above the cap."""
    columns = ["prompt_tokens", "completion_tokens"]
    wave = pa.concat_tables(
        [pq.read_table(f, filesystem=fs, columns=columns) for f in sorted(written)]
    ) if written else pa.table({c: pa.array([], pa.int64()) for c in columns})  # fmt: skip
    revised = estimate["revised"] = revise_estimate(cfg, estimate, wave)
    print(format_revised(revised), flush=True)
    cost = revised["cost_usd"]
    if cfg.max_cost_usd is not None and cost is not None and cost > cfg.max_cost_usd:
        return (
            f"the estimate after the first wave, ${cost:.4f}, is above --max-cost-usd "
            f"{cfg.max_cost_usd:g}: {wave.num_rows} calls made; a rerun into the same output "
            "with a higher cap goes on from there"
        )
    return None


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
    ledger = None
    try:
        for i, chunk in enumerate(chunks):
            log.info("annotating %d problem-samples (%d so far)", len(chunk), sent)
            sent += len(chunk)
            if not ray.is_initialized():
                from socratic.ray_address import resolve_address

                ray.init(address=resolve_address(cfg.address), configure_logging=False)
            if ledger is None and cfg.mode == "teacher":
                # One per run: the stop signal and the spend cap every actor of every chunk
                # shares (`pipelines/run_ledger.py`).
                ledger = start_ledger(cfg.output, cfg.max_cost_usd, cfg.max_in_flight)
            ref = None
            if ledger is not None:
                ref = LedgerRef(ledger, epoch=i, capped=cfg.max_cost_usd is not None)
            before = set(parquet_files(fs, root))
            run_chunk(cfg, chunk, ref)
            del chunk  # before the next is built: two chunks alive at once fragment the heap
            if cfg.mode == "teacher":
                clear_journal(fs, root)  # every journaled row of the chunk is in Parquet now
            written = set(parquet_files(fs, root)) - before
            if cfg.max_cost_usd is not None:
                spent += cost_of(fs, written, cfg.prices)
            if ledger is not None:
                state = ray.get(
                    ledger.end_chunk.remote(spent if cfg.max_cost_usd is not None else None)
                )
                if state["stop"] is not None:
                    raise state["stop"]  # the first fatal error of any actor, as it was raised
                if cfg.max_cost_usd is not None and (
                    state["cap_reached"] or spent >= cfg.max_cost_usd
                ):
                    stopped = (
                        f"--max-cost-usd {cfg.max_cost_usd:g} reached (spent ${spent:.4f}): a "
                        "call starts only while the spend, the calls in flight at their bound "
                        "and its own bound fit"
                    )
                    break
            if i == 0 and estimate is not None:
                stopped = _after_first_wave(cfg, fs, written, estimate)
                if stopped:
                    break
    finally:
        if ledger is not None:
            ray.kill(ledger)
    deque(chunks, maxlen=0)  # after a stop: the rest still counts as this run's expected rows
    del chunks
    return stopped
