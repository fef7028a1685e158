"""Annotate a dataset with teacher decompositions on Ray Data, into resumable Parquet.

    ray job submit --working-dir . -- python pipelines/annotate.py \\
        --dataset gsm8k --split train --output s3://bucket/gsm8k-train --model gpt-4o-mini

Pipeline: problems -> drop those already answered in --output -> one async actor (AsyncOpenAI,
bounded requests in flight, rate limits, retries) calls the teacher -> parse the reply into
steps -> verify the last step's answer against gold -> Parquet. Accepted and rejected rows are
both written (nothing a user paid for is thrown away), and `summary.json` beside them counts what
is in the Parquet, not what was sent.

Resume: a rerun into the same output calls the teacher only for (problem, sample) pairs with no
row yet. A row rejected for a transient reason (429, 5xx, timeout, connection) is dropped from
its file and retried; a file an interrupted run left half-written is removed. Either way every
problem ends present exactly once per sample. `--mode gold` writes the dataset's own human
decompositions with the same schema and no teacher call (the paper's human-annotation set-up).

The API key is read from the environment only (`--api-key-env`, default OPENAI_API_KEY) and
handed to the actor as a masked `Secret`; it never reaches Parquet, the summary, logs or the
job's runtime env.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/annotate.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.teacher import (
    NO_GOLD_STEPS,
    STYLES,
    FatalTeacherError,
    Prompt,
    RetryPolicy,
    Secret,
    TeacherClient,
    cache_key,
    is_transient,
    judge,
)
from socratic.adapters import DATASETS, DatasetSpec, load_problems
from socratic.config import option, parse_config
from socratic.formats import unified_target
from socratic.records import (
    ANNOTATION_SCHEMA,
    REJECTED,
    Problem,
    annotation_row,
    annotation_table,
    problem_from_row,
)

log = logging.getLogger("annotate")
GOLD_TEACHER = "gold"


@dataclass(frozen=True)
class AnnotateConfig:
    """Annotate a dataset with Socratic (or CoT) teacher decompositions into Parquet."""

    dataset: str = option(help="dataset family", choices=DATASETS)
    output: str = option(help="output folder: local path or a pyarrow filesystem URI (s3://...)")
    split: str = option("train", help="split to annotate")
    path: str | None = option(
        None, help="local dataset file (jsonl/json/csv/parquet) instead of the hub"
    )
    dataset_config: str | None = option(None, help="GSM8K config: main or socratic")
    hub_id: str | None = option(None, help="hub dataset id, overriding the dataset's default")
    limit: int | None = option(None, help="annotate only the first N problems")
    mode: str = option(
        "teacher",
        help="teacher: call the teacher; gold: the dataset's own steps",
        choices=("teacher", "gold"),
    )
    model: str = option("gpt-4o-mini", help="teacher model name")
    base_url: str | None = option(None, help="OpenAI-compatible endpoint (default: OpenAI)")
    api_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")
    style: str = option("socratic", help="what the teacher writes", choices=STYLES)
    prompt: str | None = option(
        None, help="prompt YAML file (default: bundled, per style and answer kind)"
    )
    samples: int = option(1, help="teacher samples per problem")
    temperature: float = option(0.0, help="sampling temperature (raise it with --samples > 1)")
    max_tokens: int = option(512, help="max completion tokens per call")
    with_gold_solution: bool = option(
        True, help="show the teacher the gold solution, where the dataset has one"
    )
    max_in_flight: int = option(32, help="teacher requests in flight per actor")
    actors: int = option(1, help="teacher-calling actors (one async actor is fastest for I/O)")
    actor_cpus: float = option(
        0.25, help="CPUs reserved per actor; leave a CPU for read/write tasks"
    )
    rpm: float | None = option(None, help="requests per minute limit (whole job)")
    tpm: float | None = option(None, help="tokens per minute limit (whole job)")
    timeout: float = option(60.0, help="seconds per teacher request")
    max_retries: int = option(
        6, help="retries of a transient failure (429, 5xx, timeout, connection)"
    )
    retry_base: float = option(1.0, help="first backoff in seconds; doubles per retry, full jitter")
    price_in: float | None = option(None, help="USD per 1M prompt tokens, for the cost line")
    price_out: float | None = option(None, help="USD per 1M completion tokens, for the cost line")
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    seed: int = option(0, help="seed for retry jitter and seeded dataset splits")

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("--samples must be at least 1")
        if self.mode == "gold" and self.samples != 1:
            raise ValueError("--mode gold writes one row per problem; leave --samples at 1")
        if self.max_in_flight < 1 or self.actors < 1:
            raise ValueError("--max-in-flight and --actors must be at least 1")

    @property
    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def prompt_for(self, answer_kind: str) -> Prompt:
        return Prompt.load(self.prompt) if self.prompt else Prompt.default(self.style, answer_kind)


# --- the output folder -------------------------------------------------------------------------


def output_fs(output: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of an output given as a local path or a URI."""
    if "://" in output:
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), str(Path(output).resolve())


def parquet_files(fs: pafs.FileSystem, root: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(root, recursive=True)
    return sorted(
        f.path
        for f in fs.get_file_info(selector)
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )


@dataclass
class ResumeState:
    done: set[str]
    partial_files_removed: list[str]
    transient_rows_dropped: int


def prepare_output(fs: pafs.FileSystem, root: str) -> ResumeState:
    """Make the output consistent for a (re)run and return the calls already answered.

    A file that does not read back is what a killed run leaves mid-write: its rows were never
    complete, so it is removed and those calls are made again. Rows rejected for a transient
    reason are taken out of their file (rewritten atomically) so their retry does not leave the
    problem in the output twice.
    """
    fs.create_dir(root, recursive=True)
    state = ResumeState(set(), [], 0)
    for path in parquet_files(fs, root):
        try:
            table = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            log.warning("removing %s: unreadable, left by an interrupted run (%s)", path, e)
            fs.delete_file(path)
            state.partial_files_removed.append(path)
            continue
        statuses = table.column("status").to_pylist()
        reasons = table.column("reason").to_pylist()
        keep = [
            not (s == REJECTED and is_transient(r)) for s, r in zip(statuses, reasons, strict=True)
        ]
        if not all(keep):
            state.transient_rows_dropped += keep.count(False)
            kept = table.filter(pa.array(keep))
            tmp = path + ".tmp"
            pq.write_table(kept, tmp, filesystem=fs)
            fs.move(tmp, path)
            table = kept
        state.done.update(table.column("cache_key").to_pylist())
    return state


def read_rows(fs: pafs.FileSystem, root: str, columns: Sequence[str]) -> pa.Table:
    tables = [
        pq.read_table(p, filesystem=fs, columns=list(columns)) for p in parquet_files(fs, root)
    ]
    if not tables:
        return ANNOTATION_SCHEMA.empty_table().select(list(columns))
    return pa.concat_tables(tables)


# --- work items --------------------------------------------------------------------------------


def work_items(cfg: AnnotateConfig, problems: Iterable[Problem]) -> tuple[list[dict], list[str]]:
    """(rows to compute, cache keys of every (problem, sample) this run covers)."""
    items, keys = [], []
    prompts: dict[str, Prompt] = {}
    for p in problems:
        for sample in range(cfg.samples):
            if cfg.mode == "gold":
                key = cache_key(
                    model=GOLD_TEACHER,
                    messages=[],
                    sampling={},
                    prompt_version=GOLD_TEACHER,
                    problem_id=p.id,
                    sample=sample,
                )
            else:
                if p.answer_kind not in prompts:  # parse each prompt file once, not per row
                    prompts[p.answer_kind] = cfg.prompt_for(p.answer_kind)
                prompt = prompts[p.answer_kind]
                key = cache_key(
                    model=cfg.model,
                    messages=prompt.messages(p, cfg.with_gold_solution),
                    sampling=cfg.sampling,
                    prompt_version=prompt.version,
                    problem_id=p.id,
                    sample=sample,
                )
            keys.append(key)
            row = p.to_dict()
            row["gold_steps"] = row.pop("steps")
            row.update(sample=sample, cache_key=key)
            items.append(row)
    return items, keys


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
                **common,
            )
        )
    return annotation_table(rows)


class TeacherAnnotator:
    """Ray Data actor: many teacher calls in flight on one event loop (I/O bound, not CPU)."""

    def __init__(self, cfg: AnnotateConfig, api_key: Secret) -> None:
        self.cfg = cfg
        self.prompts: dict[str, Prompt] = {}
        self.client = TeacherClient(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key=api_key,
            max_in_flight=cfg.max_in_flight,
            timeout_s=cfg.timeout,
            rpm=cfg.rpm / cfg.actors if cfg.rpm else None,
            tpm=cfg.tpm / cfg.actors if cfg.tpm else None,
            retry=RetryPolicy(max_retries=cfg.max_retries, base_s=cfg.retry_base),
            sampling=cfg.sampling,
            seed=cfg.seed,
        )

    async def _one(self, item: dict[str, Any]) -> dict[str, Any]:
        p = problem_from_row(item)
        if p.answer_kind not in self.prompts:  # parse each prompt file once, not per row
            self.prompts[p.answer_kind] = self.cfg.prompt_for(p.answer_kind)
        prompt = self.prompts[p.answer_kind]
        result = await self.client.complete(prompt.messages(p, self.cfg.with_gold_solution))
        common = dict(
            sample=item["sample"],
            teacher=self.cfg.model,
            prompt_version=prompt.version,
            style=prompt.style,
            cache_key=item["cache_key"],
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            attempts=result.attempts,
        )
        if result.error is not None:
            return annotation_row(
                p, steps=(), predicted=None, status=REJECTED, reason=result.error, **common
            )
        v = judge(p, result.text or "", prompt.style)
        return annotation_row(
            p,
            steps=v.steps,
            predicted=v.predicted,
            status=v.status,
            reason=v.reason,
            raw=result.text,
            **common,
        )

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = await asyncio.gather(*(self._one(item) for item in batch.to_pylist()))
        return annotation_table(rows)


# --- running -----------------------------------------------------------------------------------


def _api_key(cfg: AnnotateConfig) -> Secret:
    key = os.environ.get(cfg.api_key_env)
    if key:
        return Secret(key)
    if cfg.base_url is None:
        raise SystemExit(
            f"error: ${cfg.api_key_env} is not set. Export your API key there, or pass "
            "--api-key-env NAME, or --base-url for an endpoint that needs no key."
        )
    return Secret("EMPTY")  # local OpenAI-compatible servers (vLLM, ours) accept any key


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


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Annotate and return the summary (also written to `<output>/summary.json`)."""
    import ray

    t0 = time.perf_counter()
    fs, root = output_fs(cfg.output)
    api_key = _api_key(cfg) if cfg.mode == "teacher" else None
    state = prepare_output(fs, root)
    spec = DatasetSpec.from_config(cfg)
    items, keys = work_items(cfg, load_problems(spec))
    todo = [it for it in items if it["cache_key"] not in state.done]
    log.info(
        "%d problem-samples: %d already in %s, %d to annotate",
        len(items),
        len(items) - len(todo),
        cfg.output,
        len(todo),
    )

    if todo:
        if not ray.is_initialized():
            from socratic.ray_address import resolve_address

            ray.init(address=resolve_address(cfg.address), configure_logging=False)
        batch_size = cfg.max_in_flight
        ds = ray.data.from_items(todo, override_num_blocks=max(1, -(-len(todo) // batch_size)))
        if cfg.mode == "gold":
            ds = ds.map_batches(gold_batch, batch_format="pyarrow", batch_size=batch_size)
        else:
            ds = ds.map_batches(
                TeacherAnnotator,
                fn_constructor_kwargs={"cfg": cfg, "api_key": api_key},
                batch_format="pyarrow",
                batch_size=batch_size,
                # Several batches at once per actor: the client's semaphore (max_in_flight)
                # stays full between batches instead of draining in waves.
                compute=ray.data.ActorPoolStrategy(
                    size=cfg.actors, max_concurrent_calls_per_actor=4
                ),
                num_cpus=cfg.actor_cpus,
            )
        target = cfg.output if "://" in cfg.output else root
        try:
            ds.write_parquet(target, schema=ANNOTATION_SCHEMA)
        except Exception as e:
            fatal = _fatal_cause(e)
            if fatal is not None:
                raise FatalTeacherError(str(fatal)) from None
            raise

    summary = summarize(
        cfg, fs, root, set(keys), {it["cache_key"] for it in todo}, state, time.perf_counter() - t0
    )
    with fs.open_output_stream(posixpath.join(root, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _reason_group(reason: str) -> str:
    """`api_error: 429: Too many requests` -> `api_error: 429`, so reasons count by kind."""
    parts = reason.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "api_error" else reason


def summarize(
    cfg: AnnotateConfig,
    fs: pafs.FileSystem,
    root: str,
    keys: set[str],
    new_keys: set[str],
    state: ResumeState,
    wall_s: float,
) -> dict[str, Any]:
    """Counts from what is in the Parquet now, for this run's (problem, sample) pairs."""
    table = read_rows(
        fs,
        root,
        ["cache_key", "status", "reason", "prompt_tokens", "completion_tokens", "attempts"],
    )
    rows = [r for r in table.to_pylist() if r["cache_key"] in keys]
    new = [r for r in rows if r["cache_key"] in new_keys]
    present = Counter(r["cache_key"] for r in rows)
    prompt_tokens = sum(r["prompt_tokens"] for r in new)
    completion_tokens = sum(r["completion_tokens"] for r in new)
    cost = None
    if cfg.price_in is not None or cfg.price_out is not None:
        cost = round(
            (prompt_tokens * (cfg.price_in or 0) + completion_tokens * (cfg.price_out or 0)) / 1e6,
            6,
        )
    return {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "mode": cfg.mode,
        "teacher": cfg.model if cfg.mode == "teacher" else GOLD_TEACHER,
        "output": cfg.output,
        "rows": len(rows),
        "expected_rows": len(keys),
        "missing_rows": len(keys - set(present)),
        "duplicate_rows": sum(n - 1 for n in present.values() if n > 1),
        "accepted": sum(r["status"] == "accepted" for r in rows),
        "rejected": sum(r["status"] == REJECTED for r in rows),
        "rejected_by_reason": dict(
            Counter(
                _reason_group(r["reason"]) for r in rows if r["status"] == REJECTED
            ).most_common()
        ),
        "written_this_run": len(new),
        "resumed_rows": len(rows) - len(new),
        "partial_files_removed": len(state.partial_files_removed),
        "transient_rows_retried": state.transient_rows_dropped,
        "teacher_calls": sum(r["attempts"] for r in new),
        "retries": sum(max(r["attempts"] - 1, 0) for r in new),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": cost,
        "wall_s": round(wall_s, 2),
        "rows_per_s": round(len(new) / wall_s, 2) if wall_s > 0 else None,
    }


def format_summary(s: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()) or "none"
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
        + (f", cost ${s['cost_usd']:.4f}" if s["cost_usd"] is not None else ""),
        f"  wall {s['wall_s']} s, {s['rows_per_s']} rows/s",
    ]
    return "\n".join(lines)


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
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    # Run through the importable module, so Ray ships `pipelines.annotate.TeacherAnnotator` by
    # reference (workers import it) rather than pickling a `__main__` copy of it.
    from pipelines.annotate import main as _main

    sys.exit(_main())
