"""Student training throughput: Ray Train + DeepSpeed ZeRO-2 against a plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py                 # the full run (~8-12 min)
    .venv/bin/python benchmarks/train_throughput.py --limit 100 --steps 10 --concurrent-steps 10 \
        --form-epochs 0

What it does, in one process and one local Ray cluster (started once, reused by every run):

1. Data: the real GSM8K socratic train file (`$SOCRATIC_SHARED_DATA/gsm8k/train_socratic.jsonl`,
   default `../shared/data`) when present, else the bundled sample; the first `--limit` problems
   with their gold sub-questions written as accepted annotation rows (`annotation_row`, as
   `tests/test_train.py` does), i.e. exactly what `pipelines/annotate.py --mode gold` writes.
2. Model: a fresh GPT-2 (`--n-layer`, `--n-embd`) with a byte-level BPE tokenizer trained on the
   problems' formatted texts (`trainers.scratch.build_tokenizer`), saved as a plain HF dir.
   Every run below starts from these same weights.
3. Ray Train + DeepSpeed: `trainers.train.run` for `--role` with 2 workers of 1 CPU, ZeRO-2,
   micro batch `--micro-batch-size` m, grad_accum 1, `--steps` steps. tokens/s = the run's
   non-pad tokens / its `train_s` (the worker loop's own clock, from its first step to its last:
   Ray Train start-up, `deepspeed.initialize` and the final checkpoint are not in it).
4. Plain loop: the same model, data and global batch in this process on `torch.set_num_threads`
   (`--plain-threads`) threads, `torch.optim.AdamW` with the same hyper-parameters, clipping and
   learning-rate schedule as the DeepSpeed config, in train mode (dropout on, as the Ray workers
   train). Each step trains on the same two micro-batches the two Ray ranks get (`batches` +
   `shard`), accumulating their gradients ("accum": identical tokens, padding and maths; the
   ratio target is against this one). The loss is token-weighted as in the worker loop: each
   micro-batch's summed token loss over the step's target tokens (`num_items_in_batch`).
   "concat" pads the two micro-batches into one batch of 2m instead, as a plain loop usually
   would; "1 thread" is accum on one core, the rate two perfectly parallel workers would double.
   tokens/s = non-pad tokens / loop time. The final losses of all rows should agree closely
   (same init, data, optimizer).
5. Padding: `trainers.data.padding_fraction` over one epoch of each role at micro batch m, with
   and without length grouping. Beside it, the rank balance: every step ends in a gradient
   all-reduce, so each rank waits for the one with the biggest micro-batch; balance = the sum of
   the ranks' padded tokens / (2 x the larger), per step, summed (1.0: nobody waits).
6. Concurrency: wall time of `run()` with roles decomposer,solver (1 worker each, so both fit on
   2 cores) against each role alone with the same config; ratio = both / the longer one alone.
7. Solver forms: tokens per problem of the solver's per-example examples (one per sub-question,
   each re-reading its prompt) against one packed sequence per problem (`--solver-examples`),
   over the whole data; then the wall time of `--form-epochs` epochs of Ray Train in each form
   (same config, 2 workers). Both forms train every answer token in the same context, so an
   epoch is the same learning signal; the ratio is the compute it costs.

Steps 3-6 train the solver in its default form (packed).

Worker threads: Ray sets OMP_NUM_THREADS to a task's CPU count, so each 1-CPU training worker runs
torch on one thread. The benchmark checks both that (a 1-CPU Ray task reports its
OMP_NUM_THREADS and `torch.get_num_threads()`) and what the training workers actually did
(per-thread CPU time of every RayTrainWorker process, sampled with psutil during the 2-worker
run: threads that used >= 20 % of the busiest one's CPU time are counted as busy). Ray starts
workers at nice 15; the benchmark sets `RAY_worker_niceness=0` so that they compete for the
cores on the same terms as the plain loop in this (nice 0) process.

It always exits 0 on a completed run: it measures, it does not test. Timed assertions never go
in tests. Load from other processes skews every figure, the plain loop's most (a 2-thread step
waits for its slower thread): the load average is printed at each phase, with a warning when it
passed the core count.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from benchmarks.common import target_line  # noqa: E402

TARGET_RATIO = 0.85  # Ray Train + DeepSpeed tokens/s over the plain loop's
TARGET_FEWER_TOKENS = 2.0  # solver tokens per problem, per-example over packed
TARGET_PADDING = 0.10  # with length grouping
TARGET_CONCURRENT = 1.2  # both students at once over the longer one alone
GSM8K_FILE = "gsm8k/train_socratic.jsonl"

# --- data and model ------------------------------------------------------------------------------


def shared_data() -> Path:
    return Path(os.environ.get("SOCRATIC_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_benchmark_problems(limit: int, source: str) -> tuple[list[Any], str]:
    """The first `limit` problems of GSM8K socratic train (when present) or the bundled sample."""
    from socratic.adapters import DatasetSpec, load_problems

    gsm8k = shared_data() / GSM8K_FILE
    if source == "gsm8k" or (source == "auto" and gsm8k.is_file()):
        spec = DatasetSpec("gsm8k", split="train", path=str(gsm8k), config="socratic", limit=limit)
        label = f"GSM8K socratic train, first {limit} problems ({gsm8k})"
    else:
        spec = DatasetSpec("sample", split="all", limit=limit)
        label = f"bundled sample, up to {limit} problems"
    problems = [p for p in load_problems(spec) if p.steps]
    return problems, f"{label}: {len(problems)} with steps"


def write_annotations(problems: list[Any], out: Path) -> Path:
    """Gold steps as accepted annotation rows, as `tests/test_train.py` writes the sample."""
    import pyarrow.parquet as pq

    from socratic.records import ACCEPTED, annotation_row, annotation_table

    rows = [
        annotation_row(
            p,
            sample=0,
            teacher="gold",
            prompt_version="gold",
            style="socratic",
            cache_key=p.id,
            steps=p.steps,
            predicted=p.answer,
            status=ACCEPTED,
        )
        for p in problems
    ]
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(annotation_table(rows), out / "part-0.parquet")
    return out


def role_texts(problems: list[Any]) -> list[str]:
    """Every role's prompt + target: the vocabulary the students see (cf. `sample_texts`)."""
    from socratic.formats import ROLES, examples_for

    return [
        ex.prompt + ex.target
        for p in problems
        for role in ROLES
        for ex in examples_for(
            role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer
        )
    ]


def build_model(out: Path, texts: list[str], args: argparse.Namespace) -> Path:
    """A fresh GPT-2 of the requested size + BPE tokenizer, saved as a plain HF dir."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainers.scratch import build_tokenizer

    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size, split_digits=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(512, args.max_length),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head or max(1, args.n_embd // 64),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def role_data(cfg: Any, role: str) -> tuple[Any, Any]:
    """(tokenizer, TokenizedSet) of one role, as a training worker builds them."""
    from transformers import AutoTokenizer

    from trainers.data import build_examples, read_accepted, tokenize

    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    packed = cfg.solver_examples == "packed"
    examples, _ = build_examples(read_accepted(cfg.data_paths), role, packed=packed)
    return tokenizer, tokenize(examples, tokenizer, cfg.max_length)


def batches_of(cfg: Any, lengths: list[int], epoch: int) -> list[list[int]]:
    """One epoch's micro-batches, exactly as every training worker computes them."""
    from trainers.data import batches

    return batches(
        lengths,
        cfg.micro_batch_size,
        seed=cfg.seed,
        epoch=epoch,
        group_by_length=cfg.group_by_length,
    )


def rank_balance(lengths: list[int], order: list[list[int]], world: int, steps: int = 0) -> float:
    """Useful share of a data-parallel step: sum over ranks / (world x slowest rank).

    Cost of a micro-batch = its padded tokens. Every step ends in a gradient all-reduce, so each
    rank waits for the one with the biggest micro-batch; 1.0 means no rank ever waits.
    """
    from trainers.data import shard

    per_rank = [shard(order, r, world) for r in range(world)]
    pairs = list(zip(*per_rank, strict=True))[: steps or None]
    costs = [[len(b) * max(lengths[i] for i in b) for b in step] for step in pairs]
    return sum(map(sum, costs)) / sum(world * max(c) for c in costs) if costs else 1.0


# --- the plain loop ------------------------------------------------------------------------------


def global_batches(lengths: list[int], cfg: Any, world: int) -> Iterator[list[list[int]]]:
    """Per step, the micro-batch of every rank, exactly as the Ray workers draw them."""
    from trainers.data import shard

    epoch = 0
    while True:
        order = batches_of(cfg, lengths, epoch)
        yield from zip(*(shard(order, r, world) for r in range(world)), strict=True)
        epoch += 1


def deepspeed_lr_factor(cfg: Any, total_steps: int):
    """DeepSpeed's WarmupDecayLR (linear) as a LambdaLR factor: the lr of optimizer step k."""
    warmup = max(2, max(1, cfg.warmup_steps))  # DeepSpeed raises warmup_num_steps to >= 2
    total = max(total_steps, cfg.warmup_steps + 1)

    def factor(k: int) -> float:
        it = k - 1  # DeepSpeed steps its scheduler after the optimizer, starting at -1
        if it < 0:
            return 0.0
        if it < warmup:
            return it / warmup
        return max(0.0, (total - it) / max(1.0, total - warmup))

    return factor


def plain_loop(cfg: Any, role: str, world: int, threads: int, concat: bool) -> dict[str, Any]:
    """Single-process PyTorch training on the Ray run's global batches; tokens/s over the loop."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.data import IGNORE_INDEX, collate

    torch.set_num_threads(threads)
    tokenizer, data = role_data(cfg, role)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, deepspeed_lr_factor(cfg, cfg.max_steps))
    steps = global_batches(data.lengths, cfg, world)
    tokens = padded = 0
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        micro = next(steps)
        groups = [[i for b in micro for i in b]] if concat else list(micro)
        collated = [collate([data[i] for i in idx], tokenizer.pad_token_id) for idx in groups]
        # Token-weighted, as the worker loop: every target token of the step weighs the same.
        # HF shifts labels, so position 0 is never a target.
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in collated)
        num_items = torch.tensor(float(max(1, n_targets)))
        loss_sum = 0.0
        for batch in collated:
            loss = model(**batch, num_items_in_batch=num_items).loss  # token-loss sum / n_targets
            loss.backward()
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss_sum)
        if step % cfg.log_every == 0 and step != cfg.max_steps:
            window = []
    train_s = time.perf_counter() - t0
    return {
        "steps": cfg.max_steps,
        "tokens": tokens,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s,
        "padding": 1 - tokens / padded,
        "final_loss": sum(window) / len(window),
        "threads": torch.get_num_threads(),
        "train_mode": model.training,
        "params": sum(p.numel() for p in model.parameters()),
        "nice": os.nice(0),
    }


# --- Ray runs ------------------------------------------------------------------------------------


class WorkerThreadSampler:
    """Per-thread CPU time of every RayTrainWorker process, sampled while a run trains."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.first: dict[int, dict[int, float]] = {}
        self.last: dict[int, dict[int, float]] = {}
        self.nice: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerThreadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if "RayTrainWorker" not in " ".join(proc.info["cmdline"] or []):
                        continue
                    cpu = {t.id: t.user_time + t.system_time for t in proc.threads()}
                    self.nice[proc.pid] = proc.nice()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.first.setdefault(proc.pid, cpu)
                # Keep threads that have ended (the training thread ends before its process).
                self.last.setdefault(proc.pid, {}).update(cpu)

    def summary(self) -> list[dict[str, Any]]:
        """Per worker: CPU seconds, busy threads, and the busiest threads' share of the CPU."""
        out = []
        for pid, last in self.last.items():
            first = self.first[pid]
            used = sorted((last[t] - first.get(t, 0.0) for t in last), reverse=True)
            total = sum(used)
            if total <= 0.5:  # a worker sampled only at start-up or tear-down
                continue
            busy = [u for u in used if u >= 0.2 * used[0]]
            out.append(
                {
                    "pid": pid,
                    "nice": self.nice.get(pid),
                    "cpu_s": total,
                    "busy": len(busy),
                    "top": used[0] / total,
                }
            )
        return out


def ray_task_threads() -> tuple[str | None, int]:
    """OMP_NUM_THREADS and torch's thread count inside a 1-CPU Ray task."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> tuple[str | None, int]:
        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    return ray.get(probe.remote())


def timed_run(cfg: Any) -> tuple[dict[str, dict[str, Any]], float]:
    from trainers.train import run

    t0 = time.perf_counter()
    results = run(cfg)
    return {r["role"]: r for r in results}, time.perf_counter() - t0


# --- report --------------------------------------------------------------------------------------


def target(name: str, value: float, op: str, threshold: float, unit: str = "x") -> str:
    return target_line(name, value, op, threshold, unit, ".2f" if unit == "x" else ".1f")


def format_report(m: dict[str, Any], args: argparse.Namespace) -> str:
    rd, pl = m["ray"], m["plain"]
    workers = (
        ", ".join(
            f"pid {w['pid']} (nice {w['nice']}): {w['cpu_s']:.1f} CPU s, {w['busy']} busy "
            f"thread(s), busiest {100 * w['top']:.0f} %"
            for w in m["workers"]
        )
        or "not sampled"
    )
    lines = [
        "",
        f"data: {m['data_label']}",
        f"model: GPT-2 n_layer {args.n_layer}, n_embd {args.n_embd}, vocab {m['vocab']}, "
        f"{m['params'] / 1e6:.2f} M params; role {args.role}: {m['examples']} examples, "
        f"mean length {m['mean_len']:.0f} tokens (max_length {args.max_length})",
        f"global batch {2 * args.micro_batch_size} (micro {args.micro_batch_size} x 2), "
        f"{args.steps} steps, log_every {args.log_every}, lr {args.lr}",
        f"threads: a 1-CPU Ray task has OMP_NUM_THREADS={m['task_threads'][0]} and "
        f"torch.get_num_threads()={m['task_threads'][1]}; training workers: {workers}; "
        f"plain loop: torch threads {pl['threads']} (nice {pl['nice']}, "
        f"{'train' if pl['train_mode'] else 'EVAL'} mode)",
        "",
        f"{'throughput (' + args.role + ')':<44} {'steps':>6} {'tokens':>8} {'train s':>8}"
        f" {'wall s':>7} {'tok/s':>8} {'loss':>7}",
        f"{'Ray Train + DeepSpeed ZeRO-2, 2 workers':<44} {rd['steps']:>6} {rd['tokens']:>8}"
        f" {rd['train_s']:>8.1f} {rd['wall_s']:>7.1f} {rd['tokens_per_s']:>8.0f}"
        f" {rd['final_loss']:>7.3f}",
    ]
    plains = [
        ("plain", f"plain loop, {pl['threads']} threads, accum"),
        ("plain_concat", f"plain loop, {pl['threads']} threads, concat"),
        ("plain_1t", "plain loop, 1 thread, accum"),
    ]
    for key, label in plains:
        if p := m.get(key):
            lines.append(
                f"{label:<44} {p['steps']:>6} {p['tokens']:>8} {p['train_s']:>8.1f} {'':>7}"
                f" {p['tokens_per_s']:>8.0f} {p['final_loss']:>7.3f}"
            )
    ratio = rd["tokens_per_s"] / pl["tokens_per_s"]
    lines += ["", target("Ray+DeepSpeed / plain (accum, tokens/s)", ratio, ">=", TARGET_RATIO)]
    if cc := m.get("plain_concat"):
        lines.append(
            f"{'Ray+DeepSpeed / plain concat':<44} {rd['tokens_per_s'] / cc['tokens_per_s']:>8.2f}x"
            f"   (concat pads {100 * cc['padding']:.1f} %, accum {100 * pl['padding']:.1f} %)"
        )
    if p1 := m.get("plain_1t"):
        lines += [
            f"{'Ray+DeepSpeed / (2 x plain 1 thread)':<44}"
            f" {rd['tokens_per_s'] / (2 * p1['tokens_per_s']):>8.2f}x   (data-parallel efficiency)",
            f"{'plain 2 threads / plain 1 thread':<44}"
            f" {pl['tokens_per_s'] / p1['tokens_per_s']:>8.2f}x   (intra-op thread scaling)",
        ]
    lines += [
        "",
        f"{'padding, one epoch at micro batch ' + str(args.micro_batch_size):<44}"
        f" {'grouped':>9} {'ungrouped':>10}",
    ]
    for role, (g, u) in m["padding"].items():
        lines.append(f"{'  ' + role:<44} {100 * g:>8.1f}% {100 * u:>9.1f}%")
    for role, (g, _) in m["padding"].items():
        lines.append(target(f"padding, {role}, grouped", 100 * g, "<=", 100 * TARGET_PADDING, "%"))
    lines.append(f"{'rank balance, 2 ranks, one epoch':<44} {'grouped':>9} {'ungrouped':>10}")
    for role, (g, u) in m["balance"].items():
        lines.append(f"{'  ' + role:<44} {100 * g:>8.1f}% {100 * u:>9.1f}%")
    lines.append(
        f"{'  ' + args.role + ', the run above (' + str(args.steps) + ' steps)':<44}"
        f" {100 * m['balance_run']:>8.1f}%   (sum of ranks' padded tokens / 2 x the larger)"
    )
    if conc := m.get("concurrency"):
        lines += [
            "",
            f"{'concurrency (1 worker per role)':<44} {'run() s':>8} {'train s':>8} {'tok/s':>8}",
        ]
        for label, (wall, res) in conc["runs"].items():
            for role, r in res.items():
                tps = r["tokens"] / r["train_s"] if r["train_s"] else float("nan")
                lines.append(
                    f"{'  ' + label + ': ' + role:<44} {wall:>8.1f} {r['train_s']:>8.1f}"
                    f" {tps:>8.0f}"
                )
        lines.append(
            target(
                "both at once / longer alone (run() wall)", conc["ratio"], "<=", TARGET_CONCURRENT
            )
        )
    if forms := m.get("solver_forms"):
        lines += ["", *format_forms(forms)]
    loads = m["loads"]
    cores = os.cpu_count() or 1
    pl_mode = "train" if pl["train_mode"] else "eval"
    lines.append(
        f"both loops train in train mode: plain loop {pl_mode}; the Ray loop as trainers/loop.py "
        "sets it"
    )
    lines += [
        "",
        f"total benchmark time {m['total_s']:.0f} s; 1-min load average at each phase: "
        + " ".join(f"{x:.1f}" for x in loads)
        + f" ({cores} cores)",
    ]
    if max(loads) > cores:
        lines.append(
            f"WARNING: the load average passed {cores} (the core count): other processes "
            "shared the cores, so every figure above is skewed. Contention slows a "
            "multi-threaded plain loop far more than single-threaded workers (each of its "
            "steps waits for its slowest thread), inflating the Ray/plain ratio; rerun on an "
            "idle machine."
        )
    return "\n".join(lines)


def format_forms(f: dict[str, Any]) -> list[str]:
    """The solver's per-example and packed forms: tokens per problem and epoch wall time."""
    per, packed = f["per-example"], f["packed"]
    lines = [
        f"{'solver forms (' + str(f['problems']) + ' problems)':<44} {'seqs':>6} {'tokens':>8}"
        f" {'tok/prob':>8} {'loss tok':>8} {'pad':>6}",
    ]
    for name, d in (("per-example", per), ("packed (shared prefix)", packed)):
        lines.append(
            f"{'  ' + name:<44} {d['sequences']:>6} {d['tokens']:>8}"
            f" {d['tokens_per_problem']:>8.0f} {100 * d['loss_share']:>7.1f}%"
            f" {100 * d['padding']:>5.1f}%"
        )
    lines.append(
        f"  packed: {packed['split']} problem(s) longer than max_length cut into several "
        f"sequences; {packed['truncated']} answer(s) with a cut prompt, "
        f"{packed['dropped']} dropped (per-example: {per['truncated']}, {per['dropped']})"
    )
    if runs := f.get("runs"):
        lines.append(
            f"{'  Ray Train, ' + str(f['epochs']) + ' epoch(s), 2 workers':<44} {'steps':>6}"
            f" {'run() s':>8} {'train s':>8} {'loss':>7}"
        )
        for name in ("per-example", "packed"):
            r = runs[name]
            lines.append(
                f"{'    ' + name:<44} {r['steps']:>6} {r['wall_s']:>8.1f} {r['train_s']:>8.1f}"
                f" {r['final_loss']:>7.3f}"
            )
        lines.append(
            f"  epoch wall time, per-example / packed: train {f['train_ratio']:.2f}x, "
            f"run() {f['wall_ratio']:.2f}x"
        )
    lines.append(
        target("shared-prefix solver, fewer tokens per problem", f["fewer_tokens"], ">=",
               TARGET_FEWER_TOKENS)
    )  # fmt: skip
    return lines


def solver_forms(base: Any, problems: int) -> dict[str, Any]:
    """Tokens of the solver's two forms over the whole data (no training)."""
    from dataclasses import replace

    from trainers.data import padding_fraction

    out: dict[str, Any] = {"problems": problems}
    for form in ("per-example", "packed"):
        cfg = replace(base, solver_examples=form)
        data = role_data(cfg, "solver")[1]
        order = batches_of(cfg, data.lengths, 0)
        out[form] = {
            "sequences": len(data),
            "tokens": data.tokens,
            "target_tokens": data.target_tokens,
            "tokens_per_problem": data.tokens / problems,
            "loss_share": data.target_tokens / data.tokens,
            "padding": padding_fraction(data.lengths, order),
            "truncated": data.truncated,
            "dropped": data.dropped,
            "split": data.split,
        }
    out["fewer_tokens"] = out["per-example"]["tokens"] / out["packed"]["tokens"]
    return out


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="tokens/s counts non-pad tokens. Ray's figure is over the worker loop's train_s "
        "(first step to last, no Ray Train start-up); its wall time with start-up is shown too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=["auto", "gsm8k", "sample"],
        default="auto",
        help="problems: GSM8K socratic train when present (auto), or the bundled sample",
    )
    p.add_argument("--limit", type=int, default=400, help="problems to train on")
    p.add_argument("--role", default="solver", help="role of the throughput comparison")
    p.add_argument("--n-layer", type=int, default=4, help="GPT-2 layers")
    p.add_argument("--n-embd", type=int, default=256, help="GPT-2 width")
    p.add_argument("--n-head", type=int, default=0, help="GPT-2 heads (0: n_embd / 64)")
    p.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary to train")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per example")
    p.add_argument("--micro-batch-size", type=int, default=8, help="examples per worker per step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the comparison")
    p.add_argument("--log-every", type=int, default=10, help="worker log/report interval")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--plain-threads", type=int, default=2, help="torch threads of the plain loop")
    p.add_argument(
        "--no-single-thread",
        action="store_true",
        help="skip the plain loop on 1 thread (the per-core rate 2 workers could at best double)",
    )
    p.add_argument(
        "--no-concat", action="store_true", help="skip the plain loop's one-batch-of-2m variant"
    )
    p.add_argument(
        "--concurrent-steps",
        type=int,
        default=20,
        help="steps of each concurrency run (0 skips the concurrency runs)",
    )
    p.add_argument(
        "--form-epochs",
        type=int,
        default=1,
        help="epochs of the solver's per-example vs packed Ray runs (0 skips the runs)",
    )
    p.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of the Ray cluster")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, model and runs here")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--verbose", action="store_true", help="keep Ray and worker INFO logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts its workers at nice 15; the plain loop runs here at nice 0. On a machine that
    # anything else also uses, that alone decides the race: give the workers the same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray workers import `trainers...` by reference: make this checkout importable there.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()

    from dataclasses import replace

    from trainers.config import TrainConfig
    from trainers.data import batches, padding_fraction

    work = args.workdir or Path(tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    problems, data_label = load_benchmark_problems(args.limit, args.source)
    data_dir = write_annotations(problems, work / "annotations")
    model_dir = build_model(work / "model", role_texts(problems), args)

    loads: list[float] = []

    def stamp(what: str) -> None:
        loads.append(os.getloadavg()[0])
        print(f"[{time.perf_counter() - t_start:6.1f} s, load {loads[-1]:5.2f}] {what}", flush=True)

    stamp(f"work dir {work}")

    base = TrainConfig(
        data=str(data_dir),
        base_model=str(model_dir),
        roles=args.role,
        storage_path=str(work / "ray_results"),
        max_length=args.max_length,
        micro_batch_size=args.micro_batch_size,
        grad_accum=1,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_steps=args.steps,
        seed=args.seed,
        group_by_length=True,
        log_every=args.log_every,
        checkpoint_every=args.steps,  # one checkpoint, after the last step (not in train_s)
        max_failures=0,
        num_workers=2,
        cpus_per_worker=1.0,
        zero_stage=2,
    )
    runs = iter(range(1, 100))

    def fresh(cfg: TrainConfig, name: str, **kw: Any) -> TrainConfig:
        n = next(runs)
        return replace(cfg, run_name=f"bench{n:02d}-{name}", output=str(work / f"out{n:02d}"), **kw)

    m: dict[str, Any] = {"data_label": data_label, "loads": loads}

    # Padding and data shape (no Ray needed).
    tokenizer, data = role_data(base, args.role)
    m["vocab"], m["examples"] = len(tokenizer), len(data)
    m["mean_len"] = sum(data.lengths) / max(1, len(data))
    m["padding"], m["balance"] = {}, {}
    per_example = replace(base, solver_examples="per-example")
    for role in dict.fromkeys([args.role, "decomposer", "solver", "solver per-example"]):
        cfg = per_example if role == "solver per-example" else base
        lengths = role_data(cfg, role.split()[0])[1].lengths
        orders = {
            g: batches(lengths, args.micro_batch_size, seed=args.seed, epoch=0, group_by_length=g)
            for g in (True, False)
        }
        m["padding"][role] = tuple(padding_fraction(lengths, orders[g]) for g in (True, False))
        m["balance"][role] = tuple(rank_balance(lengths, orders[g], 2) for g in (True, False))
    m["balance_run"] = rank_balance(data.lengths, batches_of(base, data.lengths, 0), 2, args.steps)
    m["solver_forms"] = solver_forms(base, len(problems))

    import ray

    ray.init(
        address="local",
        num_cpus=max(args.ray_cpus, args.plain_threads),
        configure_logging=False,
        log_to_driver=args.verbose,
        # The dashboard stays on: without the State API it serves, Ray Train's
        # PlacementGroupCleaner may take a live run's placement group (distill_quality.py).
    )
    try:
        m["task_threads"] = ray_task_threads()

        def plain(concat: bool = False, threads: int = args.plain_threads) -> dict[str, Any]:
            return plain_loop(base, args.role, 2, threads, concat)

        stamp("plain loop ...")
        m["plain"] = plain(concat=False)
        m["params"] = m["plain"]["params"]

        stamp("Ray Train + DeepSpeed, 2 workers ...")
        with WorkerThreadSampler() as sampler:
            res, wall = timed_run(fresh(base, args.role))
        r = res[args.role]
        m["workers"] = sampler.summary()
        m["ray"] = {**r, "wall_s": wall, "tokens_per_s": r["tokens"] / r["train_s"]}

        if not args.no_concat:
            stamp("plain loop, concat ...")
            m["plain_concat"] = plain(concat=True)
        if not args.no_single_thread:
            stamp("plain loop, 1 thread ...")
            m["plain_1t"] = plain(threads=1)

        m["concurrency"] = None
        if args.concurrent_steps:
            conc_cfg = replace(
                base,
                num_workers=1,
                max_steps=args.concurrent_steps,
                checkpoint_every=args.concurrent_steps,
            )
            conc: dict[str, tuple[float, dict[str, Any]]] = {}
            for label, roles in [
                ("decomposer alone", "decomposer"),
                ("solver alone", "solver"),
                ("both at once", "decomposer,solver"),
            ]:
                stamp(f"concurrency: {roles} ...")
                res, wall = timed_run(fresh(conc_cfg, roles.replace(",", "-"), roles=roles))
                conc[label] = (wall, res)
            longer = max(conc["decomposer alone"][0], conc["solver alone"][0])
            m["concurrency"] = {"runs": conc, "ratio": conc["both at once"][0] / longer}

        if args.form_epochs:
            forms = m["solver_forms"]
            forms["epochs"], forms["runs"] = args.form_epochs, {}
            for form in ("per-example", "packed"):
                stamp(f"solver, {form}, {args.form_epochs} epoch(s) ...")
                cfg = fresh(
                    base, f"solver-{form}", roles="solver", solver_examples=form,
                    max_steps=None, epochs=args.form_epochs, checkpoint_every=10**9,
                )  # fmt: skip
                res, wall = timed_run(cfg)
                forms["runs"][form] = {**res["solver"], "wall_s": wall}
            runs = forms["runs"]
            forms["train_ratio"] = runs["per-example"]["train_s"] / runs["packed"]["train_s"]
            forms["wall_ratio"] = runs["per-example"]["wall_s"] / runs["packed"]["wall_s"]
    finally:
        ray.shutdown()
    m["total_s"] = time.perf_counter() - t_start
    loads.append(os.getloadavg()[0])
    print(format_report(m, args))
    if args.json:
        args.json.write_text(json.dumps(m, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
