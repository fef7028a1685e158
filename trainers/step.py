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

That rests on the model's forward honouring `num_items_in_batch` (dividing its summed token
loss by it). transformers' causal LMs do; a custom or older model that takes `**kwargs` and
drops it returns its micro-batch mean instead, and the gradients come out about
grad_accum x world times too large, silently. So the first step checks it (`LossCheck`): the
model's loss times `num_items_in_batch` must equal the summed cross-entropy of its own logits.
A model that fails (or whose forward does not take the keyword at all) gets the loss computed
here from its logits for the rest of the run, with a warning; nothing is ever trained on the
wrong scale, not even the first micro-batch.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

IGNORE_INDEX = -100  # the label every HF causal LM skips (trainers.data uses the same)
LOSS_RTOL = 1e-3  # model loss x num_items vs the summed cross-entropy of its logits
log = logging.getLogger("trainers")


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


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over target tokens, computed as HF's `ForCausalLMLoss` does (logits
    upcast to float32, labels shifted by one, `IGNORE_INDEX` skipped)."""
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class LossCheck:
    """Whether an engine's model honours `num_items_in_batch`, as found at its first step.

    `own_loss` means the loss is computed here from the logits (`summed_token_loss`). Training
    checks the micro-batches of its first step and evaluation those of its first pass, on the
    forwards they run anyway (no extra forward, no random numbers drawn, so a resumed run
    stays exact), until one is conclusive. A forward is not when `num_items_in_batch` equals
    that micro-batch's own target count (one rank, no accumulation): a mean and a sum over
    `num_items_in_batch` are then the same number, and ignoring it is harmless. Evaluation
    passes 1, which only a batch with a single target token cannot tell apart.
    """

    accepts_kwarg: bool = True
    own_loss: bool = False
    train_checked: bool = False
    eval_checked: bool = False
    ratio: float | None = None  # (model loss x num_items) / summed token loss, when it failed


_LOSS_CHECKS: weakref.WeakKeyDictionary[Any, LossCheck] = weakref.WeakKeyDictionary()


def loss_check(engine: Any) -> LossCheck:
    """This engine's `LossCheck` (one per engine, so once per run; kept beside it, not on it)."""
    check = _LOSS_CHECKS.get(engine)
    if check is None:
        forward = getattr(getattr(engine, "module", engine), "forward", None)
        check = LossCheck(accepts_kwarg=_accepts_num_items(forward))
        if not check.accepts_kwarg:
            check.own_loss = True
            log.warning(
                "the model's forward takes no num_items_in_batch (nor **kwargs): the token "
                "loss is computed from its logits"
            )
        _LOSS_CHECKS[engine] = check
    return check


def _accepts_num_items(forward: Any) -> bool:
    """As transformers' Trainer decides `model_accepts_loss_kwargs`: the keyword or **kwargs."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return True  # no signature to read: trust it, the first step checks the numbers
    return any(p.name == "num_items_in_batch" or p.kind is p.VAR_KEYWORD for p in params)


def model_loss(
    engine: Any, batch: Mapping[str, torch.Tensor], num_items: torch.Tensor, *, phase: str
) -> torch.Tensor:
    """The batch's summed token loss divided by `num_items`: the model's own loss, checked on
    the first conclusive forward of each `phase` ("train", "eval"; the callers stop checking
    after their first call), or computed from its logits."""
    check = loss_check(engine)
    if check.own_loss:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return summed_token_loss(engine(**inputs).logits, batch["labels"]) / num_items
    out = engine(**batch, num_items_in_batch=num_items)
    if getattr(check, f"{phase}_checked"):
        return out.loss
    logits = getattr(out, "logits", None)
    if logits is None:  # nothing to check against (a fused loss that keeps no logits)
        setattr(check, f"{phase}_checked", True)
        return out.loss
    n = float(num_items)
    own = target_tokens(batch)
    if own == 0 or abs(n - own) <= 0.01 * own:
        return out.loss  # inconclusive, and then harmless: sum / num_items == the mean
    setattr(check, f"{phase}_checked", True)
    summed = summed_token_loss(logits.detach(), batch["labels"])
    got = float(out.loss.detach()) * n
    want = float(summed)
    if abs(got - want) <= LOSS_RTOL * max(abs(want), 1e-12):
        return out.loss
    check.own_loss, check.ratio = True, got / want if want else float("inf")
    log.warning(
        "the model's loss does not honour num_items_in_batch: loss x num_items = %.6g, but its "
        "summed token cross-entropy is %.6g (x%.3g; a micro-batch mean gives gradients about "
        "grad_accum x world times too large). The token loss is computed from its logits "
        "from now on (this micro-batch included).",
        got, want, check.ratio,
    )  # fmt: skip
    return summed_token_loss(logits, batch["labels"]) / num_items


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
        loss = model_loss(engine, batch, num_items, phase="train")  # token-loss sum / n_global
        engine.backward(loss * scale, scale_wrt_gas=False)
        engine.step()
        loss_sum += loss.detach().double()
        tokens += int(batch["attention_mask"].sum())
    loss_check(engine).train_checked = True  # the first step only (see `LossCheck`)
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
        loss = model_loss(engine, batch, one, phase="eval")  # the batch's summed token loss
        if i < counted:
            loss_sum += loss.double()
            count += target_tokens(batch)
    loss_check(engine).eval_checked = True
    total, n = all_reduce_sum([loss_sum, count], device)
    set_mode(engine, train=True)
    return total / n if n else float("nan")
