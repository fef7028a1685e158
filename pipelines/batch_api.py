"""The OpenAI Batch API for annotation (`annotate.py --batch-api`).

The requests are the ones the online path sends (`Prompt.messages`, `--temperature`,
`--max-tokens`; the same cache keys, so a batch row and an online row of one problem-sample are
the same row), written as JSONL, uploaded through the files API and run as batches at the
provider's batch price. The driver polls them and turns every output or error line into the row
the online path would write, judged by the same function (`judging.teacher_row`). It is a
handful of HTTP calls and the judging, so it runs in the driver: no Ray actors.

Everything about one batch lives under `<output>/_batches/<name>.*`, on the output's filesystem:

* `<name>.items.arrow`: the work items (problem fields, sample, cache key, teacher, prompt
  version and style), enough to judge the answers without reading the dataset again. Arrow IPC
  rather than Parquet, so that nothing reading the output's `*.parquet` takes it for rows.
* `<name>.jsonl`: the exact requests uploaded.
* `<name>.json`: the record, always written atomically: `uploaded` (input file id) right after
  the upload, `submitted` (batch id) once the batch exists, `collected` once its rows are in
  `batch-<name>-NNNNN.parquet` in the output root.
* `<name>.output.jsonl`, `<name>.error.jsonl`: the provider's result files, downloaded whole
  before they are read, so paid answers are ours even if the provider's copy expires.

Once a batch is collected (and what it left unanswered resubmitted), its data files are deleted
and its record kept, and its input, output and error files are deleted at the provider, unless
`--batch-keep-files`: they are as large as the rows themselves, a job of millions of requests
would otherwise double the output, and the provider's copies count against its file storage.

Paying once: a run reads the records first. The keys of every batch not yet collected are
pending: never submitted again, their batches are polled and collected. A record killed between
upload and create has no batch id: the run looks for a batch made from its input file
(`batches.list`) before creating one, and does the same before it retries a create that failed in
transit, so neither a kill nor a dropped connection makes a second batch of the same requests.
Rows are written before their record says `collected`, and resubmissions made after that, so a
kill between any two steps either collects the same files again (the same rows under the same
file names) or leaves the requests to do; it never pays for them twice.

A request a batch left unanswered (an expired or failed batch, a lost output file: no line, or
a `batch_expired` line) gets no row: it is submitted again in a new batch (round + 1) in the same
run, up to `--batch-max-rounds`, and counted. A lost output file is reported loudly: its answers
were paid for. Error lines become rejected rows with the online path's reasons (`api_error:
429: ...`), so a rerun retries the transient ones as it does online ones. A line with a fatal
status (401/403/404) stops the run like an online call would, with no row, so that the rerun
after the fix asks again. A cancelled batch keeps what it answered; someone cancelled it on
purpose, so the rest is left for a rerun rather than resubmitted.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.annotate_config import AnnotateConfig
from pipelines.annotator import actor_api_key
from pipelines.judging import teacher_row
from pipelines.keys import KeySet
from pipelines.output import write_atomically
from pipelines.prompting import Prompt
from pipelines.spend import token_counter
from pipelines.teacher_client import (
    CallResult,
    FatalTeacherError,
    RetryPolicy,
    TransientTeacherError,
    body_message,
    error_message,
    fatal_for,
    teacher_error,
)
from socratic.records import ANNOTATION_SCHEMA, annotation_table, problem_from_row

log = logging.getLogger("annotate.batch")

BATCH_DIR = "_batches"
ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "failed", "cancelled")
UNANSWERED_CODES = ("batch_expired", "batch_cancelled")  # error lines that are no answer at all
ROWS_PER_PART = 5000
PROGRESS_EVERY_S = 60.0
# Batches listed before a file's upload cannot be made from it: how far back to look for one.
FIND_MARGIN_S = 3600.0
_ITEM_FIELDS = ("id", "dataset", "split", "question", "answer", "solution", "gold_steps")
_ITEM_FIELDS += ("sample", "cache_key", "teacher", "prompt_version", "style")
ITEM_SCHEMA = pa.schema([ANNOTATION_SCHEMA.field(name) for name in _ITEM_FIELDS])


def request_line(
    custom_id: str, model: str, messages: Sequence[Mapping[str, str]], sampling: Mapping[str, Any]
) -> bytes:
    """One line of a batch input file: the chat request the online path would send."""
    body = {"model": model, "messages": list(messages), **sampling}
    line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


def parse_line(
    line: Mapping[str, Any],
) -> tuple[str | None, CallResult | None, FatalTeacherError | None]:
    """(custom_id, the call's result, a fatal status) of one output or error file line.

    The result is None for a request that was never answered (`batch_expired`, a line without a
    response): it gets no row. An error status becomes the reason the online client writes for
    the same status, so `is_transient` sorts it the same way.
    """
    custom_id = line.get("custom_id")
    response = line.get("response")
    if isinstance(response, Mapping):
        code = int(response.get("status_code") or 0)
        body = response.get("body")
        if 200 <= code < 300 and isinstance(body, Mapping):
            choices = body.get("choices") or []
            first = choices[0] if choices and isinstance(choices[0], Mapping) else {}
            text = (first.get("message") or {}).get("content")
            usage = body.get("usage") or {}
            return (
                custom_id,
                CallResult(
                    text or "",
                    int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0),
                    attempts=1,
                ),
                None,
            )
        message = body_message(body, f"Error code: {code}")
        fatal = fatal_for(code, message)
        if fatal is not None:
            return custom_id, None, fatal
        kind = "malformed_response" if 200 <= code < 300 else str(code)
        return custom_id, CallResult(None, attempts=1, error=f"api_error: {kind}: {message}"), None
    error = line.get("error")
    if isinstance(error, Mapping):
        code = str(error.get("code") or "batch_error")
        if code in UNANSWERED_CODES:
            return custom_id, None, None
        message = str(error.get("message") or code)[:200]
        return custom_id, CallResult(None, attempts=1, error=f"api_error: {code}: {message}"), None
    return custom_id, None, None


# --- records and their files -------------------------------------------------------------------


@dataclass
class BatchRecord:
    """What `<name>.json` says about one batch."""

    name: str
    round: int = 1
    parent: str | None = None  # the batch whose unanswered requests this one resubmits
    state: str = "written"  # uploaded | submitted | collected (never saved as "written")
    requests: int = 0
    bytes: int = 0
    estimated_cost_usd: float | None = None
    input_file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the provider's, as last polled
    request_counts: dict[str, int] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    uploaded_at: float | None = None
    submitted_at: float | None = None
    collected_at: float | None = None
    collected: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class BatchStore:
    """The `_batches/` folder of an output, on its pyarrow filesystem (local or s3://)."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self.dir = posixpath.join(root, BATCH_DIR)

    def path(self, name: str, suffix: str) -> str:
        return posixpath.join(self.dir, name + suffix)

    def new_name(self, round_: int) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return f"{stamp}-r{round_}-{uuid.uuid4().hex[:8]}"

    def _files(self) -> list[str]:
        if self.fs.get_file_info(self.dir).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir))
        return sorted(posixpath.basename(f.path) for f in infos if f.type == pafs.FileType.File)

    def records(self) -> list[BatchRecord]:
        out = []
        for base in self._files():
            if base.endswith(".json"):
                with self.fs.open_input_stream(posixpath.join(self.dir, base)) as f:
                    out.append(BatchRecord.from_dict(json.loads(f.read())))
        return out

    def save(self, rec: BatchRecord) -> None:
        path = self.path(rec.name, ".json")
        with self.fs.open_output_stream(path + ".tmp") as f:
            f.write(json.dumps(asdict(rec), indent=2).encode())
        self.fs.move(path + ".tmp", path)

    def items(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(name, ".items.arrow")) as f:
            table = pa.ipc.open_file(f).read_all()
        return table.select(list(columns)) if columns else table

    def lines(self, name: str, suffix: str = ".jsonl") -> Iterator[bytes]:
        return iter_lines(self.fs, self.path(name, suffix))

    def exists(self, name: str, suffix: str) -> bool:
        return self.fs.get_file_info(self.path(name, suffix)).type == pafs.FileType.File

    def delete(self, name: str, *, keep_record: bool = False) -> list[str]:
        """Delete a batch's files. `keep_record` prunes a collected batch: its data files
        (items, requests, the provider's result files) go, its record stays; its rows are in
        Parquet, and the files were as large as the rows."""
        removed = []
        for base in self._files():
            if base.startswith(name + ".") and not (keep_record and base == name + ".json"):
                self.fs.delete_file(posixpath.join(self.dir, base))
                removed.append(base)
        return removed

    def cleanup(self, prune_collected: bool = True) -> list[str]:
        """Remove what a killed run left before any record named it (nothing was paid for it:
        a batch is only ever made from a file whose upload a record names), and the data files of
        collected batches that a kill left before their prune."""
        files = self._files()
        named = {b.removesuffix(".json") for b in files if b.endswith(".json")}
        removed = []
        if prune_collected:
            for rec in self.records():
                if rec.state == "collected":
                    removed += self.delete(rec.name, keep_record=True)
            files = [b for b in files if b not in removed]
        for base in files:
            if base.split(".", 1)[0] not in named or base.endswith(".tmp"):
                self.fs.delete_file(posixpath.join(self.dir, base))
                removed.append(base)
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            base = posixpath.basename(info.path)
            if base.startswith("batch-") and base.endswith(".parquet.tmp"):
                self.fs.delete_file(info.path)
                removed.append(base)
        if removed:
            log.info("removed %d batch files an interrupted run left behind", len(removed))
        return removed


def iter_lines(fs: pafs.FileSystem, path: str, block: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a file on any pyarrow filesystem, streamed (their input streams have no
    readline)."""
    rest = b""
    with fs.open_input_stream(path) as f:
        while True:
            data = f.read(block)
            if not data:
                break
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            yield from (line for line in lines if line.strip())
    if rest.strip():
        yield rest


# --- writing batches ---------------------------------------------------------------------------


@dataclass
class Chunk:
    """A batch's files, written and not yet uploaded."""

    name: str
    round: int = 1
    parent: str | None = None
    requests: int = 0
    bytes: int = 0
    prompt_tokens: int = 0


class _ChunkWriter:
    """Writes a chunk's request lines and items as they come: a chunk is never held whole."""

    def __init__(self, store: BatchStore, chunk: Chunk) -> None:
        self.chunk = chunk
        store.fs.create_dir(store.dir, recursive=True)
        self._jsonl = store.fs.open_output_stream(store.path(chunk.name, ".jsonl"))
        self._sink = store.fs.open_output_stream(store.path(chunk.name, ".items.arrow"))
        self._writer = pa.ipc.new_file(self._sink, ITEM_SCHEMA)
        self._rows: list[dict[str, Any]] = []
        self.keys: set[str] = set()

    def add(self, row: dict[str, Any], line: bytes, tokens: int = 0) -> None:
        self._jsonl.write(line)
        self._rows.append(row)
        self.keys.add(row["cache_key"])
        self.chunk.requests += 1
        self.chunk.bytes += len(line)
        self.chunk.prompt_tokens += tokens
        if len(self._rows) >= 4096:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        self._writer.write_table(table.cast(ITEM_SCHEMA))

    def write_line(self, line: bytes) -> None:
        self._jsonl.write(line)
        self.chunk.requests += 1
        self.chunk.bytes += len(line)

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=ITEM_SCHEMA))
            self._rows = []

    def close(self) -> Chunk:
        self._flush()
        self._writer.close()
        self._sink.close()
        self._jsonl.close()
        return self.chunk


def chunk_requests(
    cfg: AnnotateConfig,
    store: BatchStore,
    items: Iterable[tuple[dict[str, Any], list[dict[str, str]]]],
    count: Callable[[Sequence[Mapping[str, str]]], int] | None = None,
) -> Iterator[Chunk]:
    """Work items as batch files under --batch-max-requests and --batch-max-bytes, lazily: each
    chunk is written to `_batches/` as its items arrive and yielded once it is full."""
    prompts: dict[str, Prompt] = {}
    writer: _ChunkWriter | None = None
    last_id, last_tokens = None, 0
    try:
        for item, messages in items:
            key = item["cache_key"]
            line = request_line(key, cfg.model, messages, cfg.sampling)
            if len(line) > cfg.batch_max_bytes:
                raise ValueError(
                    f"the request for {item['id']} (sample {item['sample']}) is {len(line)} bytes, "
                    f"above --batch-max-bytes {cfg.batch_max_bytes}"
                )
            if writer is not None and (
                writer.chunk.requests >= cfg.batch_max_requests
                or writer.chunk.bytes + len(line) > cfg.batch_max_bytes
            ):
                full, writer = writer, None
                yield full.close()
            if writer is None:
                writer = _ChunkWriter(store, Chunk(store.new_name(1)))
            if key in writer.keys:  # the provider refuses a batch with a custom_id twice
                log.warning("%s sample %s is in the dataset twice; asked once", item["id"], key)
                continue
            kind = problem_from_row(item).answer_kind
            if kind not in prompts:  # parse each prompt file once, not per row
                prompts[kind] = cfg.prompt_for(kind)
            tokens = 0
            if count is not None:
                if item["id"] != last_id:  # samples of one problem share their prompt
                    last_id, last_tokens = item["id"], count(messages)
                tokens = last_tokens
            row = {k: item[k] for k in _ITEM_FIELDS[:9]}
            row.update(teacher=cfg.model, prompt_version=prompts[kind].version)
            row["style"] = prompts[kind].style
            writer.add(row, line, tokens)
        if writer is not None:
            last, writer = writer, None
            yield last.close()
    finally:
        if writer is not None:  # stopped mid-chunk: its files were never uploaded
            name = writer.chunk.name
            writer.close()
            store.delete(name)


# --- running -----------------------------------------------------------------------------------


@dataclass
class BatchReport:
    """What the batches of one run did, for the summary."""

    max_rounds: int
    new: int = 0
    resumed: int = 0
    requests: int = 0
    resubmitted_requests: int = 0
    expired: int = 0
    failed: int = 0
    cancelled: int = 0
    lost_output_files: int = 0
    lost_output_requests: int = 0
    unanswered_requests: int = 0
    provider_files_deleted: int = 0
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    still_running: list[str] = field(default_factory=list)
    stopped: str | None = None
    warnings: list[str] = field(default_factory=list)

    def note(self, rec: BatchRecord) -> None:
        self.batches[rec.name] = {
            "name": rec.name,
            "batch_id": rec.batch_id,
            "round": rec.round,
            "requests": rec.requests,
            "status": rec.status,
            "state": rec.state,
        }

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("batches", "warnings")}
        out.pop("stopped")
        batches = list(self.batches.values())
        out["batches"] = len(batches)
        out["ids"] = [b["batch_id"] for b in batches if b["batch_id"]]
        out["by_status"] = dict(Counter(b["status"] or b["state"] for b in batches))
        out["list"] = batches
        return out


class BatchRunner:
    """Submit, poll and collect the batches of one annotation run (in the driver)."""

    def __init__(
        self, cfg: AnnotateConfig, fs: pafs.FileSystem, root: str, client: Any = None
    ) -> None:
        self.cfg = cfg
        self.store = BatchStore(fs, root)
        self.report = BatchReport(max_rounds=cfg.batch_max_rounds)
        self.retry = RetryPolicy(max_retries=cfg.max_retries, base_s=cfg.retry_base)
        self._client = client
        self._rng = random.Random(cfg.seed)
        self._said: dict[str, tuple[tuple[Any, ...], float]] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(
                base_url=self.cfg.base_url,
                api_key=actor_api_key(self.cfg).get(),
                max_retries=0,  # ours, counted and backed off (`_call`)
                timeout=self.cfg.timeout,
            )
        return self._client

    def pending_keys(self) -> KeySet:
        """Cache keys in batches an earlier run submitted and did not collect."""
        keys = KeySet()
        for rec in self.store.records():
            if rec.state != "collected":
                keys.update(self.store.items(rec.name, ["cache_key"])["cache_key"])
        return keys

    def run(self, items: Iterable[tuple[dict[str, Any], list[dict[str, str]]]]) -> BatchReport:
        """Collect the earlier run's batches and submit `items` as new ones, until every batch
        is collected (or --batch-max-wait-s passes, or --max-cost-usd stops new submissions)."""
        cfg, report = self.cfg, self.report
        self.store.cleanup(prune_collected=not cfg.batch_keep_files)
        active: list[BatchRecord] = []
        for rec in self.store.records():
            if rec.state == "collected":
                continue
            report.resumed += 1
            log.info(
                "resuming batch %s (%s, %d requests) from an earlier run",
                rec.batch_id or rec.name,
                rec.state,
                rec.requests,
            )
            if rec.batch_id is None:
                self._create(rec, search=True)
            report.note(rec)
            active.append(rec)
        count = None
        if cfg.max_cost_usd is not None:
            count, _ = token_counter(cfg.model)
        chunks = chunk_requests(cfg, self.store, items, count)
        more, committed = True, 0.0
        deadline = None
        if cfg.batch_max_wait_s is not None:
            deadline = time.monotonic() + cfg.batch_max_wait_s
        try:
            while True:
                while more and (cfg.batch_max_active is None or len(active) < cfg.batch_max_active):
                    chunk = next(chunks, None)
                    if chunk is None:
                        more = False
                        break
                    cost = self._cost(chunk)
                    if cfg.max_cost_usd is not None and committed + cost > cfg.max_cost_usd:
                        self.store.delete(chunk.name)
                        report.stopped = (
                            f"--max-cost-usd {cfg.max_cost_usd:g}: the next batch would bring the "
                            f"estimated cost of the submitted ones to ${committed + cost:.4f}; "
                            "the rest was not submitted"
                        )
                        more = False
                        break
                    committed += cost
                    active.append(self._submit(chunk))
                if not active:
                    break
                for rec in list(active):
                    batch = self._poll(rec)
                    if batch.status in TERMINAL:
                        active.remove(rec)
                        # A resubmission is not held to the cap: its requests went unanswered
                        # (unpaid) and are in the estimate of the batch they came from.
                        try:
                            again = self._collect(rec, batch)
                        finally:
                            if rec.state == "collected" and not cfg.batch_keep_files:
                                self.store.delete(rec.name, keep_record=True)
                                self._delete_provider_files(rec)
                        if again is not None:
                            active.append(again)
                if not active and not more:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    report.stopped = (f"{report.stopped}; " if report.stopped else "") + (
                        f"--batch-max-wait-s {cfg.batch_max_wait_s:g} passed with "
                        f"{len(active)} batches still running"
                        + (" and more not yet submitted" if more else "")
                    )
                    break
                if active:
                    time.sleep(cfg.batch_poll_s)
        finally:
            chunks.close()
        report.still_running = [rec.batch_id or rec.name for rec in active]
        return report

    def _cost(self, chunk: Chunk) -> float:
        completion = chunk.requests * self.cfg.max_tokens
        return self.cfg.prices.cost(chunk.prompt_tokens, completion) * self.cfg.price_factor

    # --- the provider's API ---

    def _retry_delay(self, what: str, exc: Exception, attempt: int) -> float:
        """Backoff before retrying a failed API call, or the FatalTeacherError that ends it."""
        import openai

        if not isinstance(exc, openai.OpenAIError):
            raise exc
        err = teacher_error(exc)
        if isinstance(err, FatalTeacherError):
            hint = ""
            if err.status == 404:
                hint = " (--batch-api needs OpenAI's /v1/files and /v1/batches endpoints)"
            raise FatalTeacherError(
                f"Batch API, {what}: {err}{hint}", kind=err.kind, status=err.status
            ) from None
        if not isinstance(err, TransientTeacherError) or attempt >= self.retry.max_retries:
            retried = isinstance(err, TransientTeacherError)
            tries = f" after {attempt + 1} attempts" if retried else ""
            raise FatalTeacherError(
                f"Batch API, {what}: {err.reason}{tries}", kind=err.kind, status=err.status
            ) from None
        delay = self.retry.delay(attempt, err.retry_after, self._rng)
        log.warning("Batch API, %s: %s (%s); retrying in %.1f s", what, err.kind, err, delay)
        return delay

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified in _retry_delay
                time.sleep(self._retry_delay(what, exc, attempt))
                attempt += 1

    def _submit(self, chunk: Chunk) -> BatchRecord:
        rec = self.upload(chunk)
        self._create(rec, search=False)
        self.report.new += 1
        self.report.requests += rec.requests
        self.report.note(rec)
        log.info(
            "submitted batch %s: %d requests, %d bytes (round %d)",
            rec.batch_id,
            rec.requests,
            rec.bytes,
            rec.round,
        )
        return rec

    def upload(self, chunk: Chunk) -> BatchRecord:
        """Upload a chunk's requests; its record (state `uploaded`) names the file from then on."""
        cfg, store = self.cfg, self.store
        rec = BatchRecord(
            name=chunk.name,
            round=chunk.round,
            parent=chunk.parent,
            requests=chunk.requests,
            bytes=chunk.bytes,
            estimated_cost_usd=round(self._cost(chunk), 6) if cfg.priced else None,
        )
        try:
            with store.fs.open_input_file(store.path(chunk.name, ".jsonl")) as f:

                def upload() -> Any:
                    f.seek(0)  # a retry sends the file from its start
                    return self.client.files.create(
                        file=(f"{chunk.name}.jsonl", f, "application/jsonl"),
                        purpose="batch",
                        timeout=max(cfg.timeout, 600.0),
                    )

                uploaded = self._call(f"uploading {chunk.name}.jsonl", upload)
        except BaseException:
            store.delete(chunk.name)  # no record names it: nothing can be paid for it
            raise
        rec.input_file_id, rec.state, rec.uploaded_at = uploaded.id, "uploaded", time.time()
        store.save(rec)
        return rec

    def _create(self, rec: BatchRecord, *, search: bool) -> None:
        """The batch of an uploaded file: found (made before a kill or a lost reply) or made."""
        attempt = 0
        while True:
            batch = self._find(rec) if search else None
            if batch is not None:
                log.info("found batch %s made from %s", batch.id, rec.input_file_id)
                break
            try:
                batch = self.client.batches.create(
                    input_file_id=rec.input_file_id,
                    endpoint=ENDPOINT,
                    completion_window=self.cfg.batch_window,
                    metadata={"socratic_batch": rec.name},
                )
                break
            except Exception as exc:  # noqa: BLE001 - classified in _retry_delay
                time.sleep(self._retry_delay(f"creating batch {rec.name}", exc, attempt))
                attempt += 1
                search = True  # it may exist though its reply was lost: look before retrying
        rec.batch_id, rec.state, rec.status = batch.id, "submitted", batch.status
        rec.submitted_at = time.time()
        self.store.save(rec)

    def _find(self, rec: BatchRecord) -> Any:
        since = (rec.uploaded_at or 0) - FIND_MARGIN_S
        page = self._call("listing batches", lambda: self.client.batches.list(limit=100))
        while True:
            for batch in page.data:  # newest first
                if batch.input_file_id == rec.input_file_id:
                    return batch
                if batch.created_at < since:
                    return None
            if not page.has_next_page():
                return None
            page = self._call("listing batches", page.get_next_page)

    def _poll(self, rec: BatchRecord) -> Any:
        batch = self._call(
            f"polling batch {rec.batch_id}", lambda: self.client.batches.retrieve(rec.batch_id)
        )
        counts = batch.request_counts
        done, failed, total = (
            (counts.completed, counts.failed, counts.total) if counts else (0,) * 3
        )
        state = (batch.status, done, failed)
        last, at = self._said.get(rec.name, (None, 0.0))
        now = time.monotonic()
        if state != last or now - at >= PROGRESS_EVERY_S:
            log.info(
                "batch %s: %s, %d/%d done, %d failed", batch.id, batch.status, done, total, failed
            )
            self._said[rec.name] = (state, now)
        if batch.status != rec.status:
            rec.status = batch.status
            rec.request_counts = {"completed": done, "failed": failed, "total": total}
            self.store.save(rec)
            self.report.note(rec)
        return batch

    def _download(self, rec: BatchRecord, file_id: str, suffix: str) -> bool:
        """The provider's file, copied whole into `_batches/` (tmp, then moved): False on 404."""
        import openai

        path = self.store.path(rec.name, suffix)
        if self.store.exists(rec.name, suffix):
            return True  # an earlier collect of the same batch downloaded it

        def fetch() -> bool:
            try:
                with (
                    self.client.files.with_streaming_response.content(
                        file_id, timeout=max(self.cfg.timeout, 600.0)
                    ) as r,
                    self.store.fs.open_output_stream(path + ".tmp") as out,
                ):
                    for data in r.iter_bytes(1 << 20):
                        out.write(data)
            except openai.NotFoundError:
                return False
            self.store.fs.move(path + ".tmp", path)
            return True

        return self._call(f"downloading {file_id} of batch {rec.batch_id}", fetch)

    # --- collecting ---

    def _collect(self, rec: BatchRecord, batch: Any) -> BatchRecord | None:
        """Rows from a finished batch's files; returns the batch resubmitting what it left
        unanswered, if any."""
        cfg, store, report = self.cfg, self.store, self.report
        items = store.items(rec.name)
        index = {k: i for i, k in enumerate(items["cache_key"].to_pylist())}
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        counts: Counter[str] = Counter()
        fatal: FatalTeacherError | None = None
        lost = False
        part = 0

        def flush() -> None:
            nonlocal part, rows
            path = posixpath.join(store.root, f"batch-{rec.name}-{part:05d}.parquet")
            write_atomically(store.fs, annotation_table(rows), path)
            part, rows = part + 1, []

        files = [(batch.output_file_id, ".output.jsonl"), (batch.error_file_id, ".error.jsonl")]
        for file_id, suffix in files:
            if not file_id:
                continue
            if not self._download(rec, file_id, suffix):
                if suffix == ".output.jsonl":
                    lost = True
                else:
                    log.warning("batch %s: its error file %s is gone", batch.id, file_id)
                continue
            for raw in store.lines(rec.name, suffix):
                try:
                    line = json.loads(raw)
                except ValueError:
                    counts["unreadable_lines"] += 1
                    continue
                key, result, fatal_status = parse_line(line)
                if key not in index or key in seen:
                    counts["unknown_lines"] += 1
                    continue
                if fatal_status is not None:
                    fatal = fatal or fatal_status
                    seen.add(key)
                    counts["fatal"] += 1
                    continue
                if result is None:
                    continue  # never answered: no row, resubmitted below
                seen.add(key)
                item = items.slice(index[key], 1).to_pylist()[0]
                row = teacher_row(
                    cfg,
                    problem_from_row(item),
                    item,
                    result,
                    teacher=item["teacher"],
                    prompt_version=item["prompt_version"],
                    style=item["style"],
                )
                rows.append(row)
                counts["answered" if result.error is None else "errors"] += 1
                if len(rows) >= ROWS_PER_PART:
                    flush()
        if rows:
            flush()
        missing = set(index) - seen
        paid = batch.request_counts.completed if batch.request_counts else 0
        if lost:
            report.lost_output_files += 1
            report.lost_output_requests += paid
            message = (
                f"batch {batch.id}: its output file {batch.output_file_id} is gone (404): "
                f"{paid} answers were paid for and cannot be downloaded; their requests are "
                "submitted again"
            )
            log.error(message)
            report.warnings.append(message)
        if batch.status == "expired":
            report.expired += 1
        elif batch.status == "failed":
            report.failed += 1
            errors = [e.message for e in (batch.errors.data or [])] if batch.errors else []
            log.warning("batch %s failed: %s", batch.id, "; ".join(map(str, errors)) or "no reason")
        elif batch.status == "cancelled":
            report.cancelled += 1
        rec.state, rec.status, rec.collected_at = "collected", batch.status, time.time()
        rec.output_file_id, rec.error_file_id = batch.output_file_id, batch.error_file_id
        rec.collected = {
            "rows": counts["answered"] + counts["errors"],
            **counts,
            "unanswered": len(missing),
            "lost_output": lost,
            "parts": part,
        }
        store.save(rec)  # the rows are in Parquet: from here on the batch is done
        report.note(rec)
        log.info(
            "collected batch %s (%s): %d answers, %d error rows, %d unanswered",
            batch.id,
            batch.status,
            counts["answered"],
            counts["errors"],
            len(missing),
        )
        if fatal is not None:
            raise FatalTeacherError(f"Batch API, batch {batch.id}: {fatal}")
        if not missing:
            return None
        if batch.status == "cancelled":
            log.warning(
                "batch %s was cancelled: %d requests left for a rerun", batch.id, len(missing)
            )
            return None
        if rec.round >= cfg.batch_max_rounds:
            report.unanswered_requests += len(missing)
            message = (
                f"{len(missing)} requests of batch {batch.id} still unanswered after "
                f"{rec.round} rounds (--batch-max-rounds): rerun to submit them again"
            )
            log.warning(message)
            report.warnings.append(message)
            return None
        again = self._resubmit(rec, missing)
        rec.collected["resubmitted_as"] = again.name
        store.save(rec)
        return again

    def _delete_provider_files(self, rec: BatchRecord) -> None:
        """Delete a collected batch's input, output and error files at the provider: they count
        against the organisation's file storage, and the rows are ours now. A file that will
        not go is left there with a warning; it never fails the run."""
        import openai

        for file_id in (rec.input_file_id, rec.output_file_id, rec.error_file_id):
            if not file_id:
                continue
            try:
                self.client.files.delete(file_id)
                self.report.provider_files_deleted += 1
            except openai.NotFoundError:
                pass  # gone already (a lost output file, an earlier run's delete)
            except Exception as exc:  # noqa: BLE001 - a leftover file costs storage, not rows
                log.warning(
                    "batch %s: could not delete file %s at the provider (%s); it stays there",
                    rec.batch_id,
                    file_id,
                    error_message(exc),
                )

    def _resubmit(self, rec: BatchRecord, missing: set[str]) -> BatchRecord:
        """A new batch (round + 1) of exactly the requests `rec` left unanswered."""
        store = self.store
        items = store.items(rec.name)
        keep = pc.is_in(items["cache_key"], value_set=pa.array(sorted(missing), pa.string()))
        writer = _ChunkWriter(store, Chunk(store.new_name(rec.round + 1), rec.round + 1, rec.name))
        try:
            writer.add_table(items.filter(keep))
            for line in store.lines(rec.name):
                if json.loads(line)["custom_id"] in missing:
                    writer.write_line(line + b"\n")
        finally:
            chunk = writer.close()
        self.report.resubmitted_requests += chunk.requests
        log.info(
            "resubmitting %d requests batch %s left unanswered (round %d)",
            chunk.requests,
            rec.batch_id,
            chunk.round,
        )
        return self._submit(chunk)
