"""What every benchmark shares: target lines, `--json`, and CPU seconds read from /proc.

One place so that every benchmark prints its targets in the one shape
`../shared/tools/check_targets.py` reads (`NAME: VALUE (target OP THRESHOLD: MET|MISSED)`), and
counts CPU the same way: user + system seconds of each process (`utime + stime` in
`/proc/PID/stat`), never the `cutime`/`cstime` of reaped children, which would count a sampled
worker a second time in its parent when it exits. Stdlib only: `gpu_check.py` runs where there is
no Ray.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}  # fmt: skip


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def target_line(
    name: str, value: float, op: str, threshold: float, unit: str = "", fmt: str = ".1f"
) -> str:
    """`NAME: VALUE (target OP THRESHOLD: MET|MISSED)`; "%" and "s" take a space before them,
    "x" none, as the dashboard reads them."""
    u = f" {unit}" if unit in ("%", "s", "ms") else unit
    met = OPS[op](value, threshold)
    return f"{name}: {value:{fmt}}{u} (target {op} {threshold:g}{u}: {verdict(met)})"


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")


def write_json(path: str | Path | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2, default=str))


# --- CPU from /proc -----------------------------------------------------------------------------


def process_cpu() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, command line, CPU seconds: utime + stime) for every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        name_end = stat.rindex(")")
        fields = stat[name_end + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out[int(d)] = (int(fields[1]), cmd or stat[stat.index("(") + 1 : name_end], cpu)
    return out


def machine_cpu() -> tuple[float, float]:
    """The machine's busy and total CPU seconds so far (other users of the machine included)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK, sum(fields) / CLK_TCK


# classify(pid, command line, the parent's kind or None at the root) -> this process's kind
Classify = Callable[[int, str, "str | None"], str]


def process_tree(classify: Classify, root: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds) for `root` (this process) and every descendant."""
    table = process_cpu()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, tuple[str, float]] = {}
    stack: list[tuple[int, str | None]] = [(root or os.getpid(), None)]
    while stack:
        pid, parent = stack.pop()
        if pid not in table:
            continue
        kind = classify(pid, table[pid][1], parent)
        out[pid] = (kind, table[pid][2])
        stack.extend((c, kind) for c in children.get(pid, []))
    return out


class CpuMeter:
    """CPU seconds by kind of process (this one and its descendants) over a window, sampled
    every `interval` s from a thread.

    Per process: last sample - first sample (from 0 for one born during the window), so an
    actor that exits keeps what it used up to its last sample (at most `interval` is missed)
    and the total never goes down. The sampling thread's own CPU is taken off `driver_kind`.
    `stop()` adds the machine's busy and total seconds over the window ("machine busy",
    "machine all") so a reader can see other load on the machine.
    """

    def __init__(self, classify: Classify, interval: float = 0.25, driver_kind: str = "driver"):
        self.classify, self.interval, self.driver_kind = classify, interval, driver_kind
        self.machine0 = machine_cpu()
        self.first = process_tree(classify)
        self.last = dict(self.first)
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(process_tree(self.classify))
        self.own_cpu = time.thread_time()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.last.update(process_tree(self.classify))
        out: dict[str, float] = {}
        for pid, (kind, cpu) in self.last.items():
            start = self.first.get(pid, (kind, 0.0))[1]
            out[kind] = out.get(kind, 0.0) + max(0.0, cpu - start)
        if self.driver_kind in out:
            out[self.driver_kind] = max(0.0, out[self.driver_kind] - self.own_cpu)
        busy, total = machine_cpu()
        out["machine busy"] = busy - self.machine0[0]
        out["machine all"] = total - self.machine0[1]
        return {k: round(v, 3) for k, v in out.items()}
