"""The per-worker training loop: one role, DeepSpeed ZeRO, inside a Ray Train worker.

Read it top to bottom like nanoGPT's: load data and model, `deepspeed.initialize`, resume from
Ray Train's latest checkpoint if there is one, then step; log every `log_every` steps and
checkpoint every `checkpoint_every`. A "step" is one optimizer step (`grad_accum` micro-batches
on every worker). The data order is a pure function of (seed, epoch), so a resumed run skips
exactly the micro-batches it had already trained on and continues at the step it reached, with
optimizer and scheduler state from the DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.config import TrainConfig
from trainers.data import batches, build_examples, collate, padding_fraction, read_accepted, shard
from trainers.data import tokenize as tokenize_examples
from trainers.export import STATE_FILE

log = logging.getLogger("trainers")


@dataclass(frozen=True)
class RoleJob:
    """What one Ray Train run needs: the shared config and which role it trains."""

    cfg: TrainConfig
    role: str
    # The DeepSpeed JSON as the driver read it: workers run in Ray Train's own folder (and on
    # other nodes), where the file's path may not resolve.
    deepspeed: dict[str, Any] | None = None


def _micro_batches(
    lengths: list[int], job: RoleJob, rank: int, world: int
) -> Iterator[tuple[int, list[int]]]:
    """(epoch, example indices) for this rank, epoch after epoch, forever."""
    epoch = 0
    while True:
        order = batches(
            lengths,
            job.cfg.micro_batch_size,
            seed=job.cfg.seed,
            epoch=epoch,
            group_by_length=job.cfg.group_by_length,
        )
        for b in shard(order, rank, world):
            yield epoch, b
        epoch += 1


def steps_per_epoch(n_batches: int, world: int, grad_accum: int) -> int:
    per_rank = max(1, n_batches // world) if n_batches >= world else 1
    return max(1, per_rank // grad_accum)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job: RoleJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = torch.cuda.is_available() and cfg.use_gpu
    if not on_gpu:
        # Plain gloo: the shared-memory comm op costs a ~30 s JIT compile on a fresh machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {job.role}[{rank}] %(message)s")
    torch.manual_seed(cfg.seed)

    # Data: every worker builds the same tokenised set, then takes its shard of each epoch.
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples, built = build_examples(
        read_accepted(cfg.data_paths), job.role, packed=cfg.solver_examples == "packed"
    )
    data = tokenize_examples(examples, tokenizer, cfg.max_length)
    if not len(data):
        raise ValueError(
            f"{job.role}: no trainable examples in {cfg.data} "
            f"({data.dropped} longer than --max-length {cfg.max_length})"
        )
    lengths = data.lengths
    epoch0 = batches(
        lengths, cfg.micro_batch_size, seed=cfg.seed, epoch=0, group_by_length=cfg.group_by_length
    )
    per_epoch = steps_per_epoch(len(epoch0), world, cfg.grad_accum)
    total_steps = cfg.max_steps or per_epoch * cfg.epochs

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    ds_config = cfg.deepspeed_config(
        world_size=world, total_steps=total_steps, on_gpu=on_gpu, base=job.deepspeed
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config,
        dist_init_required=False,
    )

    step, resumed_from = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            engine.load_checkpoint(d, tag=state["tag"])
            step = resumed_from = state["step"]
        log.info("resumed from checkpoint at step %d", step)

    if rank == 0:
        pad = padding_fraction(lengths, epoch0)
        log.info(
            "%s: %d examples (%d truncated, %d dropped, %d unbuildable), %d steps, "
            "world %d, padding %.1f%%",
            job.role,
            len(data),
            data.truncated,
            data.dropped,
            built.skipped,
            total_steps,
            world,
            100 * pad,
        )

    device = engine.device
    micro = _micro_batches(lengths, job, rank, world)
    for _ in range(step * cfg.grad_accum):  # skip what the checkpoint already trained on
        next(micro)

    tokens_since, t_since, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
    t_start, tokens_total, last_loss = time.perf_counter(), 0, math.nan
    while step < total_steps:
        for _ in range(cfg.grad_accum):
            epoch, idx = next(micro)
            batch = collate([data[i] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            n_tok = int(batch["attention_mask"].sum())
            tokens_since += n_tok
            loss_sum, loss_n = loss_sum + float(loss), loss_n + 1
        step += 1
        last_step = step == total_steps
        if step % cfg.log_every == 0 or last_step:
            stats = torch.tensor([tokens_since, loss_sum, loss_n], dtype=torch.float64)
            torch.distributed.all_reduce(stats)
            elapsed = time.perf_counter() - t_since
            last_loss = float(stats[1] / stats[2])
            tokens_total += int(stats[0])
            metrics = {
                "role": job.role,
                "step": step,
                "epoch": epoch,
                "loss": last_loss,
                "lr": scheduler.get_last_lr()[0] if scheduler else cfg.lr,
                "tokens_per_s": float(stats[0]) / elapsed,
                "tokens": tokens_total,
                "resumed_from_step": resumed_from,
            }
            if rank == 0:
                log.info(
                    "step %d/%d loss %.4f lr %.2e tok/s %.0f",
                    step,
                    total_steps,
                    metrics["loss"],
                    metrics["lr"],
                    metrics["tokens_per_s"],
                )
            tokens_since, t_since, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
            if step % cfg.checkpoint_every == 0 or last_step:
                metrics["train_s"] = time.perf_counter() - t_start
                _save_and_report(engine, step, metrics, rank)
            else:
                ray.train.report(metrics)


def _save_and_report(engine: Any, step: int, metrics: dict[str, Any], rank: int) -> None:
    """Every rank writes its ZeRO shards to a local dir; Ray Train merges them in storage."""
    import ray.train

    tag = f"step{step}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=tag)
        if rank == 0:
            Path(d, STATE_FILE).write_text(json.dumps({"step": step, "tag": tag}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
