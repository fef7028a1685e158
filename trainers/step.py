"""One optimizer step and one evaluation pass, in torch alone (no Ray, no pyarrow).

The worker loop (`trainers/loop.py`) and the GPU check (`benchmarks/gpu_check.py`, which runs
where only torch and transformers are installed) call these same functions, so what the GPU check
measures is what a cluster run does.

The loss is token-weighted, as transformers' Trainer computes it with `num_items_in_batch`:
every target token of an optimizer step weighs the same, whichever micro-batch or rank it is on.
A mean per micro-batch would let a batch of short solver answers weigh as much as a batch of
long decompositions. Each micro-batch's summed loss is divided by the *global* number of target
tokens of the step (counted over all grad-accum micro-batches, all-reduced over ranks); the
engine's own averaging is then undone: DeepSpeed divides by the accumulation steps unless
`scale_wrt_gas=False`, and the data-parallel gradient all-reduce averages over ranks, so the
loss is multiplied by the world size (Trainer does both for DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

IGNORE_INDEX = -100  # the label every HF causal LM skips (trainers.data uses the same)


def target_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that carry loss: HF causal LMs shift labels, so position 0 is never a target."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def on_device(values: Iterable[float | torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The float64 vector a collective sends: built on `device` (the engine's)."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


def all_reduce_sum(
    values: Iterable[float | torch.Tensor], device: torch.device | str
) -> list[float]:
    """Sum `values` over ranks, sent from `device`: an NCCL group rejects a CPU tensor."""
    t = on_device(values, device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def set_mode(engine: Any, train: bool) -> None:
    """Dropout on or off. `from_pretrained` returns a model in eval mode and
    `deepspeed.initialize` does not switch it, so every step and every evaluation says which."""
    engine.train() if train else engine.eval()


@dataclass
class StepStats:
    loss: float  # this rank's share of the step's token-mean loss (sum over ranks = the loss)
    target_tokens: int  # this rank's target tokens
    tokens: int  # this rank's real (unpadded) tokens, for tokens/s


def train_step(
    engine: Any, micro_batches: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str
) -> StepStats:
    """One optimizer step over this rank's grad-accum `micro_batches` (token-weighted loss).

    Every rank must call it with the same number of micro-batches (the engine's accumulation
    steps): the gradient all-reduce happens at the last one.
    """
    set_mode(engine, train=True)
    local = sum(target_tokens(b) for b in micro_batches)
    (n_global,) = all_reduce_sum([local], device)
    num_items = torch.tensor(max(n_global, 1.0), device=device)
    scale = world_size()  # undo the data-parallel mean over ranks
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = engine(**batch, num_items_in_batch=num_items).loss  # sum over tokens / n_global
        engine.backward(loss * scale, scale_wrt_gas=False)
        engine.step()
        loss_sum += loss.detach().double()
        tokens += int(batch["attention_mask"].sum())
    return StepStats(float(loss_sum), local, tokens)


def eval_share(n_batches: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's eval batch indices, and how many of them count.

    Under ZeRO-3 each forward gathers parameters from every rank, so all ranks must run the same
    number of forwards: a rank with fewer batches (or none) repeats one, counted as nothing.
    Every batch counts exactly once over all ranks (nothing is cut, unlike training shards).
    """
    mine = list(range(rank, n_batches, world))
    rounds = -(-n_batches // world)
    counted = len(mine)
    filler = mine[0] if mine else 0
    return mine + [filler] * (rounds - counted), counted


@torch.no_grad()
def evaluate(
    engine: Any,
    batches: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device | str,
    counted: int | None = None,
) -> float:
    """Token-mean loss over every rank's batches, in eval mode (then back to train mode).

    Only the first `counted` of this rank's batches count (see `eval_share`).
    """
    set_mode(engine, train=False)
    counted = len(batches) if counted is None else counted
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        one = torch.tensor(1.0, device=device)
        loss = engine(**batch, num_items_in_batch=one).loss  # the batch's summed token loss
        if i < counted:
            loss_sum += loss.double()
            count += target_tokens(batch)
    total, n = all_reduce_sum([loss_sum, count], device)
    set_mode(engine, train=True)
    return total / n if n else float("nan")
