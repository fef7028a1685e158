"""What only a GPU can tell: ZeRO-2 and ZeRO-3, bf16 and NCCL, at GPT-2-large size.

    python benchmarks/gpu_check.py --json gpu_check.json          # one GPU, < 10 minutes
    python benchmarks/gpu_check.py --smoke --json smoke.json       # CPU, tiny shapes, gloo

CPU runs (tests, CI) train on gloo in fp32 with tiny students; a GPU cluster runs NCCL, bf16
and ZeRO-3 at real sizes, which nothing here has run. This script checks that path on one GPU
with a single-process NCCL group, using the training loop's own pieces (`trainers/step.py`: the
token-weighted step, the train/eval switch, collectives on the engine's device), on a student
shaped like GPT-2 large (36 layers, 1280 wide, 774M parameters) built from its config with
random weights, so it needs no hub and no network.

A GPU box may have torch and transformers but neither ray nor deepspeed. The script uses
DeepSpeed ZeRO when it imports, else torch's FSDP2 `fully_shard` (`reshard_after_forward=False`
keeps parameters gathered between forward and backward, as ZeRO-2; `True` frees them, as
ZeRO-3), and says which ran. It prints tokens/s and MFU (model FLOPs, 6N plus attention per
token, over `--peak-tflops`, the H200's dense bf16 peak by default), the checks as target lines,
and writes every figure to `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import target_line  # noqa: E402
from trainers.step import all_reduce_sum, evaluate, target_tokens, train_step  # noqa: E402

GPT2_LARGE = dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024)
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64)


def target(name: str, value: float, op: str, threshold: float, unit: str = "") -> str:
    return target_line(name, value, op, threshold, unit, ".3g")


class FSDPEngine:
    """The slice of DeepSpeed's engine API the loop uses, over torch FSDP2 (`fully_shard`)."""

    def __init__(self, model, *, stage: int, lr: float, grad_accum: int, bf16: bool, device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw: dict[str, Any] = {"reshard_after_forward": stage == 3}
        if bf16:
            kw["mp_policy"] = policy
        for block in model.transformer.h:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        self.module, self.device, self.grad_accum, self.micro = model, device, grad_accum, 0
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), **fused)
        self.grad_norm: float | None = None

    def __call__(self, **batch):
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        (loss / self.grad_accum if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
            self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm


def deepspeed_engine(model, *, stage: int, lr: float, micro: int, grad_accum: int, bf16: bool):
    import deepspeed

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.95], "torch_adam": not torch.cuda.is_available()},
        },
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, dist_init_required=False
    )
    return engine


def build_model(shape: dict[str, int], device, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    cfg.use_cache = False
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    return model, cfg


def make_batches(
    n: int, micro: int, seq: int, vocab: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches shaped like the solver's: prompts of varying length, loss on the rest."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (micro,), generator=g)
        prompt = (lengths.float() * torch.rand(micro, generator=g) * 0.6).long()
        pos = torch.arange(seq)
        mask = (pos[None] < lengths[:, None]).long()
        labels = torch.where((pos[None] >= prompt[:, None]) & (mask == 1), ids, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6 x parameters (no embeddings' lookups) + attention (PaLM)."""
    n = 12 * cfg.n_layer * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


def run_stage(args, stage: int, which: str, device, shape) -> dict[str, Any]:
    model, cfg = build_model(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = args.bf16
    if which == "deepspeed":
        engine = deepspeed_engine(
            model, stage=stage, lr=1e-4, micro=args.micro_batch, grad_accum=args.grad_accum,
            bf16=bf16,
        )  # fmt: skip
    else:
        engine = FSDPEngine(
            model, stage=stage, lr=1e-4, grad_accum=args.grad_accum, bf16=bf16, device=device
        )
    dev = engine.device if which == "deepspeed" else device
    # The loop's pieces on this engine: train/eval switch and collective devices.
    modes: list[tuple[str, bool]] = []
    phase = ["train"]
    hook = engine.module.register_forward_pre_hook(
        lambda m, a: modes.append((phase[0], m.training))
    )
    devices: list[torch.device] = []
    real_all_reduce = dist.all_reduce

    def spy(*a, **k):
        devices.append((a[0] if a else k["tensor"]).device)
        return real_all_reduce(*a, **k)

    steps = args.warmup + args.steps
    data = make_batches(steps * args.grad_accum + 2, args.micro_batch, args.seq_len,
                        cfg.vocab_size, seed=stage)  # fmt: skip
    held = data[-2:]
    dist.all_reduce = spy
    try:
        train_step(engine, data[: args.grad_accum], dev)
        phase[0] = "eval"
        eval_loss = evaluate(engine, held, dev)
        # The same held-out loss by hand: summed token cross-entropy over all target tokens.
        engine.eval()
        with torch.no_grad():
            total, count = 0.0, 0
            for b in held:
                b = {k: v.to(dev) for k, v in b.items()}
                logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(),
                    ignore_index=-100, reduction="sum",
                ))  # fmt: skip
                count += target_tokens(b)
        engine.train()
        phase[0] = "train"
        train_step(engine, data[: args.grad_accum], dev)  # train mode again after evaluating
    finally:
        dist.all_reduce = real_all_reduce
        hook.remove()
    hand_loss = total / count
    wrong_modes = sum(1 for p, t in modes if (p == "train") != t)
    off_device = sum(1 for d in devices if d != torch.device(dev))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, losses = 0, []
    for i in range(1, steps):
        if i == args.warmup:
            sync()
            t0, tokens = time.perf_counter(), 0
        group = data[i * args.grad_accum : (i + 1) * args.grad_accum]
        s = train_step(engine, group, dev)
        tokens += sum(int(b["attention_mask"].sum()) for b in group)
        losses.append(s.loss)
    sync()
    elapsed = time.perf_counter() - t0
    tok_s = tokens / elapsed
    result = {
        "engine": which,
        "stage": stage,
        "bf16": bf16,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens_per_s": tok_s,
        "step_s": elapsed / max(steps - args.warmup, 1),
        "mfu": tok_s * flops_per_token(cfg, args.seq_len) / (args.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "last_loss": losses[-1] if losses else math.nan,
        "eval_loss": eval_loss,
        "eval_loss_by_hand": hand_loss,
        "eval_loss_rel_err": abs(eval_loss - hand_loss) / max(abs(hand_loss), 1e-12),
        "wrong_mode_forwards": wrong_modes,
        "mode_forwards": len(modes),
        "collectives_off_device": off_device,
        "collectives": len(devices),
        "params": n_params,
    }
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with gloo (tests)")
    p.add_argument("--engine", default="auto",
                   help="deepspeed, fsdp, or both (auto: deepspeed if it imports)")  # fmt: skip
    p.add_argument("--stages", default="2,3", help="ZeRO stages (FSDP2 equivalents) to run")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 (default: on GPU)")  # fmt: skip
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU (H200/H100 SXM: 989)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no GPU visible: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    shape = GPT2_LARGE if cuda else SMOKE
    args.steps = args.steps or (10 if cuda else 2)
    args.seq_len = args.seq_len or (1024 if cuda else 32)
    args.micro_batch = args.micro_batch or (8 if cuda else 2)
    args.warmup = max(1, args.warmup if cuda else 1)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    engines = [e.strip() for e in args.engine.split(",")]
    if engines == ["auto"]:
        try:
            import deepspeed  # noqa: F401

            engines = ["deepspeed"]
        except ImportError:
            engines = ["fsdp"]
    if set(engines) - {"deepspeed", "fsdp"}:
        p.error(f"--engine: unknown {args.engine!r}")
    if cuda:
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")  # fmt: skip
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, device_id=device if cuda else None)
    print(f"engines {engines}, backend {backend}, device {device}, bf16 {args.bf16}, "
          f"shape {shape}, seq {args.seq_len} x micro {args.micro_batch} "
          f"x accum {args.grad_accum}")  # fmt: skip
    # NCCL takes CUDA tensors only: a reduce from the CPU would fail here, as on a cluster.
    (ok,) = all_reduce_sum([1.0], device)
    results = []
    try:
        for which, stage in [(e, int(s)) for e in engines for s in args.stages.split(",")]:
            t = time.perf_counter()
            r = run_stage(args, stage, which, device, shape)
            r["wall_s"] = time.perf_counter() - t
            results.append(r)
            print(
                f"ZeRO-{stage} ({which}, {r['backend']}, bf16 {r['bf16']}): "
                f"{r['tokens_per_s']:.0f} tokens/s, {r['step_s']:.3f} s/step, "
                f"MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g} TFLOPS, "
                f"peak memory {r['peak_mem_gib'] or 0:.1f} GiB, loss {r['last_loss']:.3f}, "
                f"{r['wall_s']:.0f} s",
                flush=True,
            )
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    lines = []
    for r in results:
        tag = f"ZeRO-{r['stage']} ({r['engine']})"
        lines.append(target(f"{tag} train/eval mode errors", r["wrong_mode_forwards"], "<=", 0))
        lines.append(target(f"{tag} collective tensors off the engine's device",
                            r["collectives_off_device"], "<=", 0))  # fmt: skip
        lines.append(target(f"{tag} token-weighted eval loss vs by hand, relative error",
                            r["eval_loss_rel_err"], "<=", 0.01 if r["bf16"] else 1e-4))  # fmt: skip
        if cuda:  # MFU means something only on the GPU: a floor that says bf16 tensor cores ran
            lines.append(target(f"{tag} MFU", 100 * r["mfu"], ">=", 25, "%"))
    by = {(r["engine"], r["stage"]): r for r in results}
    for e in engines:
        if (e, 2) in by and (e, 3) in by and cuda:
            ratio = by[e, 3]["tokens_per_s"] / by[e, 2]["tokens_per_s"]
            lines.append(target(f"ZeRO-3 / ZeRO-2 tokens/s ({e})", ratio, ">=", 0.8, "x"))
    print("\n".join(lines))
    summary = {
        "engines": engines, "backend": backend, "smoke": args.smoke, "shape": shape,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
        "peak_tflops": args.peak_tflops, "torch": torch.__version__, "all_reduce_ok": ok == 1.0,
        "results": results, "targets": lines,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0 if all(line.endswith("MET)") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
