"""CPU per teacher call of `TeacherClient`, on the `openai` client and on `--http-client aiohttp`.

    .venv/bin/python benchmarks/teacher_client_cpu.py --in-flight 64,512 --json out.json

`annotate_throughput.py` measures the whole pipeline; this isolates the client. One process
makes `--calls` chat calls through `TeacherClient` (its semaphore, rate limiter and retries
included) against the test teacher server, run as its own process with `--latency` seconds per
call, and reads its own CPU time (`time.process_time`) around them: the server's CPU is not in
it. At 512 in flight that figure is what bounds one actor's core (1000 / ms per call = calls/s).
Each client runs in a fresh event loop after a warm-up of one round of calls.

It always exits 0: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from pipelines.teacher_client import Secret, TeacherClient  # noqa: E402
from socratic.adapters import DatasetSpec, load_problems  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "serve.fake_teacher", "--dataset", "sample",
           "--split", "all", "--latency", str(latency)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("TEACHER_SERVER_URL="):
            return proc, line.strip().split("=", 1)[1]
    proc.kill()
    raise RuntimeError("the test teacher server exited before printing its URL")


async def measure(client_kind: str, url: str, in_flight: int, calls: int) -> dict[str, float]:
    problems = list(load_problems(DatasetSpec("sample", split="all")))
    messages = [[{"role": "user", "content": f"Problem: {p.question}"}] for p in problems]
    client = TeacherClient(model="teacher", base_url=url, api_key=Secret("x"),
                           max_in_flight=in_flight, http_client=client_kind,
                           sampling={"max_tokens": 256})  # fmt: skip
    try:
        await asyncio.gather(
            *(client.complete(messages[i % len(messages)]) for i in range(in_flight))
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(
            *(client.complete(messages[i % len(messages)]) for i in range(calls))
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await client.close()
    return {
        "client": client_kind,
        "in_flight": in_flight,
        "calls": calls,
        "ok": sum(r.error is None for r in results),
        "cpu_ms_per_call": round(cpu / calls * 1000, 3),
        "calls_per_s": round(calls / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in-flight", default="64,512", help="comma-separated requests in flight")
    p.add_argument("--calls", type=int, default=4000, help="calls per client and level")
    p.add_argument("--latency", type=float, default=0.2, help="server seconds per call")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    server, url = start_server(args.latency)
    results = []
    try:
        for n in [int(x) for x in args.in_flight.split(",")]:
            for kind in ("openai", "aiohttp"):
                r = asyncio.run(measure(kind, url, n, args.calls))
                ideal = f"{n / args.latency:.0f}" if args.latency > 0 else "unbounded"
                results.append(r)
                print(
                    f"{kind}, {n} in flight: {r['cpu_ms_per_call']} ms CPU per call, "
                    f"{r['calls_per_s']} calls/s (ideal {ideal}), "
                    f"{r['ok']}/{r['calls']} answered",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = []
    for n in sorted({r["in_flight"] for r in results}):
        by = {r["client"]: r for r in results if r["in_flight"] == n}
        ratio = by["openai"]["cpu_ms_per_call"] / max(by["aiohttp"]["cpu_ms_per_call"], 1e-9)
        lines.append(f"openai / aiohttp CPU per call at {n} in flight: {ratio:.1f}x (no target)")
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "lines": lines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
