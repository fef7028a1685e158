"""Token-weighted loss across grad-accum micro-steps and ranks, on 2 real gloo ranks.

Two processes run `trainers.step.train_step` on a real DeepSpeed ZeRO-2 engine with plain SGD
(lr 1, so the update is minus the gradient), two micro-batches each, of very uneven target
lengths. The gradient must equal that of one big batch's token mean, the objective of training
on all four micro-batches at once: a per-micro-batch mean would weigh a 2-token target as much
as a 40-token one.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

VOCAB, LR = 97, 1.0


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _micro_batches() -> list[list[dict[str, torch.Tensor]]]:
    """Per rank, two micro-batches of 2 rows; targets of 2 to 40 tokens, prompts of 3 to 9."""
    g = torch.Generator().manual_seed(1)
    shapes = [[[(3, 2), (5, 3)], [(4, 40), (9, 2)]], [[(6, 30), (3, 25)], [(8, 4), (5, 2)]]]
    out = []
    for rank_shapes in shapes:
        per_rank = []
        for micro in rank_shapes:
            width = max(p + t for p, t in micro)
            ids = torch.randint(0, VOCAB, (len(micro), width), generator=g)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for row, (p, t) in enumerate(micro):
                labels[row, p : p + t] = ids[row, p : p + t]
                mask[row, : p + t] = 1
            per_rank.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out.append(per_rank)
    return out


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    from trainers.step import train_step

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = _model()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 8,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config,
        dist_init_required=False,
    )  # fmt: skip
    stats = train_step(engine, _micro_batches()[rank], engine.device)
    if rank == 0:
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        torch.save({"state": state, "loss": stats.loss}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _reference() -> tuple[dict[str, torch.Tensor], float]:
    """Weights after one SGD step on the token mean of all four micro-batches together."""
    model = _model()
    flat = [b for rank in _micro_batches() for b in rank]
    width = max(b["input_ids"].shape[1] for b in flat)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    big = {
        k: torch.cat([pad(b[k], -100 if k == "labels" else 0) for b in flat])
        for k in ("input_ids", "attention_mask", "labels")
    }
    loss = model(**big).loss  # HF's mean over every target token of the big batch
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}, float(loss)


def test_two_ranks_with_uneven_targets_step_on_the_global_token_mean(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank, args=(port, out), nprocs=2, start_method="spawn", join=True)
    got = torch.load(out)
    want, _ = _reference()
    before = _model().state_dict()
    worst = 0.0
    for k, w in want.items():
        if k.endswith("attn.bias") or k.endswith("masked_bias"):
            continue
        step_want, step_got = w - before[k], got["state"][k] - before[k]
        scale = step_want.abs().max().item() or 1.0
        worst = max(worst, (step_got - step_want).abs().max().item() / scale)
    assert worst < 1e-4, f"update differs from the big batch's by {worst:.2e} (relative)"
