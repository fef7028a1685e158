"""Every paid teacher answer made durable the moment it arrives: a row journal per actor.

Ray Data writes a block's rows only once the whole block is done, so a `kill -9` used to lose
every answer of the blocks in flight (about 80 of 400 in the issue #15 measurement) and the
rerun paid for them again. Each actor therefore appends every finished row, as one JSON line,
to its own file under `<output>/_journal/` before handing it on; the next run compacts the
journal into ordinary Parquet (`prepare_output` in `output.py`) and resumes from it like any
other finished row. A successful run deletes the journal once its rows are in Parquet.

On a local disk each row is written and flushed at once (one `write(2)`: it survives the
process being killed, though not the machine losing power; no fsync per row). An object store
has no append, so rows are buffered and written as a new small object at most `flush_s` after
the first of them arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger("annotate.journal")
JOURNAL_DIR = "_journal"


def absolute(path: str) -> str:
    """A local path made absolute against this process's working dir (`~` expanded, symlinks
    kept: a dataset file's name says its format); a URI (`s3://`, anything with `://`) as it is.

    Call it on the driver, once, before a path reaches a Ray task or actor: a worker resolves a
    relative path against its own working dir, which under `ray job submit --working-dir` (or on
    another node) is not the driver's, so it would read or write somewhere else, silently."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def output_fs(output: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path of an output given as a local path or a URI."""
    if "://" in output:
        return pafs.FileSystem.from_uri(output)
    return pafs.LocalFileSystem(), str(Path(output).resolve())


class Journal:
    """Append-only JSON lines of finished rows, one file (or object series) per writer."""

    def __init__(self, output: str, *, flush_s: float = 0.5) -> None:
        self.fs, root = output_fs(output)
        self.dir = posixpath.join(root, JOURNAL_DIR)
        self.fs.create_dir(self.dir, recursive=True)
        self.name = uuid.uuid4().hex[:12]
        self.flush_s = flush_s
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.rows = 0
        self._file = None
        self._buffer: list[str] = []
        self._objects = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        if self.local:
            self._file = open(  # noqa: SIM115 - held open for the actor's lifetime
                posixpath.join(self.dir, f"{self.name}.jsonl"), "a", encoding="utf-8"
            )

    def add(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        self.rows += 1
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
            return
        self._buffer.append(line)
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if self._file is not None:
            self._file.flush()
            return
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        self._objects += 1
        path = posixpath.join(self.dir, f"{self.name}-{self._objects:06d}-{time.time_ns()}.jsonl")
        with self.fs.open_output_stream(path) as f:
            f.write("".join(lines).encode())

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def journal_files(fs: pafs.FileSystem, root: str) -> list[str]:
    d = posixpath.join(root, JOURNAL_DIR)
    if fs.get_file_info(d).type == pafs.FileType.NotFound:
        return []
    return sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(d))
        if f.type == pafs.FileType.File and f.path.endswith(".jsonl")
    )


def read_journal_file(fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    """Rows of one journal file; a line cut short by a kill is skipped (its call is redone)."""
    with fs.open_input_stream(path) as f:
        data = f.read().decode("utf-8", errors="replace")
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            log.warning("%s: skipping a row cut short by an interrupted run", path)


def clear_journal(fs: pafs.FileSystem, root: str) -> None:
    for path in journal_files(fs, root):
        fs.delete_file(path)
