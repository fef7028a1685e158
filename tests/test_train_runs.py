"""Held-out eval, tracking, best export, provenance and resume through real Ray Train runs.

Two fits share every assertion (each costs ~16 s of Ray Train start-up): run A trains the
decomposer 8 steps with a held-out eval set and exports its best checkpoint; run B resumes from
A's step-4 checkpoint and must end with exactly A's step-8 weights (the tiny student has dropout
on, so this also proves the RNG state came back, and that the checks of the first step draw no
random numbers). Resuming from a checkpoint with a file removed must fail with a message that
names the checkpoint; resuming with another `--max-length` must fail naming it, on the driver.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from socratic.adapters import DatasetSpec, load_problems
from tests.support.annotations import write_gold_annotations
from trainers.config import TrainConfig
from trainers.export import (
    CURVES_FILE,
    FINGERPRINT_FILE,
    HISTORY_FILE,
    PROVENANCE_FILE,
    STATE_FILE,
)
from trainers.train import run

pytestmark = pytest.mark.slow

SAMPLE = list(load_problems(DatasetSpec("sample", split="train")))


def _cfg(tmp: Path, data: Path, model: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data), base_model=str(model), roles="decomposer",
        output=str(tmp / "students"), storage_path=str(tmp / "ray_results"), run_name="a",
        max_length=256, micro_batch_size=4, lr=3e-3, warmup_steps=2, max_steps=8,
        checkpoint_every=4, log_every=2, eval_every=2, eval_fraction=0.25, num_workers=2,
        max_failures=0, export="best",
        # Drawn position ids, so the resume test also shows they are replayed exactly.
        train_positions="random-gaps",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    data = write_gold_annotations(SAMPLE, tmp / "gold")
    cfg_a = _cfg(tmp, data, tiny_model_dir)
    (a,) = run(cfg_a)
    checkpoints = {
        json.loads(f.read_text())["step"]: f.parent
        for f in (tmp / "ray_results" / "a-decomposer").rglob(STATE_FILE)
    }
    cfg_b = _cfg(tmp, data, tiny_model_dir, run_name="b", output=str(tmp / "resumed"),
                 export="last", resume_from=str(checkpoints[4]))  # fmt: skip
    (b,) = run(cfg_b)
    return {"a": a, "b": b, "checkpoints": checkpoints, "tmp": tmp, "cfg_a": cfg_a}


def _weights(model_dir) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _scalar_tags(log_dir: Path) -> set[str]:
    """Tags of the scalars in TensorBoard event files (TFRecord of `Event` protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for f in log_dir.rglob("events.out.tfevents.*"):
        buf = f.read_bytes()
        i = 0
        while i + 12 <= len(buf):
            (n,) = struct.unpack("<Q", buf[i : i + 8])
            event = event_pb2.Event.FromString(buf[i + 12 : i + 12 + n])
            tags.update(v.tag for v in event.summary.value)
            i += 12 + n + 4
    return tags


def test_eval_tracking_best_export_and_provenance(runs) -> None:
    a, cfg = runs["a"], runs["cfg_a"]
    history = json.loads((runs["checkpoints"][8] / HISTORY_FILE).read_text())
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals) == [2, 4, 6, 8]  # every --eval-every steps
    assert all(v == v and v > 0 for v in evals.values())
    best = min((4, 8), key=lambda s: evals[s])  # the two checkpoints
    assert a["exported_step"] == best and a["eval_loss"] == pytest.approx(evals[8])

    export = Path(a["export"])
    prov = json.loads((export / PROVENANCE_FILE).read_text())
    assert prov["export"] == "best" and prov["step"] == best
    assert prov["base_model"] == cfg.base_model and prov["data"] == str(Path(cfg.data).resolve())
    assert Path(prov["checkpoint"]) == runs["checkpoints"][best]
    assert prov["config"]["eval_fraction"] == 0.25 and prov["deepspeed"]["zero_optimization"]
    assert prov["versions"]["deepspeed"] and prov["versions"]["torch"]
    assert prov["git_commit"] is None or len(prov["git_commit"]) >= 40
    assert (export / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tags = _scalar_tags(runs["tmp"] / "ray_results" / "a-decomposer" / "tensorboard")
    assert {"loss", "eval_loss", "lr", "tokens_per_s", "grad_norm"} <= tags, tags


def test_resume_continues_exactly_as_the_uninterrupted_run(runs) -> None:
    import torch

    from trainers.export import export_checkpoint

    b = runs["b"]
    assert b["resumed_from_step"] == 4 and b["steps"] == 8 and b["exported_step"] == 8
    a8 = export_checkpoint(runs["checkpoints"][8], runs["cfg_a"].base_model, runs["tmp"] / "a8")
    want, got = _weights(a8), _weights(b["export"])
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst < 1e-6, worst
    before = _weights(runs["cfg_a"].base_model)
    assert max((want[k] - before[k]).abs().max().item() for k in want) > 1e-3  # it trained
    del torch


def test_resume_from_an_incomplete_checkpoint_fails_naming_it(runs, tmp_path, capsys) -> None:
    """DeepSpeed alone would quietly keep a fresh optimizer (or the base weights) and go on."""
    import ray.train

    from trainers.loop import CheckpointError, resume

    cfg = runs["cfg_a"]
    broken = tmp_path / "step4"
    shutil.copytree(runs["checkpoints"][4], broken)
    shard = next(broken.rglob("*rank_1*optim_states.pt"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=str(broken)) as e:
        resume(None, ray.train.Checkpoint(str(broken)), cfg, rank=0, world=2)
    assert shard.name in str(e.value)
    from trainers.train import main

    code = main(["--data", cfg.data, "--base-model", cfg.base_model, "--resume-from", str(broken)])
    err = capsys.readouterr().err
    assert code == 2 and str(broken) in err and shard.name in err, err  # before any worker
    (broken / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{broken}.*no {STATE_FILE}"):
        resume(None, ray.train.Checkpoint(str(broken)), cfg, rank=0, world=2)
    with pytest.raises(CheckpointError, match="different data order or world"):
        resume(None, ray.train.Checkpoint(str(runs["checkpoints"][4])), cfg, rank=0, world=3)


def test_checkpoints_carry_a_fingerprint_and_a_changed_one_is_refused(runs, capsys) -> None:
    """Run B resumed (same data and settings) past the check; another --max-length would train
    on other sequences, and the driver refuses it before any worker starts."""
    cfg, step4 = runs["cfg_a"], runs["checkpoints"][4]
    fp = json.loads((step4 / FINGERPRINT_FILE).read_text())
    assert fp["role"] == "decomposer" and fp["max_length"] == 256 and fp["solver_examples"] is None
    assert fp["data"]["rows"] > 0 and fp["tokenizer"]["vocab_size"] > 0 and fp["sequences"]
    from trainers.train import main

    args = ["--data", cfg.data, "--base-model", cfg.base_model, "--roles", "decomposer",
            "--eval-fraction", "0.25", "--resume-from", str(step4)]  # fmt: skip
    code = main([*args, "--max-length", "128"])
    err = capsys.readouterr().err
    assert code == 2 and str(step4) in err and "--max-length: 256 -> 128" in err, err
    assert "training data" not in err and "tokenizer" not in err, err  # only what changed
