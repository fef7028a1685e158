"""Ray Serve under load: batching on against off, and what Serve adds for a single client.

    .venv/bin/python benchmarks/serve_load.py                 # the full run (about 1-2 minutes)
    .venv/bin/python benchmarks/serve_load.py --requests-per-client 3 --single-requests 8
    .venv/bin/python benchmarks/serve_load.py --n-layer 4 --n-embd 256 --n-head 4  # bigger student

What it does, in one process and one local Ray cluster (started once):

1. Builds a tiny GPT-2 student offline (`trainers.scratch.build_student` at the tests' size,
   its tokenizer trained on the bundled sample's prompts; `--n-layer`/`--n-embd`/`--n-head`
   size it) or takes `--model-dir`. The same model serves as decomposer and as solver. It is
   untrained and writes nonsense, so the decomposition usually parses to nothing and the loop
   falls back to the problem's own question (one solver call): every row reports model calls
   per request, read from the replicas' own `stats()`, so the figures can be set against a
   trained student's.
2. Serves the app on 127.0.0.1 (`serve.app.build_app`: `StudentModel` as Decomposer and as
   Solver, and `Ingress`, each with `num_replicas=1`: the same capacity in both configurations,
   no autoscaling) with `max_batch_size=--max-batch-size` (batching on); later deletes it and
   serves it again with `max_batch_size=1` (batching off). Same `max_new_tokens`,
   `batch_wait_timeout_s` and `num_threads` (torch intra-op threads per model replica) in both.
3. For each: `--clients` concurrent HTTP clients (asyncio + aiohttp) each send
   `--warmup-per-client` untimed requests; the replicas' stats are reset; then each sends
   `--requests-per-client` timed POST /solve requests (bundled sample problems, in turn), one
   after another. requests/s = successful requests / wall time of the timed part; p50/p95 =
   client-side latency per request.
4. Single client (batching on, after its load run): `--single-requests` problems, each sent
   once through Serve and once through the same loop in-process (`socratic.solve.solve` with a
   local `socratic.generate.Generator` - the replica's own model code - on the same model dir, same
   `max_new_tokens`, same torch threads), interleaved so both see the same background load.
   Greedy decoding and a batch of one on both sides, so the answers must match; it says if not.

It prints a table; the batch sizes the replicas actually formed; CPU time per request of every
process of the local cluster (HTTP proxy, ingress, each model, controller, the rest of Ray, this
driver), read from /proc, with a NOTE when other processes were using the machine meanwhile;
where a single request's time goes (HTTP + proxy, ingress, model calls as the ingress sees them
against the same calls in-process); and the issue's two targets: batching >= 4x unbatched
requests/s at 32 clients, and Serve adding <= 15 % to single-client p50. On a shared machine
the CPU-per-request ratio is the steadier reading of the first. Linux only (/proc).

Both targets depend on how much a model call costs against Serve's fixed cost per request
(HTTP, proxy, ingress, two handle calls: ~11-20 ms here). Measured on 2 cores (2026-11-25),
greedy batcher: at the app's default 128 tokens per call 4.2-4.5x and +12-15 %; at 32 tokens
2.6-2.8x and +31-48 %.

5. The library's option against ours, in-process before Ray starts (quiet cores, same torch
   threads): `--clients` decomposer prompts through our greedy batcher's model call (batches of
   `--max-batch-size`, as it forms them under that many concurrent calls) against transformers'
   continuous batching (`model.generate_batch`, paged attention), same greedy decoding and
   `max_new_tokens`: generated tokens/s of each, and whether the texts agree.

Batch sizes are read from the replicas' bounded counts (`StudentModel.stats()`: one count per
batch size; Prometheus has the same as `socratic_batch_size`). `--json PATH` writes every figure.

It always exits 0 once it has measured: it measures, it does not test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import CpuMeter, target_line, write_json  # noqa: E402

TARGET_BATCH_RATIO = 4.0  # batching on / off requests/s at --clients clients (issue #14)
TARGET_SERVE_OVERHEAD_PCT = 15.0  # single-client p50 through Serve vs in-process (issue #14)
APP = "serve_load"
ROLES = ("Decomposer", "Solver")


# --- model -------------------------------------------------------------------------------------


class LocalStudent:
    """The replica's model code without Serve: the same `socratic.generate.Generator`, here."""

    def __init__(self, model_dir: Path, max_new_tokens: int, num_threads: int) -> None:
        from socratic.generate import Generator

        self.gen = Generator(model_dir, max_new_tokens=max_new_tokens, num_threads=num_threads)
        self.params = sum(p.numel() for p in self.gen.model.parameters())

    def __call__(self, prompts: list[str]) -> list[str]:
        return self.gen(prompts)


def greedy_vs_continuous(local: LocalStudent, prompts: list[str], args) -> dict[str, Any]:
    """Our batcher's model call (left-padded `generate` on batches of `--max-batch-size`, as
    the greedy batcher forms them under len(prompts) concurrent calls) against transformers'
    continuous batching (`generate_batch`) on the same prompts: generated tokens/s of each."""
    gen = local.gen
    tok = gen.tokenizer
    out: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    local.gen.complete(prompts[:2])  # warm-up
    t = time.perf_counter()
    ours = []
    for i in range(0, len(prompts), args.max_batch_size):
        ours += gen.complete(prompts[i : i + args.max_batch_size])
    out["greedy_s"] = time.perf_counter() - t
    out["greedy_tokens"] = sum(c.completion_tokens for c in ours)
    out["greedy_tok_s"] = out["greedy_tokens"] / out["greedy_s"]
    try:
        from transformers import GenerationConfig

        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        gen.model.generate_batch(inputs=ids[:2], generation_config=cfg)  # warm-up
        t = time.perf_counter()
        res = gen.model.generate_batch(inputs=ids, generation_config=cfg)
        out["continuous_s"] = time.perf_counter() - t
        texts = []
        for key in sorted(res, key=lambda k: int(str(k).rsplit("_", 1)[-1])):
            texts.append(res[key].generated_tokens)
        out["continuous_tokens"] = sum(len(x) for x in texts)
        out["continuous_tok_s"] = out["continuous_tokens"] / out["continuous_s"]
        same = sum(
            tok.decode(x, skip_special_tokens=True) == c.text
            for x, c in zip(texts, ours, strict=True)
        )
        out["same_texts"] = same
    except Exception as e:  # noqa: BLE001 - a measurement that could not run says why
        out["continuous_error"] = f"{type(e).__name__}: {e}"
    return out


def continuous_lines(cb: dict[str, Any]) -> list[str]:
    head = (
        f"greedy batcher vs transformers continuous batching, {cb['prompts']} prompts x "
        f"{cb['max_new_tokens']} tokens, in-process:"
    )
    ours = f"  greedy batcher (left-padded generate): {cb['greedy_tok_s']:.0f} tok/s"
    if "continuous_error" in cb:
        return [head, ours, f"  continuous batching: did not run ({cb['continuous_error']})"]
    ratio = cb["continuous_tok_s"] / cb["greedy_tok_s"]
    keep = "greedy batcher" if ratio < 1 else "continuous batching"
    return [
        head,
        ours,
        f"  continuous batching (model.generate_batch): {cb['continuous_tok_s']:.0f} tok/s "
        f"= {ratio:.2f}x ours; same texts {cb['same_texts']}/{cb['prompts']}",
        f"  faster here: {keep}",
    ]


# --- serving -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(model_dir: Path, max_batch_size: int, args: argparse.Namespace) -> None:
    """Serve the app (`serve.app.build_app`, as production builds it) with exactly one replica
    per deployment, replacing any earlier one, and wait until it is ready."""
    from ray import serve

    from serve.app import build_app

    one = {"num_replicas": 1}  # no autoscaling: the same capacity for batching on and off
    app = build_app(
        {
            "decomposer": str(model_dir),
            "solver": str(model_dir),
            "max_new_tokens": args.max_new_tokens,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "num_threads": args.num_threads,
            "calculator": True,
            "decomposer_options": one,
            "solver_options": one,
            "ingress_options": one,
        }
    )
    serve.run(app, name=APP, route_prefix="/")


async def replica_stats(reset: bool = False) -> dict[str, dict[str, Any]]:
    from ray import serve

    out = {}
    for role in ROLES:
        handle = serve.get_deployment_handle(role, app_name=APP)
        out[role] = await handle.stats.remote()
        if reset:
            await handle.reset_stats.remote()
    return out


# --- CPU accounting ----------------------------------------------------------------------------

CPU_GROUPS = ("proxy", "Ingress", "Decomposer", "Solver", "controller", "ray system", "driver")


def _group(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "driver"  # the HTTP clients (and, single-client phase, the in-process loop)
    for role in ("Ingress", *ROLES):
        if f"ServeReplica:{APP}:{role}" in cmd:
            return role
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeController" in cmd:
        return "controller"
    return "ray system"  # gcs, raylet, idle workers, log monitor, ...


def cpu_meter() -> CpuMeter:
    """CPU by Serve role, sampled from /proc (`benchmarks/common.py`, counted as every benchmark
    counts it); `stop()` gives every group of CPU_GROUPS and the machine's busy seconds."""
    return CpuMeter(lambda pid, cmd, parent: _group(pid, cmd))


def cpu_of(meter: CpuMeter) -> dict[str, float]:
    return dict.fromkeys(CPU_GROUPS, 0.0) | meter.stop()


# --- load --------------------------------------------------------------------------------------


@dataclass
class Reply:
    latency_s: float
    ok: bool
    server: dict[str, float] = field(default_factory=dict)  # the reply's "timings"
    steps: int = 0
    answer: str | None = None
    error: str = ""


async def post(session: Any, url: str, problem: str, timeout_s: float) -> Reply:
    import aiohttp

    t0 = time.perf_counter()
    try:
        async with session.post(
            url, json={"problem": problem}, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            raw = await resp.read()
            latency = time.perf_counter() - t0
            if resp.status != 200:
                return Reply(latency, False, error=f"HTTP {resp.status}: {raw[:200]!r}")
            out = json.loads(raw)
            return Reply(latency, True, out["timings"], len(out["steps"]), out["answer"])
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Reply(time.perf_counter() - t0, False, error=f"{type(e).__name__}: {e}")


@dataclass
class LoadResult:
    label: str
    replies: list[Reply]
    wall_s: float
    stats: dict[str, dict[str, Any]]
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.ok]

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q)

    @property
    def calls_per_request(self) -> float:
        calls = sum(s["calls"] for s in self.stats.values())
        return calls / len(self.ok) if self.ok else math.nan

    def mean_batch(self, role: str) -> float:
        s = self.stats[role]
        return s["calls"] / s["batches"] if s["batches"] else math.nan


async def run_load(
    url: str, problems: list[str], clients: int, per_client: int, warmup: int, label: str, args
) -> LoadResult:
    import aiohttp

    def problem_for(client: int, i: int) -> str:  # clients send different problems at once
        return problems[(i * clients + client) % len(problems)]

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(c: int, n: int, offset: int) -> list[Reply]:
            return [
                await post(session, url, problem_for(c, offset + i), args.timeout_s)
                for i in range(n)
            ]

        if warmup:
            warm = await asyncio.gather(*(client(c, warmup, 1000) for c in range(clients)))
            bad = [r for rs in warm for r in rs if not r.ok]
            if bad:
                print(f"  warm-up: {len(bad)} failed, e.g. {bad[0].error}", flush=True)
        await replica_stats(reset=True)
        meter, t0 = cpu_meter(), time.perf_counter()
        timed = await asyncio.gather(*(client(c, per_client, 0) for c in range(clients)))
        wall = time.perf_counter() - t0
        cpu = cpu_of(meter)
    replies = [r for rs in timed for r in rs]
    return LoadResult(label, replies, wall, await replica_stats(), cpu)


@dataclass
class SingleResult:
    serve: list[Reply]
    local_s: list[float]
    local_timings: list[dict[str, float]]
    same_answers: int
    stats: dict[str, dict[str, Any]]
    cpu: dict[str, float]
    wall_s: float


async def run_single(
    url: str, problems: list[str], n: int, local: LocalStudent, args
) -> SingleResult:
    import aiohttp

    from socratic.solve import solve

    serve_replies: list[Reply] = []
    local_s: list[float] = []
    local_timings: list[dict[str, float]] = []
    same = 0
    async with aiohttp.ClientSession() as session:
        for i in range(-2, n):  # two untimed rounds first
            problem = problems[i % len(problems)]
            if i == 0:
                await replica_stats(reset=True)
                meter, t0 = cpu_meter(), time.perf_counter()
            reply = await post(session, url, problem, args.timeout_s)
            t_local = time.perf_counter()
            sol = solve(problem, local, local)
            dt = time.perf_counter() - t_local
            if i < 0:
                continue
            serve_replies.append(reply)
            local_s.append(dt)
            local_timings.append(sol.timings)
            same += reply.ok and reply.answer == sol.answer and reply.steps == len(sol.steps)
        wall = time.perf_counter() - t0
        cpu = cpu_of(meter)
    stats = await replica_stats()
    return SingleResult(serve_replies, local_s, local_timings, same, stats, cpu, wall)


# --- report ------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def batch_hist(counts: dict[int, int]) -> str:
    c = Counter({int(k): v for k, v in counts.items()})
    return " ".join(f"{k}x{c[k]}" for k in sorted(c))


def report(
    on: LoadResult, off: LoadResult, single: SingleResult, args, params: int, figures: dict
) -> str:
    """The table and target lines; every figure also goes into `figures` (for --json)."""
    loads = [r for r in (on, off) if r.replies]
    lines = [
        f"model: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} ({params / 1e6:.2f} M params), "
        f"max_new_tokens={args.max_new_tokens}, torch threads per replica={args.num_threads}, "
        f"batch_wait_timeout_s={args.batch_wait_timeout_s}, 1 replica per deployment, "
        f"ray num_cpus={args.ray_cpus} on {os.cpu_count()} cores",
        f"load: {args.clients} clients x {args.requests_per_client} requests "
        f"(+{args.warmup_per_client} warm-up each), POST /solve over HTTP on 127.0.0.1",
        "",
        f"{'configuration':<30}{'ok/sent':>9}{'wall s':>8}{'req/s':>8}{'p50 ms':>9}"
        f"{'p95 ms':>9}{'calls/req':>10}{'mean batch dec/sol':>20}",
    ]
    for r in loads:
        lines.append(
            f"{r.label:<30}{f'{len(r.ok)}/{len(r.replies)}':>9}{r.wall_s:>8.1f}{r.rps:>8.2f}"
            f"{1000 * r.pct(50):>9.0f}{1000 * r.pct(95):>9.0f}{r.calls_per_request:>10.2f}"
            f"{f'{r.mean_batch(ROLES[0]):.1f} / {r.mean_batch(ROLES[1]):.1f}':>20}"
        )
    s_ok = [r for r in single.serve if r.ok]
    s_lat = [r.latency_s for r in s_ok]
    s_calls = sum(s["calls"] for s in single.stats.values()) / max(len(s_ok), 1)
    l_calls = sum(1 + len([k for k in t if k.startswith("step")]) for t in single.local_timings)
    l_calls /= max(len(single.local_timings), 1)
    for label, xs, n_ok, calls in (
        ("single client, Serve", s_lat, len(s_ok), s_calls),
        ("single client, in-process", single.local_s, len(single.local_s), l_calls),
    ):
        lines.append(
            f"{label:<30}{f'{n_ok}/{len(single.serve)}':>9}{sum(xs):>8.1f}"
            f"{(len(xs) / sum(xs) if xs else math.nan):>8.2f}{1000 * percentile(xs, 50):>9.0f}"
            f"{1000 * percentile(xs, 95):>9.0f}{calls:>10.2f}{'':>20}"
        )
    lines += ["", "CPU per timed request, ms, by process (cores = CPU s / wall s):"]
    head = "".join(f"{g:>11}" for g in CPU_GROUPS)
    lines.append(f"{'':<24}{head}{'all ours':>10}{'our cores':>10}{'machine':>9}")
    for label, cpu, n, wall in (
        (on.label, on.cpu, len(on.replies), on.wall_s),
        (off.label, off.cpu, len(off.replies), off.wall_s),
        ("single client (+local)", single.cpu, len(single.serve), single.wall_s),
    ):
        if not cpu or not n:
            continue
        ours = sum(cpu[g] for g in CPU_GROUPS)
        row = "".join(f"{1000 * cpu[g] / n:>11.1f}" for g in CPU_GROUPS)
        lines.append(
            f"{label:<24}{row}{1000 * ours / n:>10.1f}{ours / wall:>10.2f}"
            f"{cpu['machine busy'] / wall:>9.2f}"
        )
    busy_others = [
        (label, (cpu["machine busy"] - sum(cpu[g] for g in CPU_GROUPS)) / wall)
        for label, cpu, wall in (
            (on.label, on.cpu, on.wall_s),
            (off.label, off.cpu, off.wall_s),
            ("single client", single.cpu, single.wall_s),
        )
        if cpu
    ]
    noisy = [f"{label} {cores:.2f}" for label, cores in busy_others if cores > 0.15]
    if noisy:
        lines.append(
            "  NOTE: other processes on this machine used cores while measuring ("
            + ", ".join(noisy)
            + "): the figures above are lower than on a quiet machine, and ratios noisier"
        )
    for r in loads:
        for role in ROLES:
            lines.append(
                f"  {r.label}, {role} batch sizes: {batch_hist(r.stats[role]['batch_size_counts'])}"
            )
    errors = [r.error for r in on.replies + off.replies + single.serve if not r.ok]
    if errors:
        lines.append(f"  {len(errors)} failed requests, e.g. {errors[0]}")

    # Where a single request's time goes, medians in ms.
    ingress = [r.server.get("request_s", math.nan) for r in s_ok]
    loop_s = [r.server.get("total_s", math.nan) for r in s_ok]
    local_loop = [t["total_s"] for t in single.local_timings]
    lines += [
        "",
        "single client, where the time goes (medians, ms):",
        f"  client latency {1000 * med(s_lat):.1f} = HTTP + proxy "
        f"{1000 * med([a - b for a, b in zip(s_lat, ingress, strict=True)]):.1f}"
        f" + ingress request_s {1000 * med(ingress):.1f}",
        f"  model calls as the ingress times them {1000 * med(loop_s):.1f}"
        f" vs the same calls in-process {1000 * med(local_loop):.1f}"
        f" ({1000 * (med(loop_s) - med(local_loop)) / max(s_calls, 1e-9):.1f} per call,"
        f" batch_wait_timeout_s {1000 * args.batch_wait_timeout_s:.0f} of it when alone)",
        f"  in-process loop end to end {1000 * med(single.local_s):.1f};"
        f" answers identical for {single.same_answers}/{len(single.serve)} problems",
        f"  under load (batching on): client p50 {1000 * on.pct(50):.0f}, ingress request_s p50 "
        f"{1000 * percentile([r.server.get('request_s', math.nan) for r in on.ok], 50):.0f}",
    ]

    ratio = on.rps / off.rps if off.rps > 0 else math.inf
    p50_serve, p50_local = percentile(s_lat, 50), percentile(single.local_s, 50)
    overhead = 100 * (p50_serve / p50_local - 1) if p50_local > 0 else math.nan
    paired = [
        100 * (r.latency_s / t - 1)
        for r, t in zip(single.serve, single.local_s, strict=True)
        if r.ok
    ]
    cpu_on = sum(on.cpu.get(g, 0.0) for g in CPU_GROUPS) / max(len(on.replies), 1)
    cpu_off = sum(off.cpu.get(g, 0.0) for g in CPU_GROUPS) / max(len(off.replies), 1)
    added = p50_serve - p50_local
    ratio_met = ratio >= TARGET_BATCH_RATIO
    overhead_met = overhead <= TARGET_SERVE_OVERHEAD_PCT
    lines += [
        "",
        target_line(f"batching on / off at {args.clients} clients", ratio, ">=",
                    TARGET_BATCH_RATIO, "x", ".2f")
        if off.replies
        else "batching on / off: not measured (--skip-off)",
        target_line("Serve overhead on single-client p50", overhead, "<=",
                    TARGET_SERVE_OVERHEAD_PCT, "%"),
        f"  p50 {p50_serve * 1000:.1f} ms through Serve vs {p50_local * 1000:.1f} ms in-process; "
        f"median of paired ratios {med(paired):+.1f} %",
        f"  Serve adds {1000 * added:.1f} ms to a single request: within "
        f"{TARGET_SERVE_OVERHEAD_PCT:g} % for a model whose in-process p50 is >= "
        f"{1000 * added * 100 / TARGET_SERVE_OVERHEAD_PCT:.0f} ms",
    ]
    if off.replies and cpu_on > 0:
        lines.append(
            f"  less sensitive to other load: CPU per request off / on = {1000 * cpu_off:.1f} / "
            f"{1000 * cpu_on:.1f} ms = {cpu_off / cpu_on:.2f}x (the requests/s ratio when both "
            f"are CPU-bound on the same cores)"
        )
    figures.update(
        {
            "batch_ratio": ratio if off.replies else None,
            "batch_ratio_target": TARGET_BATCH_RATIO,
            "batch_ratio_met": ratio_met if off.replies else None,
            "serve_overhead_pct": overhead,
            "serve_overhead_target_pct": TARGET_SERVE_OVERHEAD_PCT,
            "serve_overhead_met": overhead_met,
            "single_p50_serve_ms": 1000 * p50_serve,
            "single_p50_local_ms": 1000 * p50_local,
            "paired_overhead_median_pct": med(paired),
            "serve_added_ms": 1000 * added,
            "cpu_ms_per_request_on": 1000 * cpu_on,
            "cpu_ms_per_request_off": 1000 * cpu_off,
            "same_answers": single.same_answers,
            "single_requests": len(single.serve),
            "failed_requests": len(errors),
        }
    )
    for r in loads:
        key = "on" if r is on else "off"
        figures[f"load_{key}"] = {
            "requests_ok": len(r.ok), "requests_sent": len(r.replies), "wall_s": r.wall_s,
            "rps": r.rps, "p50_ms": 1000 * r.pct(50), "p95_ms": 1000 * r.pct(95),
            "calls_per_request": r.calls_per_request,
            "batch_size_counts": {role: r.stats[role]["batch_size_counts"] for role in ROLES},
            "cpu_s": r.cpu,
        }  # fmt: skip
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Load-test the Serve app: batching on vs off at N clients, and single-client "
        "latency through Serve vs the same loop in-process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients")
    p.add_argument("--requests-per-client", type=int, default=10, help="timed requests per client")
    p.add_argument("--warmup-per-client", type=int, default=1, help="untimed requests per client")
    p.add_argument("--single-requests", type=int, default=20, help="single-client requests")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens per model call (the app's default; the random student never stops early)",
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="max_batch_size, batching on")
    p.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=0.0,
        help="StudentModel batch wait before a partial batch (the app's default)",
    )
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per model replica")
    p.add_argument("--n-layer", type=int, default=2, help="student size: layers")
    p.add_argument("--n-embd", type=int, default=64, help="student size: width")
    p.add_argument("--n-head", type=int, default=2, help="student size: attention heads")
    p.add_argument("--model-dir", type=Path, help="serve this HF dir instead of building one")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for ray.init")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request client timeout")
    p.add_argument("--skip-off", action="store_true", help="only batching on (quick look)")
    p.add_argument("--skip-continuous", action="store_true", help="no generate_batch comparison")
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster on loopback
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    import ray
    from ray import serve

    from socratic.adapters import DatasetSpec, load_problems

    problems = [p.question for p in load_problems(DatasetSpec("sample", split="all"))]
    with contextlib.ExitStack() as stack:
        if args.model_dir is None:
            from trainers.scratch import build_student, sample_texts

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-")))
            model_dir = build_student(  # the tests' tiny model at the benchmark's size
                tmp / "student",
                sample_texts(),
                n_layer=args.n_layer,
                n_embd=args.n_embd,
                n_head=args.n_head,
                vocab_size=600,
                split_digits=False,
            )
        else:
            model_dir = args.model_dir
        local = LocalStudent(model_dir, args.max_new_tokens, args.num_threads)
        figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        if not args.skip_continuous:
            from socratic.formats import decomposer_prompt

            prompts = [decomposer_prompt(problems[i % len(problems)]) for i in range(args.clients)]
            figures["continuous"] = greedy_vs_continuous(local, prompts, args)
            print(
                f"[{time.perf_counter() - started:6.1f}s] greedy vs continuous batching done",
                flush=True,
            )

        ray.init(
            address="local",
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        stack.callback(ray.shutdown)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        stack.callback(serve.shutdown)
        url = f"http://127.0.0.1:{port}/solve"

        def phase(max_batch_size: int, label: str) -> LoadResult:
            t = time.perf_counter()
            deploy(model_dir, max_batch_size, args)
            print(
                f"[{time.perf_counter() - started:6.1f}s] {label}: deployed in "
                f"{time.perf_counter() - t:.1f}s, loading",
                flush=True,
            )
            res = asyncio.run(
                run_load(
                    url,
                    problems,
                    args.clients,
                    args.requests_per_client,
                    args.warmup_per_client,
                    label,
                    args,
                )
            )
            print(
                f"[{time.perf_counter() - started:6.1f}s] {label}: {res.rps:.2f} req/s", flush=True
            )
            return res

        on = phase(args.max_batch_size, f"batching on (max {args.max_batch_size})")
        single = asyncio.run(run_single(url, problems, args.single_requests, local, args))
        print(f"[{time.perf_counter() - started:6.1f}s] single client done", flush=True)
        if args.skip_off:
            off = LoadResult("batching off (skipped)", [], 0.0, {}, {})
        else:
            serve.delete(APP)
            off = phase(1, "batching off (max 1)")
        print()
        print(report(on, off, single, args, local.params, figures))
        if "continuous" in figures:
            print()
            print("\n".join(continuous_lines(figures["continuous"])))
    figures["total_s"] = time.perf_counter() - started
    if args.json:
        write_json(args.json, figures)
        print(f"figures written to {args.json}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
