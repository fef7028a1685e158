"""One run at a time per output folder: an exclusive lock file that names its owner.

Two runs into one output used to both go ahead: the second one's resume step removed the first
one's half-written files and compacted its live journal, and both paid for the same calls. A run
(annotate or evaluate) therefore takes `<output>/_run.lock` before it touches anything there and
removes it when it ends, normally or by an exception. The file is JSON naming the owner: `host`,
`pid`, `started_at` (UTC), `command`, `job`, and what tells a live owner from a dead one on the
same machine (`pid_start`: the process's start time in clock ticks since boot, from /proc, which
catches a recycled pid; `boot_id`; `pid_ns`, the pid namespace: a container on the same host
sees other pids).

A second run finds the file and:
- refuses, naming the owner, when the owner runs on this host and its process is alive;
- takes it over with a warning when the owner is dead here (a `kill -9`, a crash, a reboot): the
  killed run's journal is then compacted as usual, so resume after `kill -9` needs nothing;
- refuses a lock from another host (or pid namespace), whose process cannot be checked from
  here, unless `--force-unlock` says the user knows that run is gone.

Atomicity. On a local (or NFSv3+) filesystem the lock is created with O_CREAT | O_EXCL, so of
two runs starting at once exactly one gets it; a stale lock is moved aside by rename (atomic) and
checked to be the one judged stale before it is dropped. pyarrow's remote filesystems (S3, GCS,
...) have no create-if-absent: there the run checks that no lock exists, writes its own, waits
`REMOTE_SETTLE_S` and reads it back; of two runs that start within that window the last writer
keeps the lock and the other refuses, but two runs whose check and read-back all fall in the
same instant can both proceed. Keep concurrent runs on an object store apart by their --output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shlex
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

log = logging.getLogger("output_lock")

LOCK_NAME = "_run.lock"  # `_`-prefixed: Parquet dataset readers skip it, like `_journal/`
# Remote filesystems: the wait between writing the lock and reading it back.
REMOTE_SETTLE_S = 1.0
# A local lock that stays unparseable this long was cut short by a kill while being written.
UNREADABLE_GRACE_S = 2.0


class OutputLocked(RuntimeError):
    """Another run holds the output folder; the message names it and how to proceed."""

    def __init__(self, message: str, owner: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.owner = owner or {}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    text = _read_text(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if text and ")" in text else None


def _pid_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (Linux), to tell a recycled pid apart."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _boot_id() -> str | None:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int, pid_start: int | None) -> bool:
    """Whether process `pid` of this host (and pid namespace) still runs, as the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is not None:
        if fields[0] == "Z":
            return False  # killed, not yet reaped by its parent
        if pid_start is not None and len(fields) > 19 and int(fields[19]) != pid_start:
            return False  # the pid was recycled by a later process
    return True


def this_owner(job: str) -> dict[str, Any]:
    """What the lock says about this process."""
    return {
        "job": job,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "pid_start": _pid_start(os.getpid()),
        "boot_id": _boot_id(),
        "pid_ns": _pid_ns(),
        "token": uuid.uuid4().hex,
    }


def describe(owner: dict[str, Any]) -> str:
    """`annotate run, pid 123 on host-a, started 2026-01-02T03:04:05+00:00: <command>`."""
    if not owner:
        return "a run whose lock cannot be read"
    return (
        f"{owner.get('job', 'a')} run, pid {owner.get('pid')} on {owner.get('host')}, "
        f"started {owner.get('started_at')}: {owner.get('command')}"
    )


class OutputLock:
    """The lock of one output folder (`fs`, `root` as `output_fs` gives them) for one run.

    `acquire()` takes it or raises `OutputLocked`; `release()` drops it if it is still ours (and
    is safe to call when it was never taken). Also a context manager."""

    def __init__(self, fs: pafs.FileSystem, root: str, job: str, *, force: bool = False) -> None:
        self.fs, self.root, self.job, self.force = fs, root, job, force
        self.path = posixpath.join(root, LOCK_NAME)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.owner: dict[str, Any] | None = None  # ours, once held
        self._raw: bytes | None = None

    # -- taking and dropping -------------------------------------------------------------

    def acquire(self) -> None:
        if self.owner is not None:
            return
        self.fs.create_dir(self.root, recursive=True)
        me = this_owner(self.job)
        raw = (json.dumps(me, indent=2) + "\n").encode()
        for _ in range(5):
            if self._create(raw):
                self.owner, self._raw = me, raw
                return
            found = self._read()
            if found is None:
                continue  # released between our try and our read: try again
            theirs, owner = found
            self._judge(owner)  # raises unless the lock may be taken over
            self._remove_if(theirs)
        raise OutputLocked(
            f"{self.root}: could not take the output lock ({self.path}): other runs keep "
            "taking it at the same time"
        )

    def release(self) -> None:
        """Drop the lock if this run still holds it; never raises (it runs in `finally`)."""
        if self.owner is None:
            return
        raw, self.owner, self._raw = self._raw, None, None
        try:
            found = self._read(wait=False)
            if found is None:
                log.warning("%s: our lock was already gone at the end of the run", self.path)
            elif found[0] != raw:
                log.warning("%s: the lock was taken over during this run by %s; leaving it",
                            self.path, describe(found[1]))  # fmt: skip
            else:
                self.fs.delete_file(self.path)
        except OSError as e:
            log.warning("%s: could not remove the lock (%s); the next run will take it over "
                        "as stale", self.path, e)  # fmt: skip

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- the file ------------------------------------------------------------------------

    def _create(self, raw: bytes) -> bool:
        """Write the lock if there is none; True if this run now holds it."""
        if self.local:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(raw)
            except BaseException:
                os.unlink(self.path)  # a full disk, say: leave no half-written lock behind
                raise
            return True
        # Remote: no create-if-absent in pyarrow's filesystems; write, settle, read back.
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(self.path) as f:
            f.write(raw)
        time.sleep(REMOTE_SETTLE_S)
        found = self._read(wait=False)
        return found is not None and found[0] == raw

    def _read(self, wait: bool = True) -> tuple[bytes, dict[str, Any]] | None:
        """(raw bytes, owner) of the lock now there, None if there is none. An unparseable
        lock is read again for `UNREADABLE_GRACE_S` (it may be mid-write); then its owner is {}.
        """
        deadline = time.monotonic() + (UNREADABLE_GRACE_S if wait else 0)
        while True:
            try:
                with self.fs.open_input_stream(self.path) as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            except OSError:  # some remote filesystems say "not found" as a plain OSError
                if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                    return None
                raise
            try:
                owner = json.loads(raw)
                if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
                    return raw, owner
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return raw, {}
            time.sleep(0.1)

    def _remove_if(self, raw: bytes) -> None:
        """Remove the lock if it is still the one judged (`raw`): not a newer run's."""
        if not self.local:
            found = self._read(wait=False)
            if found is not None and found[0] == raw:
                self.fs.delete_file(self.path)
            return
        aside = f"{self.path}.{uuid.uuid4().hex[:12]}.stale"
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over, one moves it
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = f.read()
            if moved != raw:  # a run took the lock between our read and the move: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            os.unlink(aside)

    # -- whose is it ---------------------------------------------------------------------

    def _judge(self, owner: dict[str, Any]) -> None:
        """Return if the lock may be taken over (with a warning saying why); else raise."""
        who = describe(owner)
        if not owner:
            log.warning("%s: taking over an unreadable lock (a run killed while writing it)",
                        self.path)  # fmt: skip
            return
        here = this_owner(self.job)
        same_host = owner.get("host") == here["host"]
        known = owner.get("boot_id") and here["boot_id"]
        if same_host and known and owner["boot_id"] != here["boot_id"]:
            log.warning("%s: taking over the lock of %s: this machine has restarted since",
                        self.path, who)  # fmt: skip
            return
        ns_known = owner.get("pid_ns") and here["pid_ns"]
        if same_host and not (ns_known and owner["pid_ns"] != here["pid_ns"]):
            if not _alive(int(owner["pid"]), owner.get("pid_start")):
                log.warning("%s: taking over the stale lock of %s (that process is gone: "
                            "killed or crashed)", self.path, who)  # fmt: skip
                return
            raise OutputLocked(
                f"{self.root} is in use by another run: {who}. Two runs into one output would "
                "remove each other's in-progress files and pay twice for the same calls. Wait "
                f"for it to finish, stop it (kill {owner['pid']}; a rerun then resumes where it "
                "stopped), or choose another --output.",
                owner,
            )
        where = "another host" if not same_host else "another pid namespace (container)"
        if self.force:
            log.warning("%s: --force-unlock: taking over the lock of %s on %s", self.path, who,
                        where)  # fmt: skip
            return
        raise OutputLocked(
            f"{self.root} is in use by another run: {who}. It runs on {where}, so whether it is "
            f"still alive cannot be checked from {here['host']}. Wait for it to finish, or "
            "choose another --output; if that run is certainly gone (its machine stopped or it "
            "was killed), rerun with --force-unlock to take its lock over.",
            owner,
        )
