"""Annotation throughput against a local teacher with a fixed latency, beside `ray.data.llm`.

    .venv/bin/python benchmarks/annotate_throughput.py            # the full run (a few minutes)
    .venv/bin/python benchmarks/annotate_throughput.py --rows 400 --rows-at-1 50 --llm-grid 8:1:4

What it does, in one process and one Ray cluster (started once, reused by every configuration):

1. Writes `--rows` distinct problems in the `sample` format: the 40 bundled problems cycled, each
   repeat's question suffixed " (Variant k.)". The gold steps still answer it, so the teacher's
   reply is accepted for every row.
2. Starts the test teacher server (`python -m serve.fake_teacher --record-times`, which also
   records each request's arrival and finish time) in its own process, with `--latency`
   seconds per call, so its threads do not share the driver's GIL.
3. Runs `pipelines.annotate.run` at each `--in-flight` value into a fresh output folder
   (`--rows-at-1` rows at in-flight 1, where 2000 rows would take 400 s; `--rows` otherwise).
4. Runs `ray.data.llm` (`HttpRequestProcessorConfig` + `build_processor`) against the same server
   with the same chat payload (`Prompt.default("socratic", "number").messages(problem, True)`),
   preprocess -> HTTP stage -> postprocess -> Parquet, for each configuration of `--llm-grid` on
   `--llm-screen-rows` rows, then the `--llm-finalists` fastest (and the fastest that keeps Ray
   Data's default async batch concurrency) again on all `--rows`. This side is given the benefit
   of the doubt: its payloads are built before the clock starts, and its postprocess only takes
   the reply text (ours also reads the problems, hashes cache keys, parses and judges each reply).

Rates, and what each one means:

* rows/s: rows written / wall time of the whole pipeline call (for ours, the summary's `wall_s`:
  reading problems, Ray Data planning and actor start-up, the calls, Parquet, summary.json).
* window rows/s: rows / (last reply - first request arrival), from the server's own clock: the
  rate while requests were flowing, without start-up before them and writing after them.
* steady rows/s: request arrivals between the 10th and 90th percentile / the time between them:
  the rate once the pipeline is running, without ramp-up and tail.
* in flight: mean requests open at the server over the window (sum of request durations / window).
* ideal rows/s: in-flight limit / latency.

It always exits 0: it measures, it does not test. Timed assertions never go in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import CpuMeter, target_line  # noqa: E402

OURS = ("driver", "ray workers", "ray daemons")  # CPU kinds that are the pipeline's
TARGET_PCT_OF_IDEAL = 90.0  # at 64 in flight
TARGET_CPU_MS_PER_ROW = 1.5  # at 512 in flight
TARGET_RATIO_VS_LLM = 1.5
TEACHER_MODEL = "test-teacher"
NO_KEY_ENV = "ANNOTATE_BENCH_UNSET_KEY"  # never set: the local server takes any key


# --- problems and server -----------------------------------------------------------------------


def write_problems(n: int, path: Path) -> None:
    """`n` distinct sample-format problems: the bundled 40 cycled, repeats marked as variants."""
    from socratic.adapters import sample_path

    base = [json.loads(line) for line in sample_path().read_text().splitlines() if line.strip()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            record = dict(base[i % len(base)])
            k = i // len(base)
            if k:
                record["question"] = f"{record['question']} (Variant {k}.)"
            f.write(json.dumps(record) + "\n")


class Server:
    """The timed teacher server in a subprocess; `times()` returns and clears its request log."""

    def __init__(self, problems: Path, latency: float) -> None:
        cmd = [
            sys.executable,
            "-m",
            "serve.fake_teacher",
            "--record-times",
            "--dataset=sample",
            "--split=all",
            f"--path={problems}",
            f"--latency={latency}",
            f"--model={TEACHER_MODEL}",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("TEACHER_SERVER_URL="):
            self.proc.kill()
            raise SystemExit(f"teacher server did not start (got {line!r})")
        self.base_url = line.split("=", 1)[1]
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/_control/stats", timeout=30) as r:
            return json.load(r)

    def reset_stats(self) -> None:
        req = urllib.request.Request(self.root + "/_control/reset", data=b"{}", method="POST")
        urllib.request.urlopen(req, timeout=30).close()

    def times(self) -> list[tuple[float, float]]:
        with urllib.request.urlopen(self.root + "/_bench/times", timeout=30) as r:
            return [tuple(t) for t in json.load(r)["times"]]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- CPU from /proc (benchmarks/common.py) -------------------------------------------------------


def cpu_meter(server_pid: int) -> CpuMeter:
    """CPU by kind: the driver, Ray workers (actors, Ray Data tasks), Ray's daemons, and the
    teacher server's subtree on its own (never counted as ours)."""

    def kind(pid: int, cmd: str, parent: str | None) -> str:
        if pid == server_pid or parent == "server":
            return "server"
        if parent is None:
            return "driver"
        return "ray workers" if cmd.startswith("ray::") else "ray daemons"

    return CpuMeter(kind)


# --- measurements ------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    label: str
    rows: int
    wall_s: float
    in_flight: int  # the configured limit on requests open at once
    latency: float
    times: list[tuple[float, float]]
    started: float  # wall clock (time.time) when the pipeline call began
    ok_rows: int  # rows whose reply was accepted / parsed
    note: str = ""
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)  # CPU seconds by process kind

    @property
    def cpu_ms_per_row(self) -> float:
        ours = sum(v for k, v in self.cpu.items() if k in OURS)
        return 1000 * ours / self.rows if self.rows else float("nan")

    @property
    def rate(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ideal(self) -> float:
        return self.in_flight / self.latency

    @property
    def pct(self) -> float:
        return 100 * self.rate / self.ideal

    def server_stats(self) -> dict[str, float]:
        if not self.times:
            return {}
        arrivals = sorted(a for a, _ in self.times)
        first, last = arrivals[0], max(f for _, f in self.times)
        window = max(last - first, 1e-9)
        lo, hi = int(0.1 * (len(arrivals) - 1)), int(0.9 * (len(arrivals) - 1))
        steady = (hi - lo) / (arrivals[hi] - arrivals[lo]) if arrivals[hi] > arrivals[lo] else 0.0
        return {
            "requests": len(self.times),
            "before_first_s": first - self.started,
            "window_s": window,
            "after_last_s": self.started + self.wall_s - last,
            "window_rate": len(self.times) / window,
            "steady_rate": steady,
            "mean_in_flight": sum(f - a for a, f in self.times) / window,
        }


def run_ours(
    annotate: Any,
    server: Server,
    problems: Path,
    rows: int,
    in_flight: int,
    out: Path,
    args: Any,
    http_client: str = "openai",
) -> Measurement:
    cfg = annotate.AnnotateConfig(
        dataset="sample",
        split="all",
        path=str(problems),
        output=str(out),
        limit=rows,
        model=TEACHER_MODEL,
        base_url=server.base_url,
        api_key_env=NO_KEY_ENV,
        max_in_flight=in_flight,
        **({"http_client": http_client} if http_client != "openai" else {}),
    )
    server.times()  # clear
    started = time.time()
    meter = cpu_meter(server.proc.pid)
    summary = annotate.run(cfg)
    cpu = meter.stop()
    wall = summary["wall_s"]
    note = ""
    if summary["written_this_run"] != rows or summary["accepted"] != rows:
        note = f"written {summary['written_this_run']}, accepted {summary['accepted']}"
    return Measurement(
        label=f"ours ({http_client}), in-flight {in_flight}",
        rows=summary["written_this_run"],
        wall_s=wall,
        in_flight=in_flight,
        latency=args.latency,
        times=server.times(),
        started=started,
        ok_rows=summary["accepted"],
        note=note,
        cpu=cpu,
    )


RAY_ASYNC_BATCHES = 4  # ray.data's DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY


@dataclasses.dataclass(frozen=True)
class LlmConfig:
    """One ray.data.llm configuration: `ACTORS:BATCH_SIZE:ROWS_PER_BLOCK[:ASYNC_BATCHES]`.

    Its HTTP stage awaits the requests of one batch one after another (aiohttp's `session.post`
    is lazy, and the stage awaits each before the next), an actor runs one task (one bundle of
    input blocks) at a time, and Ray Data runs up to ASYNC_BATCHES batches of an async UDF at
    once within a task. So requests in flight = ACTORS x min(ASYNC_BATCHES, ROWS_PER_BLOCK /
    BATCH_SIZE). ASYNC_BATCHES is Ray Data's `RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY`
    (default 4); the processor config has no field for it, so a value other than 4 is applied
    by setting that module constant in the driver while the dataset is planned and run.
    """

    actors: int
    batch_size: int
    rows_per_block: int
    stage_cpus: float
    async_batches: int = RAY_ASYNC_BATCHES

    @classmethod
    def parse(cls, text: str, stage_cpus: float) -> LlmConfig:
        try:
            values = [int(x) for x in text.split(":")]
        except ValueError:
            values = []
        if len(values) not in (3, 4) or min(values) < 1:
            raise SystemExit(
                f"--llm-grid entry {text!r}: expected ACTORS:BATCH_SIZE:ROWS_PER_BLOCK"
                "[:ASYNC_BATCHES], positive integers"
            )
        return cls(*values[:3], stage_cpus, *values[3:])

    @property
    def name(self) -> str:
        tail = f":{self.async_batches}" if self.async_batches != RAY_ASYNC_BATCHES else ""
        return f"{self.actors}:{self.batch_size}:{self.rows_per_block}{tail}"

    @property
    def in_flight(self) -> int:
        per_task = min(self.async_batches, math.ceil(self.rows_per_block / self.batch_size))
        return self.actors * per_task

    def __str__(self) -> str:
        text = (
            f"concurrency=({self.actors},{self.actors}) batch_size={self.batch_size} "
            f"rows/block={self.rows_per_block} http_request_stage num_cpus={self.stage_cpus:g}"
        )
        if self.async_batches != RAY_ASYNC_BATCHES:
            text += f" RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY={self.async_batches}"
        return text + f" (nominal in flight {self.in_flight})"


@contextlib.contextmanager
def async_batches(n: int) -> Iterator[None]:
    """Ray Data's async-batch concurrency, as its env variable would set it, for one run."""
    from ray.data._internal.planner import plan_udf_map_op

    name = "DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY"
    old = getattr(plan_udf_map_op, name)
    setattr(plan_udf_map_op, name, n)
    try:
        yield
    finally:
        setattr(plan_udf_map_op, name, old)


def _llm_preprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"payload": json.loads(row["request"])}


def _llm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    resp = row["http_response"]
    content = resp["choices"][0]["message"]["content"]
    return {
        "id": row["id"],
        "raw": content,
        "prompt_tokens": resp["usage"]["prompt_tokens"],
        "completion_tokens": resp["usage"]["completion_tokens"],
    }


def llm_items(problems: Path, rows: int) -> list[dict[str, str]]:
    """The request our pipeline sends for each problem, as ray.data.llm input rows."""
    from pipelines.prompting import Prompt
    from socratic.adapters import DatasetSpec, load_problems

    prompt = Prompt.default("socratic", "number")
    spec = DatasetSpec("sample", split="all", path=str(problems), limit=rows)
    return [
        {
            "id": p.id,
            "request": json.dumps(
                {
                    "model": TEACHER_MODEL,
                    "messages": prompt.messages(p, True),
                    "temperature": 0.0,
                    "max_tokens": 512,
                }
            ),
        }
        for p in load_problems(spec)
    ]


def build_llm(server: Server, conf: LlmConfig) -> Any:
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=server.base_url + "/chat/completions",
        headers={"Authorization": "Bearer EMPTY"},
        batch_size=conf.batch_size,
        concurrency=(conf.actors, conf.actors),
        http_request_stage={"num_cpus": conf.stage_cpus},
    )
    return build_processor(config, preprocess=_llm_preprocess, postprocess=_llm_postprocess)


def run_llm(
    server: Server, items: list[dict[str, str]], conf: LlmConfig, out: Path, args: Any
) -> Measurement:
    import pyarrow.parquet as pq
    import ray

    server.times()
    started = time.time()
    meter = cpu_meter(server.proc.pid)
    t0 = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / conf.rows_per_block))
    with async_batches(conf.async_batches):
        build_llm(server, conf)(ds).write_parquet(str(out))
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    table = pq.read_table(str(out), columns=["id", "raw"])
    ok = sum("Q1:" in (raw or "") for raw in table.column("raw").to_pylist())
    note = "" if ok == len(items) == table.num_rows else f"{table.num_rows} rows, {ok} ok"
    return Measurement(
        label=f"ray.data.llm {conf.name}",
        rows=table.num_rows,
        wall_s=wall,
        in_flight=conf.in_flight,
        latency=args.latency,
        times=server.times(),
        started=started,
        ok_rows=ok,
        note=note,
        cpu=cpu,
    )


# --- printing ----------------------------------------------------------------------------------


def describe(m: Measurement) -> str:
    s = m.server_stats()
    extra = (
        f"; server: {s['before_first_s']:.1f} s before the first request, window "
        f"{s['window_s']:.1f} s at {s['window_rate']:.1f} rows/s (steady {s['steady_rate']:.1f}), "
        f"{s['after_last_s']:.1f} s after the last reply, mean in flight {s['mean_in_flight']:.1f}"
        if s
        else ""
    )
    note = f" [{m.note}]" if m.note else ""
    return f"{m.label}: {m.rows} rows in {m.wall_s:.2f} s = {m.rate:.1f} rows/s{extra}{note}"


def table(runs: list[Measurement], args: Any) -> str:
    head = (
        f"{'config':<40} {'rows':>6} {'wall s':>7} {'rows/s':>7} {'ideal':>7} {'% ideal':>8}"
        f" {'steady/s':>9} {'in flight':>9} {'CPU ms/row':>10} {'server CPU s':>12}"
    )
    lines = [head, "-" * len(head)]
    for m in runs:
        s = m.server_stats()
        lines.append(
            f"{m.label:<40} {m.rows:>6} {m.wall_s:>7.2f} {m.rate:>7.1f} {m.ideal:>7.1f}"
            f" {m.pct:>7.1f}% {s.get('steady_rate', 0):>9.1f} {s.get('mean_in_flight', 0):>9.1f}"
            f" {m.cpu_ms_per_row:>10.2f} {m.cpu.get('server', 0):>12.1f}"
        )
    return "\n".join(lines)


def target(name: str, value: float, unit: str, op: str, threshold: float) -> str:
    return target_line(name, value, op, threshold, unit, ".2f" if unit == "x" else ".1f")


# --- paid answers lost per kill -9 -------------------------------------------------------------


def code_at(rev: str, dest: Path) -> Path:
    """The repository's files at `rev` (e.g. main, before this change), to run its pipeline."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def kill_loss(
    code: Path, server: Server, problems: Path, rows: int, in_flight: int, out: Path
) -> dict[str, Any]:
    """Run annotate from `code` (its own local Ray cluster), SIGKILL it once the server has
    received half the calls, rerun it to the end, and count the problems the teacher was asked
    for both before the kill and again by the rerun: answers paid for twice."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable, "pipelines/annotate.py", "--dataset", "sample", "--split", "all",
        f"--path={problems}", f"--limit={rows}", f"--output={out}", f"--model={TEACHER_MODEL}",
        f"--base-url={server.base_url}", f"--api-key-env={NO_KEY_ENV}",
        f"--max-in-flight={in_flight}", "--address=local",
    ]  # fmt: skip
    server.reset_stats()
    proc = subprocess.Popen(
        cmd, cwd=code, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while server.stats()["requests"] < rows // 2 and time.monotonic() < deadline:
            if proc.poll() is not None:
                return {"error": "finished before it could be killed"}
            time.sleep(0.02)
        at_kill = server.stats()["requests"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seen, quiet = -1, time.monotonic()
    while time.monotonic() - quiet < 3:  # orphaned workers finish what they had in flight
        n = server.stats()["requests"]
        if n != seen:
            seen, quiet = n, time.monotonic()
        time.sleep(0.2)
    before = set(server.stats()["by_problem"])
    server.reset_stats()
    rerun = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    again = server.stats()["by_problem"]
    return {
        "calls_at_kill": at_kill,
        "problems_called_before_kill": len(before),
        "rerun_calls": sum(again.values()),
        "paid_twice": len(set(again) & before),
        "rerun_ok": rerun.returncode == 0,
    }


# --- main --------------------------------------------------------------------------------------


DEFAULT_LLM_GRID = {
    64: "1:1:500:64,2:1:250:32,4:1:125:16,16:1:64",
    512: "1:1:1000:512,2:1:500:256,4:1:250:128,8:1:125:64",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=20_000, help="problems per run")
    p.add_argument("--in-flight", default="64,512", help="comma-separated max-in-flight values")
    p.add_argument("--latency", type=float, default=0.2, help="server seconds per call")
    p.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of the Ray cluster")
    p.add_argument(
        "--llm-grid",
        action="append",
        default=None,
        metavar="IN_FLIGHT=CONF,CONF",
        help="ray.data.llm configurations ACTORS:BATCH_SIZE:ROWS_PER_BLOCK[:ASYNC_BATCHES] to "
        "screen for one in-flight level (repeatable; default: "
        + "; ".join(f"{k}={v}" for k, v in DEFAULT_LLM_GRID.items())
        + "); 'none' skips ray.data.llm",
    )
    p.add_argument("--llm-stage-cpus", type=float, default=0.01, help="HTTP stage num_cpus")
    p.add_argument(
        "--llm-screen-rows",
        type=int,
        default=2000,
        help="rows per ray.data.llm screening run; the fastest per level reruns on --rows",
    )
    p.add_argument("--kill-rows", type=int, default=400, help="problems of each kill -9 run")
    p.add_argument("--kill-in-flight", type=int, default=32, help="max-in-flight of kill runs")
    p.add_argument(
        "--before-rev", default="main", help="git revision whose pipeline is 'before' (kill -9)"
    )
    p.add_argument("--skip-kill", action="store_true", help="skip the kill -9 measurement")
    p.add_argument(
        "--annotate-module",
        default="pipelines.annotate",
        help="module providing AnnotateConfig and run (an importable variant, to try a change)",
    )
    p.add_argument(
        "--http-clients", default="openai,aiohttp", help="our teacher client transports to run"
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--progress-bars", action="store_true", help="show Ray Data progress bars")
    p.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here")
    return p.parse_args(argv)


def llm_grids(args: argparse.Namespace, levels: list[int]) -> dict[int, list[LlmConfig]]:
    if args.llm_grid == ["none"]:
        return {}
    texts = dict(DEFAULT_LLM_GRID)
    for entry in args.llm_grid or []:
        level, _, confs = entry.partition("=")
        texts[int(level)] = confs
    grids = {}
    for level in levels:
        confs = [
            LlmConfig.parse(x, args.llm_stage_cpus)
            for x in texts.get(level, "").split(",")
            if x.strip()
        ]
        grids[level] = [c for c in confs if c.in_flight == level]
    return grids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(x) for x in args.in_flight.split(",") if x.strip()]
    grids = llm_grids(args, levels)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop(NO_KEY_ENV, None)
    # Ray workers import `pipelines...` by reference: make the repo importable there too.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    problems = work / "problems.jsonl"
    write_problems(max(args.rows, args.kill_rows, args.llm_screen_rows), problems)
    counter = iter(range(1, 1000))

    def fresh(name: str) -> Path:
        out = work / f"out-{next(counter):02d}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        return out

    import ray

    annotate = importlib.import_module(args.annotate_module)
    server = Server(problems, args.latency)
    load0 = os.getloadavg()
    print(f"teacher server {server.base_url}, latency {args.latency} s; work dir {work}")
    print("load average before start (1/5/15 min): {:.2f} {:.2f} {:.2f}".format(*load0))
    clients = [c for c in args.http_clients.split(",") if c.strip()]
    runs: dict[tuple[str, int], Measurement] = {}
    llm_best: dict[int, tuple[Measurement, LlmConfig]] = {}
    screened: list[Measurement] = []
    kills: dict[str, Any] = {}
    try:
        ray.init(address="local", num_cpus=args.ray_cpus, configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = args.progress_bars
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("annotate").setLevel(logging.WARNING)
        # Warm-up, not reported: worker processes and imports, paid once per cluster.
        run_ours(annotate, server, problems, 64, 16, fresh("warmup-ours"), args)
        items = llm_items(problems, args.rows)
        if grids:
            run_llm(server, items[:16], LlmConfig(2, 4, 8, args.llm_stage_cpus), fresh("w"), args)
        for client in clients:
            for k in levels:
                m = run_ours(
                    annotate, server, problems, args.rows, k, fresh(f"ours-{k}"), args, client
                )
                runs[client, k] = m
                print(describe(m) + f"; CPU {m.cpu}", flush=True)
        for k, grid in grids.items():
            screen = min(args.llm_screen_rows, args.rows)
            results = []
            for conf in grid:
                m = run_llm(server, items[:screen], conf, fresh("llm"), args)
                m.note = (m.note + "; " if m.note else "") + str(conf)
                screened.append(m)
                print("  screen " + describe(m), flush=True)
                if m.ok_rows == screen:
                    results.append((m, conf))
            if not results:
                continue
            _, conf = max(results, key=lambda mc: mc[0].rate)
            m = run_llm(server, items, conf, fresh("llm-best"), args)
            m.label = f"ray.data.llm {conf.name} (best at {k})"
            llm_best[k] = (m, conf)
            print(describe(m) + f"; CPU {m.cpu}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    try:
        if not args.skip_kill:
            before_code = code_at(args.before_rev, work / "before-code")
            for name, code in (("before", before_code), ("after", REPO)):
                kills[name] = kill_loss(
                    code, server, problems, args.kill_rows, args.kill_in_flight, fresh(name)
                )
                print(f"kill -9 {name} ({code}): {kills[name]}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            server.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"annotate throughput: {args.rows} problems, teacher latency {args.latency * 1000:.0f} "
        f"ms, {os.cpu_count()} cores, Ray num_cpus={args.ray_cpus}; load average at start "
        f"{load0[0]:.1f}, at end {os.getloadavg()[0]:.1f} (other work on this machine)"
    )
    print(table([*runs.values(), *(m for m, _ in llm_best.values())], args))
    print(
        "rows/s = rows / pipeline wall time (start-up + calls + Parquet); ideal = in-flight / "
        "latency; steady/s = 10th-90th percentile arrival rate at the server; CPU ms/row = CPU "
        "of the driver, Ray workers (actors, Ray Data tasks) and Ray's daemons, from /proc, "
        "without the server's."
    )
    for k, (_, conf) in llm_best.items():
        print(f"ray.data.llm best at {k} in flight: {conf}")
    for (client, k), m in runs.items():
        ours_cpu = sum(v for n, v in m.cpu.items() if n in OURS)
        server_cpu = m.cpu.get("server", 0)
        busy = (ours_cpu + server_cpu) / m.wall_s
        print(
            f"ours ({client}) at {k}: {ours_cpu:.1f} CPU s ({m.cpu}) + server {server_cpu:.1f} "
            f"CPU s in {m.wall_s:.1f} s wall = {busy:.2f} of {os.cpu_count()} cores busy"
        )

    print()
    lines = []
    for client in clients:
        ours = {k: m for (c, k), m in runs.items() if c == client}
        tag = f"ours ({client})"
        if 64 in ours:
            lines.append(
                target(f"{tag}, 64 in flight, share of ideal", ours[64].pct, "%", ">=", 90)
            )
        for k, m in ours.items():
            if k != 64:
                print(f"{tag}, {k} in flight, share of ideal: {m.pct:.1f} % (information)")
        if 512 in ours:
            lines.append(
                target(
                    f"{tag}, CPU per row at 512 in flight", ours[512].cpu_ms_per_row, "ms", "<=",
                    TARGET_CPU_MS_PER_ROW,
                )
            )  # fmt: skip
        for k, (m, _) in llm_best.items():
            if k in ours and m.rate > 0:
                lines.append(
                    target(
                        f"{tag} / ray.data.llm best at {k} in flight", ours[k].rate / m.rate, "x",
                        ">=", TARGET_RATIO_VS_LLM,
                    )
                )  # fmt: skip
    if "after" in kills and "paid_twice" in kills["after"]:
        if "paid_twice" in kills.get("before", {}):
            print(
                f"paid answers lost per kill -9, before ({args.before_rev}): "
                f"{kills['before']['paid_twice']} of "
                f"{kills['before']['problems_called_before_kill']} problems called before the kill"
            )
        lines.append(
            target(
                f"paid answers lost per kill -9, after (of "
                f"{kills['after']['problems_called_before_kill']} problems called; "
                f"{args.kill_in_flight} in flight)",
                kills["after"]["paid_twice"], "", "<=", args.kill_in_flight,
            )
        )  # fmt: skip
    for line in lines:
        print(line)
    total = time.perf_counter() - t_start
    print(f"total benchmark time: {total:.0f} s")
    if args.json:
        figures = {
            "rows": args.rows,
            "latency_s": args.latency,
            "cores": os.cpu_count(),
            "load_average_start": load0,
            "ours": {f"{c}@{k}": _figures(m) for (c, k), m in runs.items()},
            "ray_data_llm_best": {
                str(k): {**_figures(m), "config": str(c)} for k, (m, c) in llm_best.items()
            },
            "ray_data_llm_screen": [_figures(m) for m in screened],
            "kill": kills,
            "targets": lines,
            "total_s": round(total, 1),
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def _figures(m: Measurement) -> dict[str, Any]:
    return {
        "label": m.label,
        "rows": m.rows,
        "wall_s": round(m.wall_s, 3),
        "rows_per_s": round(m.rate, 2),
        "ideal_rows_per_s": m.ideal,
        "pct_of_ideal": round(m.pct, 2),
        "cpu_s": m.cpu,
        "cpu_ms_per_row": round(m.cpu_ms_per_row, 3),
        "server": {k: round(v, 3) for k, v in m.server_stats().items()},
        "note": m.note,
    }


if __name__ == "__main__":
    sys.exit(main())
