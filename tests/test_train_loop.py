"""The worker loop's pieces on a real DeepSpeed engine, in this process (a one-rank gloo group).

Ray Train costs ~16 s per fit; what these check (train/eval switching, the device of collective
tensors, per-role GPU decisions, ZeRO-3 loading, resume refusing an incomplete checkpoint) lives
in the functions `train_worker` calls, so they are called here directly on a real engine.
`tests/test_train_runs.py` runs the same loop through Ray Train.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import write_gold_annotations
from trainers.config import TrainConfig
from trainers.holdout import split_by_problem, without_problems

SAMPLE = list(load_problems(DatasetSpec("sample", split="train")))




@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    return write_gold_annotations(SAMPLE, tmp_path_factory.mktemp("ann") / "gold")


def _job(data: Path, model: Path, **kw):
    from trainers.loop import RoleJob

    cfg = TrainConfig(data=str(data), base_model=str(model), micro_batch_size=2, max_length=128,
                      num_workers=1, **kw)  # fmt: skip
    return RoleJob(cfg, "decomposer", cfg.read_deepspeed())


def _engine(job):
    from trainers.loop import build_engine, device_plan

    return build_engine(job, device_plan(job.cfg, job.role), world=1, total_steps=4)


def _batches(job, n: int):
    from transformers import AutoTokenizer

    from trainers.data import collate
    from trainers.loop import load_data

    tok = AutoTokenizer.from_pretrained(job.cfg.base_model)
    data = load_data(job, tok)
    return [collate([data.train[2 * i], data.train[2 * i + 1]], tok.pad_token_id) for i in range(n)]


def test_steps_train_with_dropout_on_and_evaluation_runs_in_eval_mode(
    one_rank, annotations, tiny_model_dir
) -> None:
    """`from_pretrained` returns eval mode and `deepspeed.initialize` keeps it: a loop that never
    calls `engine.train()` trains with dropout off."""
    import torch

    from trainers.step import all_reduce_sum, evaluate, train_step

    job = _job(annotations, tiny_model_dir)
    engine, _ = _engine(job)
    assert not engine.module.training  # what from_pretrained hands over
    seen: list[tuple[str, bool]] = []
    phase = ["train"]
    engine.module.register_forward_pre_hook(lambda m, a: seen.append((phase[0], m.training)))
    reduced: list[torch.device] = []
    real = torch.distributed.all_reduce

    def spy(*a, **k):  # record where every collective's tensor lives
        reduced.append((a[0] if a else k["tensor"]).device)
        return real(*a, **k)

    torch.distributed.all_reduce = spy
    try:
        batches = _batches(job, 3)
        train_step(engine, batches[:1], engine.device)
        phase[0] = "eval"
        loss = evaluate(engine, batches[1:], engine.device)
        phase[0] = "train"
        train_step(engine, batches[:1], engine.device)
        all_reduce_sum([1.0, 2], engine.device)
    finally:
        torch.distributed.all_reduce = real
    assert seen == [("train", True), ("eval", False), ("eval", False), ("train", True)], seen
    assert loss == loss and loss > 0  # a real token-mean loss, not NaN
    assert reduced and all(d == engine.device for d in reduced)


def test_collective_tensors_are_built_on_the_given_device() -> None:
    """On GPU the engine's device is CUDA and NCCL refuses CPU tensors; the `meta` device stands
    in here for 'not the CPU default'."""
    import torch

    from trainers.step import on_device

    t = on_device([1, 2.5, torch.tensor(3)], torch.device("meta"))
    assert t.device.type == "meta" and t.dtype == torch.float64 and t.shape == (3,)


def test_per_role_use_gpu_reaches_every_worker_decision(tmp_path) -> None:
    from trainers.loop import device_plan

    cfg = TrainConfig(data="x", base_model="gpt2", use_gpu=False,
                      role_scaling={"solver": {"use_gpu": True}})  # fmt: skip
    gpu, cpu = device_plan(cfg, "solver"), device_plan(cfg, "decomposer")
    assert (gpu.on_gpu, gpu.backend, gpu.torch_adam) == (True, "nccl", False)
    assert (cpu.on_gpu, cpu.backend, cpu.torch_adam) == (False, "gloo", True)
    ds = cfg.deepspeed_config(world_size=1, total_steps=2, on_gpu=gpu.on_gpu)
    assert ds["optimizer"]["params"]["torch_adam"] is False
    flipped = TrainConfig(data="x", base_model="gpt2", use_gpu=True,
                          role_scaling={"decomposer": {"use_gpu": False}})  # fmt: skip
    assert device_plan(flipped, "decomposer").backend == "gloo"
    assert device_plan(flipped, "solver").backend == "nccl"


def test_zero3_partitions_the_model_while_it_loads(one_rank, tiny_model_dir) -> None:
    from trainers.loop import load_model

    cfg = TrainConfig(data="x", base_model=str(tiny_model_dir), zero_stage=3, num_workers=1)
    ds = cfg.deepspeed_config(world_size=1, total_steps=2, on_gpu=False)
    model, keep = load_model(cfg, ds)
    params = list(model.parameters())
    assert keep is not None
    # Each parameter is a ZeRO-3 stub: no local data, its partition held by DeepSpeed.
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    assert sum(p.ds_numel for p in params) > 10_000
    del keep, model
    cfg2 = TrainConfig(data="x", base_model=str(tiny_model_dir), num_workers=1)  # ZeRO-2
    model2, keep2 = load_model(
        cfg2, cfg2.deepspeed_config(world_size=1, total_steps=2, on_gpu=False)
    )
    assert keep2 is None and all(p.numel() > 0 for p in model2.parameters())


def test_held_out_problems_never_share_a_problem_with_training() -> None:
    rows = [{"id": f"p{i}", "sample": s} for i in range(40) for s in range(3)]
    train, held = split_by_problem(rows, 0.25, seed=0)
    train_ids, held_ids = {r["id"] for r in train}, {r["id"] for r in held}
    assert len(held_ids) == 10 and not train_ids & held_ids and len(train) + len(held) == 120
    assert all(sum(r["id"] == i for r in held) == 3 for i in held_ids)  # every sample goes along
    assert split_by_problem(rows, 0.25, seed=0) == (train, held)  # every worker gets the same
    assert {r["id"] for r in split_by_problem(rows, 0.25, seed=1)[1]} != held_ids
    kept, removed = without_problems(rows, held)
    assert removed == 30 and {r["id"] for r in kept} == train_ids
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_by_problem(rows, 1.0, seed=0)


def test_settings_that_cannot_work_together_fail_before_training(annotations, tiny_model_dir):
    from trainers.train import check_config

    base = dict(data=str(annotations), base_model=str(tiny_model_dir))
    with pytest.raises(ValueError, match="--export best"):
        check_config(TrainConfig(**base, export="best"))
    with pytest.raises(ValueError, match="pip install mlflow"):
        check_config(TrainConfig(**base, tracker="mlflow"))  # not installed in this venv
    check_config(TrainConfig(**base, export="best", eval_fraction=0.2))
