"""Training on Ray Train + DeepSpeed ZeRO (gloo on CPU) with the tiny local student.

Every test runs the real thing: `TorchTrainer` workers, `deepspeed.initialize`, ZeRO shards
checkpointed through Ray Train storage, and an export that `from_pretrained` loads. "Training
worked" is judged by the exported weights: their loss on the training examples must be well
below the base model's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from socratic.adapters import DatasetSpec, load_problems
from socratic.formats import examples_for
from socratic.records import ACCEPTED, REJECTED
from tests.support.annotations import write_gold_annotations
from trainers.config import TrainConfig
from trainers.train import main, run

SAMPLE = list(load_problems(DatasetSpec("sample", split="train")))


def _write_rows(path: Path, status: str = ACCEPTED) -> Path:
    return write_gold_annotations(SAMPLE, path, status)


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    return _write_rows(tmp_path_factory.mktemp("ann") / "gold")


def _cfg(tmp_path: Path, data: Path, model: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        base_model=str(model),
        output=str(tmp_path / "students"),
        storage_path=str(tmp_path / "ray_results"),
        run_name=tmp_path.name,
        max_length=256,
        micro_batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=24,
        checkpoint_every=8,
        log_every=4,
        num_workers=2,
        max_failures=1,
    )
    return TrainConfig(**{**base, **kw})


def _mean_loss(model_dir: str | Path, role: str) -> float:
    """Target-only loss of a model on the role's examples (what training minimises)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    for p in SAMPLE[:12]:
        for ex in examples_for(role, problem=p.question, steps=p.steps):
            prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + target])
            labels = torch.tensor([[-100] * len(prompt) + target])
            with torch.no_grad():
                losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def _generates(model_dir: str | Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(
        **tok(["Problem: x\nSub-questions:\n"], return_tensors="pt"),
        max_new_tokens=4,
        do_sample=False,
    )
    assert out.shape[1] > 0


def test_decomposer_and_solver_train_concurrently_with_zero3_and_export(
    ray_cluster, annotations, tiny_model_dir, tmp_path
) -> None:
    """ZeRO-3 here (partitioned load, consolidated export); ZeRO-2, the default config, is what
    every other training test and the demo run. One fit for both saves CI a Ray Train start-up."""
    cfg = _cfg(tmp_path, annotations, tiny_model_dir, roles="decomposer,solver", zero_stage=3)
    t0 = time.perf_counter()
    results = {r["role"]: r for r in run(cfg)}
    wall = time.perf_counter() - t0
    assert set(results) == {"decomposer", "solver"}
    for role, r in results.items():
        assert r["steps"] == 24 and r["tokens"] > 0 and r["resumed_from_step"] == 0
        export = Path(r["export"])
        assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
        before, after = _mean_loss(tiny_model_dir, role), _mean_loss(export, role)
        print(f"\nzero-3 {role}: loss {before:.3f} -> {after:.3f} in {r['train_s']} s")
        assert after < 0.8 * before, (role, before, after)
        _generates(export)
    # Concurrent, not one after the other: the runs overlapped in time.
    assert wall < results["decomposer"]["wall_s"] + results["solver"]["wall_s"]


def _train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            pids.append(proc.info["pid"])
    return pids


def test_killed_worker_is_replaced_and_training_continues_from_the_checkpoint(
    ray_cluster, annotations, tiny_model_dir, tmp_path
) -> None:
    cfg = _cfg(
        tmp_path,
        annotations,
        tiny_model_dir,
        roles="decomposer",
        max_steps=60,
        checkpoint_every=10,
        log_every=10,
        max_failures=2,
    )
    storage = Path(cfg.storage_path)
    killed: list[int] = []

    def registered_checkpoint() -> bool:
        """True once Ray Train's controller has registered a checkpoint: its own snapshot file
        names one. (A checkpoint dir can exist before that; a worker killed then restarts
        from zero, correctly, and the test would prove nothing.)"""
        for snap in storage.rglob("checkpoint_manager_snapshot.json"):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                    return True
        return False

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if registered_checkpoint() and (pids := _train_worker_pids()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    (r,) = run(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed: training finished before the first checkpoint"
    assert r["steps"] == 60, r
    assert r["resumed_from_step"] > 0 and r["resumed_from_step"] % 10 == 0, r
    print(f"\nkilled pid {killed[0]}; resumed from step {r['resumed_from_step']}")


def test_bad_data_ends_with_an_error_naming_the_path(
    tmp_path, tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    rejected = _write_rows(tmp_path / "rejected", status=REJECTED)
    for data, message in [
        (missing, "not found"),
        (empty, "no annotation rows"),
        (rejected, "none of the"),
    ]:
        code = main(["--data", str(data), "--base-model", str(tiny_model_dir)])
        err = capsys.readouterr().err
        assert code == 2 and str(data) in err and message in err, err


def test_relative_paths_are_resolved_on_the_driver(tmp_path: Path, monkeypatch) -> None:
    """Ray Train runs workers in its own folder: a path relative to where the user typed the
    command must be made absolute before it travels, and the DeepSpeed JSON read right there."""
    (tmp_path / "ann").mkdir()
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(
        data="ann,s3://bucket/more", base_model="model", output="students",
        storage_path="runs", deepspeed=str(Path(__file__).parents[1] / "trainers/ds_zero2.json"),
    ).with_absolute_paths()  # fmt: skip
    assert cfg.data_paths == [str(tmp_path / "ann"), "s3://bucket/more"]
    assert (cfg.base_model, cfg.output, cfg.storage_path) == (
        str(tmp_path / "model"), str(tmp_path / "students"), str(tmp_path / "runs"),
    )  # fmt: skip
    hub = TrainConfig(data="ann", base_model="gpt2").with_absolute_paths()
    assert hub.base_model == "gpt2"  # a hub id, not a dir here: left alone

    base = cfg.read_deepspeed()
    ds = cfg.deepspeed_config(world_size=2, total_steps=10, on_gpu=False, base=base)
    assert ds["zero_optimization"] == base["zero_optimization"]
    with pytest.raises(FileNotFoundError, match="no DeepSpeed config"):
        TrainConfig(data="ann", base_model="gpt2", deepspeed="nope.json").read_deepspeed()


def test_one_shared_student_trains_on_both_roles_and_is_exported_as_each(
    ray_cluster, annotations, tiny_model_dir, tmp_path
) -> None:
    """`--roles decomposer+solver`: one set of weights learns both roles' examples, and both
    role dirs hold it, with their own provenance, so evaluation and Serve load two students."""
    import torch
    from safetensors.torch import load_file

    cfg = _cfg(tmp_path, annotations, tiny_model_dir, roles="decomposer+solver", num_workers=1,
               max_steps=48, checkpoint_every=48)  # twice the data: twice the steps
    (r,) = run(cfg)
    assert r["role"] == "decomposer+solver" and r["steps"] == 48
    exports = {role: Path(p) for role, p in r["exports"].items()}
    assert list(exports) == ["decomposer", "solver"] and Path(r["export"]) == exports["decomposer"]
    weights = [load_file(str(p / "model.safetensors")) for p in exports.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for role, export in exports.items():
        prov = json.loads((export / "provenance.json").read_text())
        assert prov["role"] == role and prov["student"] == "decomposer+solver"
        before, after = _mean_loss(tiny_model_dir, role), _mean_loss(export, role)
        print(f"\nshared {role}: loss {before:.3f} -> {after:.3f}")
        assert after < 0.8 * before, (role, before, after)
