"""Annotate a dataset with teacher decompositions on Ray Data, into resumable Parquet.

    ray job submit --working-dir . -- python pipelines/annotate.py \\
        --dataset gsm8k --split train --output s3://bucket/gsm8k-train --model gpt-4o-mini

Pipeline: problems, read lazily in chunks of `--chunk-rows` -> drop those already answered in
--output -> one async actor (AsyncOpenAI, bounded requests in flight, rate limits, retries)
calls the teacher -> parse the reply into steps -> verify the last step's answer against gold
and every `<<expr=value>>` with the calculator -> journal the row at once -> Parquet. Accepted
and rejected rows are both written (nothing a user paid for is thrown away), and
`summary.json` beside them counts what is in the Parquet, not what was sent.

Resume: a rerun into the same output calls the teacher only for (problem, sample) pairs with no
row yet, in Parquet or in the journal (`pipelines/journal.py`) an interrupted run left. A row
rejected for a transient reason (429, 5xx, timeout, connection) is dropped from its file and
retried; a file an interrupted run left half-written is removed. Either way every problem ends
present exactly once per sample. `--mode gold` writes the dataset's own human decompositions
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
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/annotate.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.journal import Journal, clear_journal, journal_files, output_fs, read_journal_file
from pipelines.keys import KeySet, key_digests
from pipelines.prompting import (
    NO_GOLD_STEPS,
    STEP_CHECKS,
    STYLES,
    WRONG_STEP,
    Prompt,
    cache_key,
    check_steps,
    decomposition_id,
    is_transient,
    judge,
)
from pipelines.teacher_client import (
    BudgetExhausted,
    CallResult,
    FatalTeacherError,
    Prices,
    RetryPolicy,
    Secret,
    TeacherClient,
)
from socratic.adapters import DATASETS, DatasetSpec, load_problems
from socratic.config import option, parse_config
from socratic.formats import unified_target
from socratic.records import (
    ADDED_COLUMNS,
    ANNOTATION_SCHEMA,
    REJECTED,
    Problem,
    annotation_row,
    annotation_table,
    conform_annotations,
    problem_from_row,
)

log = logging.getLogger("annotate")
# In flight per actor from which the openai client's own CPU, not the teacher, bounds an actor.
# `benchmarks/teacher_client_cpu.py` (200 ms test teacher, 2026-12-06): 1.0 ms of CPU a call at
# 64 in flight, 1.5 ms at 512 (624 calls/s, ideal 2560); aiohttp 0.14-0.17 ms. A larger
# keep-alive pool (httpx Limits) did not change it.
OPENAI_CLIENT_BUSY_IN_FLIGHT = 256
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
    http_client: str = option(
        "openai",
        help="openai: the openai client; aiohttp: the same protocol over plain aiohttp, ~10x less "
        "CPU per call (for thousands of calls in flight)",
        choices=("openai", "aiohttp"),
    )
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
    max_cost_usd: float | None = option(
        None,
        help="refuse to start when the estimate is above this, and stop once the spend counted "
        "from real usage reaches it (needs --price-in/--price-out); a rerun resumes. With "
        "--batch-api: stop submitting new batches once the estimated cost of the submitted ones "
        "would pass it (a batch cannot be stopped part-way)",
    )
    dry_run: bool = option(False, help="print the spend estimate and exit, calling nothing")
    estimate_wave: int = option(
        0,
        help="send the first N calls as a wave, then estimate the rest's completion tokens from "
        "their real mean instead of the --max-tokens bound; --max-cost-usd then refuses the "
        "wave's bound up front and stops after the wave if the revised estimate is above it "
        "(online calls only; 0: the bound)",
    )
    step_check: str = option(
        "reject",
        help="re-evaluate every <<expr=value>> of the teacher's steps: reject a row with a wrong "
        "one (wrong_step), repair it (step_check=repaired) or off",
        choices=STEP_CHECKS,
    )
    chunk_rows: int = option(
        20_000,
        help="problem-samples per Ray Data run: the driver holds one chunk, never the dataset",
    )
    batch_api: bool = option(
        False,
        help="send the requests through the OpenAI Batch API (JSONL upload, batches, polling; "
        "--batch-discount of the price, answers within --batch-window) instead of online calls. "
        "Batch ids are recorded under <output>/_batches/: a rerun collects batches still running "
        "instead of paying twice",
    )
    batch_poll_s: float = option(30.0, help="--batch-api: seconds between polls of the batches")
    batch_max_requests: int = option(
        50_000, help="--batch-api: requests per batch at most (OpenAI's limit: 50,000)"
    )
    batch_max_bytes: int = option(
        190_000_000, help="--batch-api: bytes of JSONL per batch at most (OpenAI's limit: 200 MB)"
    )
    batch_discount: float = option(
        0.5, help="--batch-api: its price as a share of the online price (OpenAI: half)"
    )
    batch_window: str = option("24h", help="--batch-api: completion window", choices=("24h",))
    batch_max_wait_s: float | None = option(
        None,
        help="--batch-api: stop waiting after this many seconds; the batches keep running at the "
        "provider and a rerun into the same output collects them",
    )
    batch_max_rounds: int = option(
        3,
        help="--batch-api: times a request left unanswered (expired or failed batch, lost output "
        "file) is submitted in all within one run",
    )
    batch_max_active: int | None = option(
        None,
        help="--batch-api: batches in progress at once at most (providers limit the tokens "
        "enqueued per model); default: no limit",
    )
    batch_keep_files: bool = option(
        False,
        help="--batch-api: keep each collected batch's requests and result files, under "
        "<output>/_batches/ and at the provider (default: delete both once its rows are in "
        "Parquet; records stay)",
    )
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    seed: int = option(0, help="seed for retry jitter and seeded dataset splits")

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError("--samples must be at least 1")
        if self.mode == "gold" and self.samples != 1:
            raise ValueError("--mode gold writes one row per problem; leave --samples at 1")
        if self.max_in_flight < 1 or self.actors < 1:
            raise ValueError("--max-in-flight and --actors must be at least 1")
        if self.chunk_rows < 1:
            raise ValueError("--chunk-rows must be at least 1")
        if self.max_cost_usd is not None and self.price_in is None and self.price_out is None:
            raise ValueError("--max-cost-usd needs --price-in and/or --price-out to count spend")
        if self.batch_api and self.mode != "teacher":
            raise ValueError("--batch-api sends teacher requests; it needs --mode teacher")
        if self.batch_max_requests < 1 or self.batch_max_bytes < 1 or self.batch_max_rounds < 1:
            raise ValueError("--batch-max-requests, --batch-max-bytes, --batch-max-rounds: >= 1")
        if self.batch_poll_s <= 0 or not 0 < self.batch_discount <= 1:
            raise ValueError("--batch-poll-s must be > 0 and --batch-discount within (0, 1]")
        if self.batch_max_active is not None and self.batch_max_active < 1:
            raise ValueError("--batch-max-active must be at least 1")
        if self.estimate_wave < 0:
            raise ValueError("--estimate-wave must be 0 (off) or a number of calls")

    @property
    def prices(self) -> Prices:
        return Prices(self.price_in or 0.0, self.price_out or 0.0)

    @property
    def priced(self) -> bool:
        return self.price_in is not None or self.price_out is not None

    @property
    def price_factor(self) -> float:
        """What the endpoint charges of the --price-in/--price-out prices: the Batch API less."""
        return self.batch_discount if self.batch_api else 1.0

    @property
    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def prompt_for(self, answer_kind: str) -> Prompt:
        return Prompt.load(self.prompt) if self.prompt else Prompt.default(self.style, answer_kind)


# --- the output folder -------------------------------------------------------------------------


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
    done: KeySet  # cache keys with a row in the output
    partial_files_removed: list[str]
    transient_rows_dropped: int
    journal_rows_recovered: int = 0


def _write_atomically(fs: pafs.FileSystem, table: pa.Table, path: str) -> None:
    tmp = path + ".tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def prepare_output(fs: pafs.FileSystem, root: str) -> ResumeState:
    """Make the output consistent for a (re)run and return the calls already answered.

    A file that does not read back is what a killed run leaves mid-write: its rows were never
    complete, so it is removed (they are still in the journal if they were answered). Rows
    rejected for a transient reason are taken out of their file (rewritten atomically) so their
    retry does not leave the problem in the output twice. Then the journal of an interrupted run
    is compacted into Parquet: every answer it holds that no Parquet file has yet.
    """
    fs.create_dir(root, recursive=True)
    state = ResumeState(KeySet(), [], 0)
    for path in parquet_files(fs, root):
        try:
            table = pq.read_table(path, filesystem=fs)
            if any(c not in table.column_names for c in ADDED_COLUMNS):
                table = conform_annotations(table, path)  # written before them: migrate
                _write_atomically(fs, table, path)
                log.info("%s: added the columns %s (null) of newer annotation rows", path,
                         ", ".join(ADDED_COLUMNS))  # fmt: skip
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
            table = table.filter(pa.array(keep))
            _write_atomically(fs, table, path)
        state.done.update(table.column("cache_key"))
    for path in journal_files(fs, root):
        rows: dict[str, dict[str, Any]] = {}
        for row in read_journal_file(fs, path):
            key = row.get("cache_key")
            if key in state.done or key in rows:
                continue
            if row.get("status") == REJECTED and is_transient(row.get("reason")):
                state.transient_rows_dropped += 1
                continue
            rows[key] = row
        if rows:
            name = posixpath.basename(path).removesuffix(".jsonl")
            _write_atomically(
                fs, annotation_table(rows.values()), posixpath.join(root, f"journal-{name}.parquet")
            )
            state.done.update(rows)
            state.journal_rows_recovered += len(rows)
        fs.delete_file(path)
    if state.journal_rows_recovered:
        log.info("recovered %d answered rows from the journal", state.journal_rows_recovered)
    return state


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


# --- work items --------------------------------------------------------------------------------


def iter_work_items(
    cfg: AnnotateConfig, problems: Iterable[Problem]
) -> Iterator[tuple[dict[str, Any], list[dict[str, str]]]]:
    """(row to compute, its chat messages) per (problem, sample), lazily, samples together."""
    prompts: dict[str, Prompt] = {}
    for p in problems:
        messages: list[dict[str, str]] = []
        if cfg.mode == "gold":
            model, sampling, version = GOLD_TEACHER, {}, GOLD_TEACHER
        else:
            if p.answer_kind not in prompts:  # parse each prompt file once, not per row
                prompts[p.answer_kind] = cfg.prompt_for(p.answer_kind)
            prompt = prompts[p.answer_kind]
            messages = prompt.messages(p, cfg.with_gold_solution)
            model, sampling, version = cfg.model, cfg.sampling, prompt.version
        row = p.to_dict()
        row["gold_steps"] = row.pop("steps")
        for sample in range(cfg.samples):
            key = cache_key(
                model=model,
                messages=messages,
                sampling=sampling,
                prompt_version=version,
                problem_id=p.id,
                sample=sample,
            )
            yield {**row, "sample": sample, "cache_key": key}, messages


def todo_items(
    items: Iterable[tuple[dict[str, Any], list[dict[str, str]]]],
    done: KeySet,
    pending: KeySet,
    keys: KeySet,
) -> Iterator[tuple[dict[str, Any], list[dict[str, str]]]]:
    """`--batch-api`: (row, messages) not yet answered nor in a batch still to collect, lazily.

    Every item's key goes to `keys` (this run's expected rows). A pending key (in an earlier
    run's batch) is expected from this run, which collects it.
    """
    for item, messages in items:
        keys.add(item["cache_key"])
        if item["cache_key"] in done:
            continue
        if item["cache_key"] not in pending:
            yield item, messages


def first_wave(chunks: Iterable[list[dict[str, Any]]], n: int) -> Iterator[list[dict[str, Any]]]:
    """The first `n` rows as a chunk of their own (`--estimate-wave`), then the rest as before."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        return
    yield first[:n]
    if first[n:]:
        yield first[n:]
    yield from it


def todo_chunks(
    items: Iterable[tuple[dict[str, Any], Any]],
    done: KeySet,
    chunk_rows: int,
    keys: KeySet,
) -> Iterator[list[dict[str, Any]]]:
    """Rows not yet answered, in chunks of about `chunk_rows` that never split a problem.

    Every item's key goes to `keys` (this run's expected rows)."""
    chunk: list[dict[str, Any]] = []
    for item, _ in items:
        keys.add(item["cache_key"])
        if item["cache_key"] in done:
            continue
        if len(chunk) >= chunk_rows and item["sample"] == 0:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


# --- the spend estimate ------------------------------------------------------------------------


def token_counter(model: str) -> tuple[Callable[[Sequence[Mapping[str, str]]], int], str]:
    """A prompt-token counter for `model` and what it is: tiktoken where it can, else 4 chars.

    tiktoken fetches its encoding files from the internet on first use, so offline (and for a
    model it does not know) the count falls back to an approximation, and says so.
    """
    try:
        import tiktoken

        enc = tiktoken.encoding_for_model(model)
        enc.encode("warm-up")
    except ImportError:
        why = "tiktoken is not installed"
    except KeyError:
        why = f"tiktoken has no encoding for model {model!r}"
    except Exception as e:  # noqa: BLE001 - offline: a network error of any kind
        why = f"tiktoken could not load its encoding ({type(e).__name__}; offline?)"
    else:
        # OpenAI's chat format: ~4 tokens of framing per message, 3 to prime the reply.
        return (
            lambda msgs: sum(len(enc.encode(m["content"])) + 4 for m in msgs) + 3,
            f"tiktoken {enc.name}",
        )
    return (
        lambda msgs: round(sum(len(m["content"]) / 4 + 4 for m in msgs) + 3),
        f"approximation, 4 characters per token: {why}",
    )


def estimate_spend(cfg: AnnotateConfig, done: KeySet) -> dict[str, Any]:
    """Calls, tokens and USD this run would spend, from one lazy pass over the problems."""
    count, tokenizer = token_counter(cfg.model)
    calls = prompt_tokens = 0
    last_id, last_tokens = None, 0
    spec = DatasetSpec.from_config(cfg)
    for item, messages in iter_work_items(cfg, load_problems(spec)):
        if item["cache_key"] in done:
            continue
        if item["id"] != last_id:  # samples of one problem share their prompt
            last_id, last_tokens = item["id"], count(messages)
        calls += 1
        prompt_tokens += last_tokens
    completion_tokens = calls * cfg.max_tokens
    cost = None
    if cfg.priced:
        cost = cfg.prices.cost(prompt_tokens, completion_tokens) * cfg.price_factor
    return {
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_by": tokenizer,
        "completion_tokens_by": f"--max-tokens {cfg.max_tokens} per call (an upper bound)",
        "cost_usd": None if cost is None else round(cost, 6),
        "pricing": f"Batch API price, x{cfg.batch_discount:g}" if cfg.batch_api else None,
    }


def wave_size(cfg: AnnotateConfig, estimate: dict[str, Any]) -> int:
    """Calls of the first wave (`--estimate-wave`): 0 when there is none, i.e. in gold or Batch
    API mode (a batch's answers come hours later, all at once) or when the wave would be all."""
    if cfg.mode != "teacher" or cfg.batch_api or cfg.estimate_wave <= 0:
        return 0
    return cfg.estimate_wave if estimate["calls"] > cfg.estimate_wave else 0


def revise_estimate(
    cfg: AnnotateConfig, estimate: dict[str, Any], wave: pa.Table
) -> dict[str, Any]:
    """The estimate after a first wave: its rows' real usage and cost, and the rest's completion
    tokens at the wave's mean per answered call. The rest's prompt tokens are the estimate's
    count pro rata (`estimate_spend` counted them for all calls, the wave's among them)."""
    answered = wave.filter(pc.greater(wave["completion_tokens"], 0))
    calls = wave.num_rows
    rest = max(estimate["calls"] - calls, 0)
    mean = _sum(answered["completion_tokens"]) / answered.num_rows if answered.num_rows else None
    prompt_rest = round(estimate["prompt_tokens"] * rest / max(estimate["calls"], 1))
    completion_rest = rest * cfg.max_tokens if mean is None else round(rest * mean)
    out = {
        "wave_calls": calls,
        "wave_answered": answered.num_rows,
        "wave_prompt_tokens": _sum(wave["prompt_tokens"]),
        "wave_completion_tokens": _sum(wave["completion_tokens"]),
        "mean_completion_tokens": None if mean is None else round(mean, 1),
        "rest_calls": rest,
        "rest_prompt_tokens": prompt_rest,
        "rest_completion_tokens": completion_rest,
        "cost_usd": None,
    }
    if cfg.priced:
        wave_cost = cfg.prices.cost(out["wave_prompt_tokens"], out["wave_completion_tokens"])
        rest_cost = cfg.prices.cost(prompt_rest, completion_rest)
        out["wave_cost_usd"] = round(wave_cost * cfg.price_factor, 6)
        out["cost_usd"] = round((wave_cost + rest_cost) * cfg.price_factor, 6)
    return out


def format_revised(r: dict[str, Any]) -> str:
    cost = "" if r["cost_usd"] is None else f": ${r['cost_usd']:.4f} in all"
    mean = r["mean_completion_tokens"]
    per = (
        "no call answered, so still the --max-tokens bound"
        if mean is None
        else f"mean {mean:g} completion tokens per answered call"
    )
    return (
        f"estimate after a first wave of {r['wave_calls']} calls ({per}): "
        f"{r['rest_calls']} calls left, {r['rest_prompt_tokens']} prompt + "
        f"{r['rest_completion_tokens']} completion tokens{cost}"
    )


def format_estimate(e: dict[str, Any]) -> str:
    cost = "no --price-in/--price-out given" if e["cost_usd"] is None else f"${e['cost_usd']:.4f}"
    if e["cost_usd"] is not None and e.get("pricing"):
        cost += f" ({e['pricing']})"
    return (
        f"estimate: {e['calls']} teacher calls, {e['prompt_tokens']} prompt tokens "
        f"({e['prompt_tokens_by']}) + at most {e['completion_tokens']} completion tokens "
        f"({e['completion_tokens_by']}): {cost}"
    )


class SpendRefused(RuntimeError):
    """The estimate is above `--max-cost-usd`: nothing was called."""


# --- rows --------------------------------------------------------------------------------------


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


def verdict_fields(cfg: AnnotateConfig, p: Problem, text: str, style: str) -> dict[str, Any]:
    """How a teacher reply is judged (the online and the Batch API path alike): steps,
    predicted, status, reason, and the per-step check."""
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


def _actor_api_key(cfg: AnnotateConfig) -> Secret:
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
            api_key=_actor_api_key(cfg),
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


# --- running -----------------------------------------------------------------------------------


def _check_api_key(cfg: AnnotateConfig) -> None:
    """Fail before any work when the driver's environment lacks the key (the actors read it
    from their node's environment themselves; it is never passed to them)."""
    if not os.environ.get(cfg.api_key_env) and cfg.base_url is None:
        raise SystemExit(
            f"error: ${cfg.api_key_env} is not set. Export your API key there, or pass "
            "--api-key-env NAME, or --base-url for an endpoint that needs no key."
        )


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


def annotator_kwargs(cfg: AnnotateConfig, budget_usd: float | None) -> dict[str, Any]:
    """What Ray stores for each actor (in the GCS): configuration, never the key."""
    return {"cfg": cfg, "budget_usd": budget_usd}


def _run_chunk(cfg: AnnotateConfig, chunk: list[dict[str, Any]], budget: float | None) -> None:
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


def _cost_of(fs: pafs.FileSystem, files: Iterable[str], prices: Prices) -> float:
    cost = 0.0
    for path in files:
        t = pq.read_table(path, filesystem=fs, columns=["prompt_tokens", "completion_tokens"])
        cost += prices.cost(
            pc.sum(t["prompt_tokens"]).as_py() or 0, pc.sum(t["completion_tokens"]).as_py() or 0
        )
    return cost


def _run_online(
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
        _run_chunk(cfg, chunk, budget)
        del chunk  # before the next is built: two chunks alive at once fragment the heap
        if cfg.mode == "teacher":
            clear_journal(fs, root)  # every journaled row of the chunk is in Parquet now
        written = set(parquet_files(fs, root)) - before
        if cfg.max_cost_usd is not None:
            spent += _cost_of(fs, written, cfg.prices)
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


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Annotate and return the summary (also written to `<output>/summary.json`)."""
    t0 = time.perf_counter()
    fs, root = output_fs(cfg.output)
    if cfg.mode == "teacher":
        _check_api_key(cfg)
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
    state = prepare_output(fs, root)
    runner, pending = None, KeySet()
    if cfg.batch_api:
        from pipelines.batch_api import BatchRunner  # imports this module: not at the top

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
        stopped = _run_online(cfg, fs, root, chunks, online_estimate)
        batches = None

    summary = summarize(cfg, fs, root, keys, state, time.perf_counter() - t0, estimate, stopped)
    if batches is not None:
        summary["batches"] = batches
    summary["warnings"] = warnings
    with fs.open_output_stream(posixpath.join(root, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _reason_group(reason: str) -> str:
    """`api_error: 429: Too many requests` -> `api_error: 429`, so reasons count by kind."""
    parts = reason.split(": ")
    return ": ".join(parts[:2]) if parts[0] == "api_error" else reason


def _sum(column: pa.ChunkedArray) -> int:
    return int(pc.sum(column).as_py() or 0)


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
        accepted += _sum(pc.equal(rows["status"], "accepted").cast(pa.int64()))
        rejected = rows.filter(pc.equal(rows["status"], REJECTED))
        reasons.update(_reason_group(r) for r in rejected["reason"].to_pylist())
        step_checks.update(x for x in rows["step_check"].to_pylist() if x is not None)
        prompt_tokens += _sum(new["prompt_tokens"])
        completion_tokens += _sum(new["completion_tokens"])
        calls += _sum(new["attempts"])
        first_calls += _sum(pc.greater(new["attempts"], 0).cast(pa.int64()))
        if cfg.samples > 1:  # one sample a problem cannot repeat a decomposition
            decomposed = rows.filter(pc.is_valid(rows["decomposition"]))
            ids, ds = decomposed["id"].to_pylist(), decomposed["decomposition"].to_pylist()
            decompositions.update(json.dumps(pair) for pair in zip(ids, ds, strict=True))
    distinct = int(seen.sum())
    repeated = decompositions.count - len(decompositions)
    cost = None
    if cfg.priced:
        cost = round(cfg.prices.cost(prompt_tokens, completion_tokens) * cfg.price_factor, 6)
    return {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "mode": cfg.mode,
        "teacher": cfg.model if cfg.mode == "teacher" else GOLD_TEACHER,
        "output": cfg.output,
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
    if summary.get("dry_run"):
        return 0  # the estimate is printed already
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    # Run through the importable module, so Ray ships `pipelines.annotate.TeacherAnnotator` by
    # reference (workers import it) rather than pickling a `__main__` copy of it.
    from pipelines.annotate import main as _main

    sys.exit(_main())
