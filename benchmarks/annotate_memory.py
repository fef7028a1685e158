"""Driver memory of `pipelines/annotate.py` as the dataset grows: peak RSS at 10k, 100k, 1M.

    .venv/bin/python benchmarks/annotate_memory.py --sizes 10000,100000,1000000 --json out.json

Each size runs `python pipelines/annotate.py --mode gold` (no teacher: the dataset's own steps,
the same read -> Ray Data -> Parquet path) on generated problems (`annotate_throughput.py`'s
`write_problems`: the bundled sample cycled, repeats marked as variants) in its own process
with its own local Ray cluster. The driver's peak RSS is its `VmHWM` from /proc, read until it
exits. The input is read lazily and handed to Ray Data `--chunk-rows` at a time, so the driver
should hold one chunk, not the dataset: the ratio of the largest size's peak to the smallest's
is the figure (a list built in the driver grows ~2 KB per problem).

What is left, as measured on 2 cores (2026-12-06): the smallest size is one chunk of 10k rows,
below the steady state of a chunked run (a 20k-row chunk as Python dicts is ~48 MiB, and the
object store's pages the driver has written to, counted in its RSS as RssShmem, level off at
~46 MiB after three chunks); past that the driver keeps 16 bytes per problem-sample
(`pipelines/keys.py`) and its summary a few more. The last line gives that slope.

It always exits 0: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.annotate_throughput import write_problems  # noqa: E402
from benchmarks.common import target_line  # noqa: E402

TARGET_RATIO = 1.5  # peak RSS at the largest size / at the smallest


def _status_kib(pid: int, *fields: str) -> list[int]:
    """`fields` of /proc/PID/status in KiB (0 for one not there or a process gone)."""
    found = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in found:
                    found[name] = int(line.split()[1])
    except OSError:
        pass
    return list(found.values())


def measure(n: int, work: Path, chunk_rows: int) -> dict[str, float]:
    problems = work / f"problems-{n}.jsonl"
    write_problems(n, problems)
    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "pipelines/annotate.py", "--dataset", "sample", "--split", "all",
        f"--path={problems}", "--mode", "gold", f"--output={out}", "--address=local",
        f"--chunk-rows={chunk_rows}", "--max-in-flight=1000",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    # The run's output goes to a file: a pipe nobody reads until the end fills (64 KiB of Ray
    # Data progress lines at 1M problems) and blocks the run for ever.
    log = work / f"annotate-{n}.log"
    t0 = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        peak = peak_anon = 0
        while proc.poll() is None:
            hwm, anon = _status_kib(proc.pid, "VmHWM", "RssAnon")
            peak, peak_anon = max(peak, hwm), max(peak_anon, anon)
            time.sleep(0.1)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text()) if proc.returncode == 0 else {}
    problems.unlink()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
    return {
        "problems": n,
        "peak_rss_mib": round(peak / 1024, 1),
        "peak_anon_mib": round(peak_anon / 1024, 1),
        "wall_s": round(wall, 1),
        "rows": summary.get("rows"),
        "rc": proc.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--chunk-rows", type=int, default=20_000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="annotate-mem-"))
    results = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            r = measure(n, work, args.chunk_rows)
            results.append(r)
            print(
                f"{n} problems (--mode gold): driver peak RSS {r['peak_rss_mib']} MiB "
                f"(private, RssAnon sampled: {r['peak_anon_mib']} MiB), {r['rows']} rows, "
                f"{r['wall_s']} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = [r for r in results if r["rc"] == 0]
    lines = []
    if len(ok) >= 2:
        ratio = ok[-1]["peak_rss_mib"] / ok[0]["peak_rss_mib"]
        lines.append(target_line(
            f"driver peak RSS at {ok[-1]['problems']} / at {ok[0]['problems']} problems",
            ratio, "<=", TARGET_RATIO, "x", ".2f",
        ))  # fmt: skip
    if len(ok) >= 3:  # beyond the first chunks' start-up: the slope a user with more data sees
        grown = ok[-1]["peak_rss_mib"] - ok[-2]["peak_rss_mib"]
        per = grown * 2**20 / (ok[-1]["problems"] - ok[-2]["problems"])
        lines.append(
            f"driver peak RSS from {ok[-2]['problems']} to {ok[-1]['problems']} problems: "
            f"{grown:+.1f} MiB, {per:.0f} bytes per problem (no target)"
        )
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "targets": lines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
