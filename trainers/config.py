"""Training configuration: one typed dataclass, from YAML and flags (`socratic.config`).

Settings shared by every role sit at the top level; `role_scaling` (YAML only) gives a role its
own workers and resources, because the decomposer and the solver see very different amounts of
data (one solver example per sub-question) and may deserve different shares of a cluster.
Its overrides are typed like every other value (`socratic.config.typed_fields`).

The DeepSpeed JSON and this config both say things about the optimizer, schedule, clipping and
precision. `deepspeed_plan` decides per key and says why: a value the user wrote in the JSON
wins over our default; an option the user set here (flag or YAML) wins over the JSON; batch
sizes are always ours, since they must match the data loader.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from socratic.config import ConfigError, option, typed_fields
from socratic.formats import DECOMPOSER_FORMS, ROLES

log = logging.getLogger("trainers")
# The parameters of DeepSpeed's schedulers that our options fill when the JSON leaves them out.
_SCHEDULER_KEYS = {
    "WarmupDecayLR": ("total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                      "warmup_type"),
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    "WarmupCosineLR": ("total_num_steps", "warmup_num_steps", "warmup_type"),
}  # fmt: skip
SOLVER_EXAMPLES = ("packed", "per-example")
TRAIN_POSITIONS = ("contiguous", "random-gaps", "stretch")  # trainers.data.train_position_ids
SHARED = "+"  # `--roles decomposer+solver`: one student, one set of weights, for both roles

TRAINERS_DIR = Path(__file__).resolve().parent


def roles_of(student: str) -> tuple[str, ...]:
    """The roles one student of `--roles` trains on: `solver` is the solver alone,
    `decomposer+solver` one set of weights trained on both roles' examples and exported once
    per role, so evaluation and Serve load it as two students (QUALITY.md: one model on both
    roles with role prompts; our prompts already tell the roles apart)."""
    return tuple(r.strip() for r in student.split(SHARED))


def check_positions(how: str, factor: float, share: float) -> None:
    """The one check of the training-position settings: the trainer's config, the quality
    study's and `trainers.data.train_position_ids` all call it."""
    if how not in TRAIN_POSITIONS:
        raise ValueError(f"--train-positions must be one of {', '.join(TRAIN_POSITIONS)}; "
                         f"got {how!r}")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--position-share must be in [0, 1], got {share}")
    if factor < 1.0:
        raise ValueError(f"--position-factor must be >= 1, got {factor}")


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
    roles: str = option(
        "decomposer,solver",
        help=f"comma-separated students, each a role of {', '.join(ROLES)} or roles joined by "
        f"'{SHARED}' (decomposer{SHARED}solver: one set of weights trained on both, exported to "
        "each role's dir)",
    )
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
    role_scaling: dict[str, dict[str, Any]] | None = option(
        None, help="YAML only: per-role Scaling overrides", cli=False
    )
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local one)")
    eval_fraction: float = option(
        0.0, help="share of problems (by problem id, never by example) held out for eval loss"
    )
    eval_data: str | None = option(
        None, help="annotation Parquet to evaluate on instead; its problems leave the train set"
    )
    decontaminate: str = option(
        "auto",
        help="drop training problems sharing a 13-gram with the evaluation problems: auto (the "
        "test split of the data's datasets, e.g. gsm8k/test; skipped with a warning where it "
        "cannot be loaded), off, or a jsonl/json/csv/parquet FILE of problems with a question "
        "field (in YAML write 'off' quoted)",
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
    solver_examples: str = option(
        "packed",
        help="solver data: one sequence per problem with loss on every answer (packed), or one "
        "example per sub-question (per-example); the same losses, packed has ~2.8x fewer tokens",
        choices=SOLVER_EXAMPLES,
    )
    decomposer_form: str = option(
        "all",
        help="decomposer data: every sub-question at once (all), or one sub-question per "
        "example given the steps answered so far, then 'Done.' (iterative: the loop asks it "
        "before each step; packed like the solver under --solver-examples packed). Recorded "
        "in the exported dir, so evaluation and Serve run its loop. Measured on arith: a tie "
        "with all (pipelines/quality.py)",
        choices=DECOMPOSER_FORMS,
    )
    mask_calculator_results: bool = option(
        False,
        help="no loss on the tokens the calculator forces at inference (the result and '>>' "
        "after '<<expr='): the student never writes them, and predicting them is arithmetic",
    )
    train_positions: str = option(
        "contiguous",
        help="position ids in training: the model's own (contiguous), or drawn so that longer "
        "sequences' distances are trained too (random-gaps: a sorted random subset of [0, "
        "factor x length); stretch: i x s, s in [1, factor]). Inference keeps contiguous ones. "
        "See trainers.data.train_position_ids",
        choices=TRAIN_POSITIONS,
    )
    position_factor: float = option(
        2.0, help="--train-positions random-gaps / stretch: how far past a row's length its "
        "positions may reach (>= 1)"
    )
    position_share: float = option(
        1.0, help="--train-positions: the share of training rows that get drawn positions (the "
        "rest keep the model's own)"
    )
    explicit_options: dict[str, str] | None = option(
        None, help="filled by parse_config: option -> 'flag' or the YAML path", cli=False
    )

    def __post_init__(self) -> None:
        parts = [r for s in self.role_list for r in roles_of(s)]
        if not self.role_list or any(r not in ROLES for r in parts):
            raise ValueError(f"--roles must name some of {', '.join(ROLES)} (comma-separated, "
                             f"'{SHARED}' joins roles into one student); got {self.roles!r}")
        if len(set(parts)) < len(parts):
            raise ValueError(f"--roles names a role twice: {self.roles!r} (each role is "
                             "exported to its own dir, so one student per role)")
        if self.zero_stage not in (None, 2, 3):
            raise ValueError("--zero-stage must be 2 or 3")
        if self.solver_examples not in SOLVER_EXAMPLES:
            raise ValueError(f"--solver-examples must be one of {', '.join(SOLVER_EXAMPLES)}")
        if self.decomposer_form not in DECOMPOSER_FORMS:
            raise ValueError(f"--decomposer-form must be one of {', '.join(DECOMPOSER_FORMS)}")
        check_positions(self.train_positions, self.position_factor, self.position_share)
        setting = self.decontaminate.strip()
        if not setting:
            raise ValueError("--decontaminate must be auto, off or a FILE; got ''")
        if setting.lower() in ("auto", "off"):
            setting = setting.lower()
        object.__setattr__(self, "decontaminate", setting)  # frozen: set once, here
        unknown = set(self.role_scaling or {}) - set(ROLES) - set(self.role_list)
        if unknown:
            raise ConfigError(
                "role_scaling", f"unknown roles {', '.join(sorted(map(str, unknown)))}"
            )
        typed = {
            role: typed_fields(Scaling, override or {}, f"role_scaling.{role}")
            for role, override in (self.role_scaling or {}).items()
        }
        if self.role_scaling is not None:
            object.__setattr__(self, "role_scaling", typed)  # frozen: set once, here

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
        """The --deepspeed JSON, read where the path is valid: on the driver.

        The driver reads it once per run, so this is also where the run says, once, which
        DeepSpeed setting came from where (`deepspeed_plan`)."""
        path = Path(self.deepspeed)
        packaged = Path(__file__).resolve().parents[1] / self.deepspeed
        if not path.is_file() and not path.is_absolute() and packaged.is_file():
            path = packaged  # the shipped configs name `trainers/ds_zero2.json`: from a wheel
        if not path.is_file():
            raise FileNotFoundError(f"--deepspeed: no DeepSpeed config at {path.resolve()}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed: {path} is not valid JSON: {e}") from e
        if not isinstance(ds, dict):
            raise ValueError(f"--deepspeed: {path} must hold a JSON object")
        _, sources = self.deepspeed_plan(
            world_size=self.num_workers, total_steps=1, on_gpu=self.use_gpu, base=ds
        )
        log.info("DeepSpeed settings by source (%s):\n%s", path, format_sources(sources))
        return ds

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
            # a relative path that is not here stays relative: `read_deepspeed` then finds the
            # copy shipped in the package (`trainers/ds_zero2.json` from any working dir)
            deepspeed=fix(self.deepspeed, True),
        )

    def explicit(self, name: str) -> str | None:
        """Where the user set option `name` ('flag', a YAML path), or None for our default.

        A config built in code (no `explicit_options`) counts every non-default value as set."""
        if self.explicit_options is not None:
            return self.explicit_options.get(name)
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        return "code" if getattr(self, name) != f.default else None

    def deepspeed_config(
        self, *, world_size: int, total_steps: int, on_gpu: bool, base: dict | None = None
    ) -> dict:
        """The DeepSpeed config a worker passes to `deepspeed.initialize` (see `deepspeed_plan`)."""
        return self.deepspeed_plan(
            world_size=world_size, total_steps=total_steps, on_gpu=on_gpu, base=base
        )[0]

    def deepspeed_plan(
        self, *, world_size: int, total_steps: int, on_gpu: bool, base: dict | None = None
    ) -> tuple[dict, dict[str, str]]:
        """(DeepSpeed config, where each setting came from: dotted key -> source).

        The JSON holds what users tune per cluster (the ZeRO section, and whatever else they
        choose to write). Per key of optimizer, scheduler, clipping and bf16: the JSON's value
        if it has one (not "auto"), unless the user set the matching option of ours (flag or
        YAML), which then wins and is reported with the JSON value it replaced; else ours.
        Batch sizes are always ours (they must match the data loader); a different JSON value
        is reported. On CPU an Adam optimizer gets `torch_adam`, which avoids the ~50 s JIT
        compile of DeepSpeed's fused/CPU Adam (ENVIRONMENT.md), unless the JSON says otherwise.
        """
        ds = copy.deepcopy(base) if base is not None else self.read_deepspeed()
        src: dict[str, str] = {}

        def put(
            holder: dict, key: str, dotted: str, ours: Any, name: str | None, fixed: bool = False
        ) -> None:
            theirs = holder.get(key, "auto")
            who = self.explicit(name) if name else None
            if theirs == "auto" or fixed or who:
                holder[key] = ours
                label = f"--{name.replace('_', '-')}" if name else "ours"
                if fixed:
                    src[dotted] = "ours (must match the data loader)"
                elif who:
                    src[dotted] = f"{label} (set by {who})"
                else:
                    src[dotted] = f"{label} (default)" if name else "ours"
                if theirs not in ("auto", ours):
                    src[dotted] += f"; overrides the JSON's {theirs!r}"
            else:
                src[dotted] = "json"

        if self.zero_stage is not None:
            put(ds.setdefault("zero_optimization", {}), "stage", "zero_optimization.stage",
                self.zero_stage, "zero_stage")  # fmt: skip
        elif "stage" in ds.get("zero_optimization", {}):
            src["zero_optimization.stage"] = "json"
        put(ds, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu",
            self.micro_batch_size, None, fixed=True)  # fmt: skip
        put(ds, "gradient_accumulation_steps", "gradient_accumulation_steps", self.grad_accum,
            None, fixed=True)  # fmt: skip
        put(ds, "train_batch_size", "train_batch_size",
            self.micro_batch_size * self.grad_accum * world_size, None, fixed=True)  # fmt: skip
        put(ds, "gradient_clipping", "gradient_clipping", self.grad_clip, "grad_clip")
        bf16 = ds.get("bf16")
        ds["bf16"] = bf16 = dict(bf16) if isinstance(bf16, dict) else {}
        put(bf16, "enabled", "bf16.enabled", self.bf16, "bf16")

        ours_opt = {"lr": self.lr, "weight_decay": self.weight_decay}
        if "optimizer" not in ds:
            ds["optimizer"] = {"type": "AdamW", "params": {"betas": [0.9, 0.95], "eps": 1e-8}}
            src["optimizer.type"] = "ours (AdamW, betas 0.9/0.95, eps 1e-8)"
        else:
            src["optimizer.type"] = "json"
        opt = ds["optimizer"]
        params = opt.setdefault("params", {})
        for key in ("lr", "weight_decay"):
            put(params, key, f"optimizer.params.{key}", ours_opt[key], key)
        if str(opt.get("type", "")).lower() in ("adam", "adamw"):
            if "torch_adam" in params:
                src["optimizer.params.torch_adam"] = "json"
            else:
                params["torch_adam"] = not on_gpu
                src["optimizer.params.torch_adam"] = "ours (torch's AdamW on CPU, fused on GPU)"

        ours_sched = {
            "total_num_steps": max(total_steps, self.warmup_steps + 1),
            "warmup_min_lr": 0.0,
            "warmup_max_lr": self.lr,
            "warmup_num_steps": max(1, self.warmup_steps),  # DeepSpeed needs > 0
            "warmup_type": "linear",
        }
        sched_option = {"warmup_max_lr": "lr", "warmup_num_steps": "warmup_steps"}
        if "scheduler" not in ds:
            ds["scheduler"] = {"type": "WarmupDecayLR", "params": {}}
            src["scheduler.type"] = "ours (WarmupDecayLR, linear warmup then decay to 0)"
        else:
            src["scheduler.type"] = "json"
        sched = ds["scheduler"]
        sp = sched.setdefault("params", {})
        has = _SCHEDULER_KEYS.get(sched.get("type"), ())
        for key, value in ours_sched.items():
            if key in sp or key in has:  # a scheduler we do not know: only the keys it has
                if key == "total_num_steps" and sp.get(key, "auto") == "auto":
                    sp[key] = value
                    src[f"scheduler.params.{key}"] = "ours (--max-steps or --epochs x data)"
                    continue
                put(sp, key, f"scheduler.params.{key}", value, sched_option.get(key))
        return ds, src


def format_sources(sources: dict[str, str]) -> str:
    """One `key: source` line per DeepSpeed setting, for the driver's log."""
    width = max(map(len, sources), default=0)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in sources.items())
