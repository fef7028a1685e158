"""The test teacher server's CLI, plus a record of when each chat request arrived and finished.

    python benchmarks/_timed_teacher_server.py --dataset sample --split all --path F --latency 0.2

It is `python -m tests.support.teacher_server` unchanged (same class, same handler threads, same
`TEACHER_SERVER_URL=...` line), with one addition for `annotate_throughput.py`: every chat
request appends (arrival, finish) wall-clock times to a list that `GET /_bench/times` returns and
clears. That is what lets the benchmark tell Ray start-up apart from the steady state, and measure
how many requests were really in flight, without polling the server during a run.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import teacher_server as ts


class TimedTeacherServer(ts.TeacherServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._times: list[tuple[float, float]] = []
        self._times_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _chat(self, h: Any, raw: bytes) -> None:
        start = time.time()
        try:
            super()._chat(h, raw)
        finally:
            end = time.time()
            with self._times_lock:
                self._times.append((start, end))

    def _get(self, h: Any) -> None:
        if urlsplit(h.path).path.rstrip("/") == "/_bench/times":
            with self._times_lock:
                times, self._times = self._times, []
            h.send_json(200, {"times": times})
            return
        super()._get(h)


if __name__ == "__main__":
    ts.TeacherServer = TimedTeacherServer  # main() builds its server from the module global
    sys.exit(ts.main())
