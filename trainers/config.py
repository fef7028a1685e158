"""Training configuration: one typed dataclass, from YAML and flags (`socratic.config`).

Settings shared by every role sit at the top level; `role_scaling` (YAML only) gives a role its
own workers and resources, because the decomposer and the solver see very different amounts of
data (one solver example per sub-question) and may deserve different shares of a cluster.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from socratic.config import option
from socratic.formats import ROLES

TRAINERS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Scaling:
    """How many Ray Train workers a role gets, and what each one holds."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker, **self.resources}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass(frozen=True)
class TrainConfig:
    """Train Socratic students (decomposer, solver, baselines) on Ray Train + DeepSpeed ZeRO."""

    data: str = option(help="annotation Parquet: a file, a folder, or several joined by commas")
    base_model: str = option(help="student to start from: a hub id (gpt2, gpt2-large) or a dir")
    roles: str = option("decomposer,solver", help=f"comma-separated roles of {', '.join(ROLES)}")
    output: str = option("outputs/students", help="where each role's exported HF dir goes")
    storage_path: str = option(
        "outputs/ray_results", help="Ray Train storage for checkpoints: a dir or a URI"
    )
    run_name: str = option("socratic", help="prefix of each role's Ray Train run name")
    deepspeed: str = option(
        str(TRAINERS_DIR / "ds_zero2.json"), help="DeepSpeed config JSON (ZeRO section etc.)"
    )
    zero_stage: int | None = option(None, help="override the ZeRO stage of --deepspeed (2 or 3)")
    bf16: bool = option(False, help="train in bf16 (GPU, or CPU with bf16 support)")
    max_length: int = option(512, help="max tokens per example (prompt + target + EOS)")
    micro_batch_size: int = option(4, help="examples per worker per micro-step")
    grad_accum: int = option(1, help="micro-steps per optimizer step")
    lr: float = option(5e-5, help="peak learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(0, help="linear warmup steps, then linear decay to 0")
    max_steps: int | None = option(None, help="optimizer steps (default: --epochs over the data)")
    epochs: int = option(1, help="passes over the data when --max-steps is not given")
    grad_clip: float = option(1.0, help="gradient clipping norm")
    seed: int = option(0, help="seed for init, data order and length grouping")
    group_by_length: bool = option(True, help="batch similar lengths together to cut padding")
    log_every: int = option(1, help="steps between log lines and metric reports")
    checkpoint_every: int = option(50, help="steps between checkpoints (and one at the end)")
    max_failures: int = option(2, help="worker-group failures to recover from per role")
    sequential: bool = option(False, help="train roles one after another (small clusters)")
    num_workers: int = option(2, help="Ray Train workers per role (default scaling)")
    use_gpu: bool = option(False, help="one GPU per worker (NCCL); off means CPU and gloo")
    cpus_per_worker: float = option(1.0, help="CPUs per worker")
    role_scaling: dict[str, Any] = option(
        None, help="YAML only: per-role Scaling overrides", cli=False
    )
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local one)")
    eval_fraction: float = option(
        0.0, help="share of problems (by problem id, never by example) held out for eval loss"
    )
    eval_data: str | None = option(
        None, help="annotation Parquet to evaluate on instead; its problems leave the train set"
    )
    eval_every: int | None = option(
        None, help="steps between eval losses (default: at every checkpoint and the end)"
    )
    export: str = option(
        "last",
        help="which checkpoint to export: the last, or the best eval loss",
        choices=["best", "last"],
    )
    tracker: str = option(
        "tensorboard",
        help="metrics to TensorBoard event files (in the run's storage), MLflow, W&B, or none",
        choices=["tensorboard", "mlflow", "wandb", "none"],
    )
    resume_from: str | None = option(
        None, help="a checkpoint dir or URI to continue from (e.g. an earlier run's)"
    )

    def __post_init__(self) -> None:
        bad = [r for r in self.role_list if r not in ROLES]
        if bad or not self.role_list:
            raise ValueError(f"--roles must name some of {', '.join(ROLES)}; got {self.roles!r}")
        if self.zero_stage not in (None, 2, 3):
            raise ValueError("--zero-stage must be 2 or 3")
        unknown = set(self.role_scaling or {}) - set(ROLES)
        if unknown:
            raise ValueError(f"role_scaling names unknown roles: {', '.join(sorted(unknown))}")

    @property
    def role_list(self) -> list[str]:
        return [r.strip() for r in self.roles.split(",") if r.strip()]

    @property
    def data_paths(self) -> list[str]:
        return [p.strip() for p in self.data.split(",") if p.strip()]

    def scaling_for(self, role: str) -> Scaling:
        base = Scaling(self.num_workers, self.use_gpu, self.cpus_per_worker)
        override = (self.role_scaling or {}).get(role) or {}
        return replace(base, **override)

    def read_deepspeed(self) -> dict[str, Any]:
        """The --deepspeed JSON, read where the path is valid: on the driver."""
        path = Path(self.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed: no DeepSpeed config at {path.resolve()}")
        return json.loads(path.read_text())

    def with_absolute_paths(self) -> TrainConfig:
        """Local relative paths made absolute against the driver's working dir.

        Ray Train runs each worker in its run's storage folder, not the driver's working dir, so
        a relative `--data` or `--base-model` dir would not be found there; the export task
        would write a relative `--output` wherever it happened to run."""

        def fix(p: str, must_exist: bool) -> str:
            if "://" in p or Path(p).is_absolute() or (must_exist and not Path(p).exists()):
                return p  # a URI, already absolute, or a hub id such as `gpt2`
            return str(Path(p).resolve())

        return replace(
            self,
            data=",".join(fix(p, True) for p in self.data_paths),
            base_model=fix(self.base_model, True),
            output=fix(self.output, False),
            storage_path=fix(self.storage_path, False),
            deepspeed=fix(self.deepspeed, False),
        )

    def deepspeed_config(
        self, *, world_size: int, total_steps: int, on_gpu: bool, base: dict | None = None
    ) -> dict:
        """The DeepSpeed config a worker passes to `deepspeed.initialize`.

        The JSON file holds what users tune per cluster (the ZeRO section); batch sizes,
        optimizer, schedule, clipping and precision come from this config so they cannot
        disagree with the data loader. On CPU the optimizer is torch's AdamW (`torch_adam`),
        which avoids the ~50 s JIT compile of DeepSpeed's fused/CPU Adam (ENVIRONMENT.md).
        """
        ds = copy.deepcopy(base) if base is not None else self.read_deepspeed()
        if self.zero_stage is not None:
            ds.setdefault("zero_optimization", {})["stage"] = self.zero_stage
        ds.update(
            train_micro_batch_size_per_gpu=self.micro_batch_size,
            gradient_accumulation_steps=self.grad_accum,
            train_batch_size=self.micro_batch_size * self.grad_accum * world_size,
            gradient_clipping=self.grad_clip,
            bf16={"enabled": self.bf16},
            optimizer={
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": [0.9, 0.95],
                    "eps": 1e-8,
                    "weight_decay": self.weight_decay,
                    "torch_adam": not on_gpu,
                },
            },
            scheduler={
                "type": "WarmupDecayLR",
                "params": {
                    "total_num_steps": max(total_steps, self.warmup_steps + 1),
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": self.lr,
                    "warmup_num_steps": max(1, self.warmup_steps),  # DeepSpeed needs > 0
                    "warmup_type": "linear",
                },
            },
        )
        return ds
