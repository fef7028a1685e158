"""The annotation output folder: its Parquet files, and making it consistent for a (re)run.

Resume lives here: `prepare_output` removes what an interrupted run left half-written, drops
rows rejected for a transient reason (they are retried), compacts the journal into Parquet and
returns the cache keys already answered, which the rerun skips (`pipelines/work_items.py`).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.journal import journal_files, read_journal_file
from pipelines.keys import KeySet
from pipelines.prompting import is_transient
from socratic.records import ADDED_COLUMNS, REJECTED, annotation_table, conform_annotations

log = logging.getLogger("annotate")


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


def write_atomically(fs: pafs.FileSystem, table: pa.Table, path: str) -> None:
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
                write_atomically(fs, table, path)
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
            write_atomically(fs, table, path)
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
            write_atomically(
                fs, annotation_table(rows.values()), posixpath.join(root, f"journal-{name}.parquet")
            )
            state.done.update(rows)
            state.journal_rows_recovered += len(rows)
        fs.delete_file(path)
    if state.journal_rows_recovered:
        log.info("recovered %d answered rows from the journal", state.journal_rows_recovered)
    return state


def column_sum(column: pa.Array | pa.ChunkedArray) -> int:
    """The sum of an integer column of annotation rows (token counts, attempts); 0 when empty."""
    return int(pc.sum(column).as_py() or 0)
