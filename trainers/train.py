"""Train the Socratic students on a Ray cluster: one Ray Train + DeepSpeed run per role.

    python trainers/train.py --config trainers/configs/cpu_tiny.yaml
    ray job submit --working-dir . -- \
        python trainers/train.py --config trainers/configs/gpu_gpt2_large.yaml

The decomposer and the solver (and any baseline in `--roles`) train at the same time as separate
`TorchTrainer` runs sharing the cluster, each with its own scaling config; `--sequential` runs
them one after another for clusters too small to hold both. Each run checkpoints to
`--storage-path`, recovers from worker failures from its latest checkpoint, and is exported at
the end to a plain Hugging Face dir under `--output/<role>`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python trainers/train.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from socratic.config import parse_config
from trainers.config import TrainConfig
from trainers.data import build_examples, read_accepted
from trainers.export import export_checkpoint
from trainers.loop import RoleJob, train_worker

log = logging.getLogger("train")


def check_data(cfg: TrainConfig) -> dict[str, int]:
    """Fail before any worker starts if the data cannot train every role (names the path)."""
    rows = read_accepted(cfg.data_paths)
    counts = {}
    for role in cfg.role_list:
        examples, _ = build_examples(rows, role)
        if not examples:
            raise ValueError(f"{cfg.data}: the {len(rows)} accepted rows give no {role} examples")
        counts[role] = len(examples)
    return counts


def fit_role(job: RoleJob) -> dict[str, Any]:
    """One role's Ray Train run, then its export. Runs inside a zero-CPU Ray task."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, scaling = job.cfg, job.cfg.scaling_for(job.role)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.run_name}-{job.role}",
            storage_path=cfg.storage_path,  # absolute: run() resolved it
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.role}: training ended without a checkpoint ({result.error})")
    out = Path(cfg.output) / job.role
    with result.checkpoint.as_directory() as d:
        export_checkpoint(d, cfg.base_model, out)
    m = result.metrics or {}
    return {
        "role": job.role,
        "steps": m.get("step"),
        "tokens": m.get("tokens"),
        "final_loss": m.get("loss"),
        "train_s": round(m.get("train_s", 0.0), 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "resumed_from_step": m.get("resumed_from_step", 0),
        "workers": scaling.num_workers,
        "checkpoint": result.checkpoint.path,
        "export": str(out.resolve()),
    }


def run(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train every role in `cfg.roles`; returns one summary per role."""
    import ray

    cfg = cfg.with_absolute_paths()
    deepspeed = cfg.read_deepspeed()
    counts = check_data(cfg)
    log.info("examples per role: %s", counts)
    if not ray.is_initialized():
        from socratic.ray_address import resolve_address

        ray.init(address=resolve_address(cfg.address), configure_logging=False)
    jobs = [RoleJob(cfg, role, deepspeed) for role in cfg.role_list]
    # The wrapper holds no CPU: a wrapper holding one would starve its own training workers.
    remote_fit = ray.remote(num_cpus=0)(fit_role)
    if cfg.sequential:
        return [ray.get(remote_fit.remote(job)) for job in jobs]
    return ray.get([remote_fit.remote(job) for job in jobs])


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['role']}: {r['steps']} steps, {r['tokens']} tokens, {r['train_s']} s training "
        f"({r['wall_s']} s with start-up), final loss {r['final_loss']:.4f}"
        + (f", resumed from step {r['resumed_from_step']}" if r["resumed_from_step"] else "")
        + f" -> {r['export']}"
        for r in results
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(TrainConfig, argv)
    log.info("config: %s", json.dumps(asdict(cfg), default=str))
    try:
        results = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    # Through the importable module, so Ray ships the worker loop by reference.
    from trainers.train import main as _main

    sys.exit(_main())
