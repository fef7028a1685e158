"""The per-worker training loop: one role, DeepSpeed ZeRO, inside a Ray Train worker.

`train_worker` reads top to bottom, as Ray's DeepSpeed fine-tuning example does: data, engine,
resume, then the loop of step, log, evaluate and checkpoint. A "step" is one optimizer step
(`grad_accum` micro-batches on every worker) with a token-weighted loss (`trainers/step.py`).
The data order is a pure function of (seed, epoch), so a resumed run skips exactly the
micro-batches it had trained on; optimizer and scheduler state come from the DeepSpeed
checkpoint and the RNG state of every rank from beside it, so a resumed run continues as the
uninterrupted run would have (dropout masks included). Beside them lies a fingerprint of what
the run trained on (`run_fingerprint`: data, `max_length`, solver form, tokenizer, the token
sequences themselves); a resume where any of it changed is refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from array import array
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainers.config import TrainConfig, roles_of
from trainers.data import (
    TokenizedSet,
    absolute_positions,
    batches,
    build_examples,
    collate,
    padding_fraction,
    read_accepted,
    shard,
    train_position_ids,
)
from trainers.data import tokenize as tokenize_examples
from trainers.export import FINGERPRINT_FILE, HISTORY_FILE, STATE_FILE
from trainers.holdout import split_by_problem, without_problems
from trainers.step import StepStats, all_reduce_sum, eval_share, evaluate, train_step

log = logging.getLogger("trainers")


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing files or was written by an incompatible run."""


@dataclass(frozen=True)
class RoleJob:
    """What one Ray Train run needs: the shared config and which role it trains."""

    cfg: TrainConfig
    role: str
    # The DeepSpeed JSON as the driver read it: workers run in Ray Train's own folder (and on
    # other nodes), where the file's path may not resolve.
    deepspeed: dict[str, Any] | None = None
    log_dir: str | None = None  # where rank 0 writes TensorBoard events (the run's storage)
    # Problem ids `--decontaminate` dropped: decided once on the driver (which alone loads the
    # evaluation set), so every worker trains on the same rows without loading it again.
    drop: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DevicePlan:
    """Where a role's workers compute, from that role's own scaling (`role_scaling`)."""

    on_gpu: bool
    backend: str  # the torch.distributed backend: NCCL on GPU, gloo on CPU
    torch_adam: bool  # torch's AdamW on CPU: DeepSpeed's fused/CPU Adam costs a JIT compile


def device_plan(cfg: TrainConfig, role: str) -> DevicePlan:
    use_gpu = cfg.scaling_for(role).use_gpu
    return DevicePlan(use_gpu, "nccl" if use_gpu else "gloo", torch_adam=not use_gpu)


# --- data -----------------------------------------------------------------------------------------


@dataclass
class RoleData:
    train: TokenizedSet
    eval: TokenizedSet | None
    train_problems: int
    eval_problems: int
    unbuildable: int
    fingerprint: dict[str, Any] = field(default_factory=dict)  # `run_fingerprint` of the run


def split_rows(
    cfg: TrainConfig, drop: Collection[str] = (), rows: list[dict] | None = None
) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) by problem: `--eval-data`, else `--eval-fraction`, else none.

    The problems in `drop` (`--decontaminate`'s) leave `--data` first, so an `--eval-fraction`
    split is drawn from what may be trained on. `rows` saves the driver a second read."""
    rows = read_accepted(cfg.data_paths) if rows is None else rows
    if drop:
        rows = [r for r in rows if r["id"] not in drop]
    if cfg.eval_data:
        held = read_accepted([p.strip() for p in cfg.eval_data.split(",") if p.strip()])
        train, removed = without_problems(rows, held)
        if removed:
            log.info("%d training rows share a problem with --eval-data: left out", removed)
        if not train:
            raise ValueError(f"every problem of {cfg.data} is in --eval-data {cfg.eval_data}")
        return train, held
    if cfg.eval_fraction:
        return split_by_problem(rows, cfg.eval_fraction, cfg.seed)
    return rows, []


def load_data(job: RoleJob, tokenizer: Any) -> RoleData:
    """Every worker builds the same tokenised sets, then takes its shard of each epoch."""
    cfg = job.cfg
    train_rows, eval_rows = split_rows(cfg, job.drop)
    packed = cfg.solver_examples == "packed"
    form = cfg.decomposer_form
    examples, built = build_examples(train_rows, job.role, packed=packed, decomposer_form=form)
    mask = cfg.mask_calculator_results
    train = tokenize_examples(examples, tokenizer, cfg.max_length, mask_calculator_results=mask)
    if not len(train):
        raise ValueError(
            f"{job.role}: no trainable examples in {cfg.data} "
            f"({train.dropped} longer than --max-length {cfg.max_length})"
        )
    held = None
    if eval_rows:
        held = tokenize_examples(
            build_examples(eval_rows, job.role, packed=packed, decomposer_form=form)[0],
            tokenizer,
            cfg.max_length,
            mask_calculator_results=mask,
            check_boundaries=0,  # the training set's check speaks for the tokenizer
        )
        if not len(held):
            raise ValueError(f"{job.role}: the held-out problems give no eval examples")
    return RoleData(
        train,
        held,
        len({r["id"] for r in train_rows}),
        len({r["id"] for r in eval_rows}),
        built.skipped,
        run_fingerprint(cfg, job.role, train_rows, tokenizer, train=train),
    )


def micro_batches(
    lengths: list[int], cfg: TrainConfig, rank: int, world: int, skip: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(epoch, example indices) for this rank, epoch after epoch, forever; the first `skip`
    (what a checkpoint already trained on) are passed over."""
    epoch, seen = 0, 0
    while True:
        order = batches(
            lengths,
            cfg.micro_batch_size,
            seed=cfg.seed,
            epoch=epoch,
            group_by_length=cfg.group_by_length,
        )
        for b in shard(order, rank, world):
            seen += 1
            if seen > skip:
                yield epoch, b
        epoch += 1


def steps_per_epoch(n_batches: int, world: int, grad_accum: int) -> int:
    per_rank = max(1, n_batches // world) if n_batches >= world else 1
    return max(1, per_rank // grad_accum)


def eval_batches(data: TokenizedSet, cfg: TrainConfig, pad_id: int, rank: int, world: int):
    """This rank's collated eval batches (fixed order) and how many of them count."""
    order = batches(data.lengths, cfg.micro_batch_size, seed=cfg.seed, epoch=0)
    mine, counted = eval_share(len(order), rank, world)
    return [collate([data[i] for i in order[j]], pad_id) for j in mine], counted


def load_tokenizer(base_model: str) -> Any:
    """The student's tokenizer as training uses it: a missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- what a run trains on -------------------------------------------------------------------------

# The row columns `trainers.data` formats a role's examples from, and the problem id that the
# hold-out split and the data order key on. Bookkeeping columns (costs, attempts, cache keys)
# cannot change what a student learns, and a column added to the schema later must not make
# every old checkpoint look stale.
DATA_COLUMNS = ("id", "sample", "question", "answer", "steps", "style", "raw")
# Digits, operators, a calculator span, spaces, newlines and non-ASCII: tokenizers that share a
# vocabulary but split text differently (other merges, pre-tokenizer or normalizer) differ here.
TOKENIZER_PROBE = (
    "Q1: How many clips did Natalia sell in May?\nA1: 48 / 2 = <<48/2=24>>24 clips.\n"
    "  3.5% of $1,250 is 43.75 -- naïve café ÷ 7 ≈ 6\tend\n\n"
)
# Fingerprint keys, in the order a refusal lists them, with the option a user would change.
FINGERPRINT_FIELDS = {
    "role": "role (--roles)",
    "data": "training data (--data; and --eval-fraction / --eval-data, which take problems out)",
    "max_length": "--max-length",
    "solver_examples": "solver form (--solver-examples)",
    "decomposer_form": "decomposer form (--decomposer-form)",
    "mask_calculator_results": "--mask-calculator-results",
    "tokenizer": "tokenizer (--base-model)",
}


def data_fingerprint(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Row count and a sha256 over the training rows' `DATA_COLUMNS`, in order.

    Content, not file names, sizes or times: a re-annotated or extended data set with the same
    paths changes it, a copy of the same Parquet elsewhere does not. Order counts, since the
    data order maps steps to example indices. Costs one JSON dump per row: 0.08 s for GSM8K's
    7 473 train rows on this 2-core machine (the sequences' hash: 0.1 s for 1.8M tokens).
    """
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.get(c) for c in DATA_COLUMNS], sort_keys=True, default=str,
                            ensure_ascii=False).encode())  # fmt: skip
        h.update(b"\n")
    return {"rows": len(rows), "sha256": h.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Name, size and a sha256 over the vocabulary (added tokens included), EOS and the ids of
    `TOKENIZER_PROBE`. Two tokenizers are the same when size and hash are: the name is shown,
    not compared, so a model dir that moved still resumes."""
    vocab = sorted(tokenizer.get_vocab().items())
    probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    blob = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "probe": list(probe)})
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "sha256": hashlib.sha256(blob.encode()).hexdigest(),
    }


def sequences_fingerprint(data: TokenizedSet) -> dict[str, Any]:
    """Count and sha256 of the token ids and labels training steps draw from."""
    h = hashlib.sha256()
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(array("q", ids).tobytes())
        h.update(array("q", labels).tobytes())
    return {"count": len(data), "sha256": h.hexdigest()}


def run_fingerprint(
    cfg: TrainConfig,
    role: str,
    train_rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    train: TokenizedSet | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint of `role` was trained on: `FINGERPRINT_FIELDS`, plus, on a worker
    (`train` given), the hash of the token sequences themselves, which also catches what the
    named fields cannot (a change in `socratic.formats` or in the tokenising code). The solver
    form is recorded for the roles whose data depends on it: the solver, and the decomposer in
    `--decomposer-form iterative` (packed alike), which also records its form (None for "all",
    as before the option existed, so older checkpoints still resume). `data` reuses a
    `data_fingerprint` already computed for the same rows."""
    parts = roles_of(role)
    iterative = "decomposer" in parts and cfg.decomposer_form == "iterative"
    fp: dict[str, Any] = {
        "version": 1,
        "role": role,
        "data": data or data_fingerprint(train_rows),
        "max_length": cfg.max_length,
        "solver_examples": cfg.solver_examples if "solver" in parts or iterative else None,
        "decomposer_form": "iterative" if iterative else None,
        "mask_calculator_results": cfg.mask_calculator_results,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if train is not None:
        fp["sequences"] = sequences_fingerprint(train)
    return fp


def _show(key: str, value: Any) -> str:
    if not isinstance(value, dict):
        return repr(value)
    if key == "data":
        return f"{value.get('rows')} rows, sha256 {str(value.get('sha256'))[:12]}"
    if key == "tokenizer":
        return (
            f"{value.get('name')} ({value.get('vocab_size')} tokens, "
            f"sha256 {str(value.get('sha256'))[:12]})"
        )
    return f"{value.get('count')} sequences, sha256 {str(value.get('sha256'))[:12]}"


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per field of `now` that differs from `saved` (checkpoint -> now). Keys `now`
    lacks are not compared (the driver has no token sequences). The sequences are named only
    when no field explains them."""
    changes = []
    for key, label in FINGERPRINT_FIELDS.items():
        if key not in now:
            continue
        old, new = saved.get(key), now[key]
        if key == "tokenizer":
            differs = not isinstance(old, dict) or any(
                old.get(k) != new.get(k) for k in ("vocab_size", "sha256")
            )
        elif key == "data":
            differs = not isinstance(old, dict) or old.get("sha256") != new.get("sha256")
        else:
            differs = old != new
        if differs:
            changes.append(f"{label}: {_show(key, old)} -> {_show(key, new)}")
    if not changes and "sequences" in now and saved.get("sequences") != now["sequences"]:
        changes.append(
            f"token sequences: {_show('sequences', saved.get('sequences') or {})} -> "
            f"{_show('sequences', now['sequences'])} (data, --max-length, solver form and "
            "tokenizer are unchanged: the text formats or the tokenising code changed)"
        )
    return changes


def check_fingerprint(
    saved: dict[str, Any] | None, now: dict[str, Any], name: str, *, warn: bool = True
) -> None:
    """Refuse to resume checkpoint `name` (fingerprint `saved`) into a run whose fingerprint is
    `now` if anything it trained on changed; a checkpoint written before fingerprints existed
    (`saved` None) resumes, with a warning when `warn`."""
    if saved is None:
        if warn:
            log.warning(
                "checkpoint %s has no %s (written before fingerprints): resuming without "
                "checking that its data, --max-length, solver form and tokenizer are this run's",
                name, FINGERPRINT_FILE,
            )  # fmt: skip
        return
    changes = fingerprint_changes(saved, now)
    if changes:
        raise CheckpointError(
            f"checkpoint {name} was trained on something else; changed since "
            "(checkpoint -> now):\n  " + "\n  ".join(changes) + "\nResume with the settings "
            "and data it was written with, or start a fresh run: without --resume-from, under "
            "a new --run-name or --storage-path (Ray Train resumes a run name's own checkpoints)"
        )


# --- engine ---------------------------------------------------------------------------------------


def load_model(cfg: TrainConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The base model, loaded straight into ZeRO-3 partitions under stage 3.

    An `HfDeepSpeedConfig` alive during `from_pretrained` makes transformers load inside
    `deepspeed.zero.Init`, so no rank ever holds the whole model (a GPT-2-large student would
    otherwise sit whole on every GPU first). Returns (model, that config object), which the
    caller keeps alive until `deepspeed.initialize` (transformers reads it through a weakref).
    """
    import torch
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed
        import torch.distributed as dist
        from transformers.integrations import HfDeepSpeedConfig

        # DeepSpeed's config reads the world size from deepspeed.comm: wrap Ray's group first.
        deepspeed.init_distributed(
            dist_backend=dist.get_backend() if dist.is_initialized() else None
        )
        keep_alive = HfDeepSpeedConfig(ds_config)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training
    return model, keep_alive


def build_engine(job: RoleJob, plan: DevicePlan, world: int, total_steps: int):
    """(DeepSpeed engine, LR scheduler) for the role, from the driver's DeepSpeed JSON."""
    import deepspeed

    ds_config = job.cfg.deepspeed_config(
        world_size=world, total_steps=total_steps, on_gpu=plan.on_gpu, base=job.deepspeed
    )
    model, keep_alive = load_model(job.cfg, ds_config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        dist_init_required=False,
    )  # fmt: skip
    del keep_alive
    return engine, scheduler


# --- resume ---------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0
    resumed_from: int = 0
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0: every log line


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _data_order(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What fixes which micro-batch a step trains on; a resume must match it exactly."""
    return {
        "seed": cfg.seed,
        "world": world,
        "micro_batch_size": cfg.micro_batch_size,
        "grad_accum": cfg.grad_accum,
        "group_by_length": cfg.group_by_length,
    }


def missing_files(d: str | Path, world: int) -> list[str]:
    """Files a checkpoint's manifests list (one manifest per rank) that are not in `d`."""
    d = Path(d)
    missing = []
    for rank in range(world):
        manifest = d / "manifest" / f"rank{rank}.json"
        if not manifest.is_file():
            missing.append(str(manifest.relative_to(d)))
            continue
        for rel, size in json.loads(manifest.read_text()).items():
            f = d / rel
            if not f.is_file() or f.stat().st_size != size:
                missing.append(rel)
    return missing


def check_checkpoint(path: str) -> None:
    """On the driver: a local `--resume-from` that cannot load fails before any worker starts."""
    if "://" in path:
        return  # checked by the workers, which read it through Ray Train's storage
    d = Path(path)
    if not (d / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {path}: no {STATE_FILE}; not written by this loop")
    world = json.loads((d / STATE_FILE).read_text()).get("data_order", {}).get("world", 1)
    missing = missing_files(d, world)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {len(missing)} file(s) missing or cut short, "
            f"e.g. {', '.join(missing[:4])}"
        )


def resume(
    engine: Any,
    checkpoint: Any,
    cfg: TrainConfig,
    rank: int,
    world: int,
    fingerprint: dict[str, Any] | None = None,
) -> TrainState:
    """Load `checkpoint` (a `ray.train.Checkpoint`) or fail with a message that names it.

    DeepSpeed's `load_checkpoint` returns (None, None) when it finds nothing and quietly keeps
    the fresh optimizer when shards are missing; a run would then restart from the base weights
    at step N. So every file each rank wrote is checked against its manifest first. Nor does
    it know what the weights were trained on: with `fingerprint` (this run's `run_fingerprint`)
    a checkpoint whose data, `max_length`, solver form or tokenizer differ is refused
    (`check_fingerprint`).
    """
    if checkpoint is None:
        return TrainState()
    name = checkpoint.path
    with checkpoint.as_directory() as d:
        state_file = Path(d) / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"checkpoint {name}: no {STATE_FILE}; not written by this loop")
        state = json.loads(state_file.read_text())
        want, got = _data_order(cfg, world), state.get("data_order", {})
        if got != want:
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            raise CheckpointError(
                f"checkpoint {name} was written with a different data order or world "
                f"(checkpoint vs now: {diff}); resume with the same settings"
            )
        if fingerprint is not None:
            fp_file = Path(d) / FINGERPRINT_FILE
            saved = json.loads(fp_file.read_text()) if fp_file.is_file() else None
            check_fingerprint(saved, fingerprint, name, warn=rank == 0)
        missing = missing_files(d, world)
        if missing:
            raise CheckpointError(
                f"checkpoint {name} is incomplete: {len(missing)} file(s) missing or cut short, "
                f"e.g. {', '.join(missing[:4])}"
            )
        load_path, _ = engine.load_checkpoint(d, tag=state["tag"])
        if load_path is None:
            raise CheckpointError(f"checkpoint {name}: DeepSpeed found no {state['tag']} in it")
        import torch

        _set_rng_state(torch.load(Path(d) / "rng" / f"rank{rank}.pt", weights_only=False))
        history_file = Path(d) / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
    step = state["step"]
    log.info("resumed from checkpoint %s at step %d", name, step)
    return TrainState(step, step, state.get("tokens", 0), history)


# --- step, log, checkpoint ------------------------------------------------------------------------


@dataclass
class Meter:
    """What the steps since the last log line did on this rank."""

    steps: int = 0
    loss: float = 0.0
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)

    def add(self, s: StepStats) -> None:
        self.steps, self.loss, self.tokens = (
            self.steps + 1,
            self.loss + s.loss,
            self.tokens + s.tokens,
        )


def log_metrics(engine: Any, scheduler: Any, meter: Meter, state: TrainState, cfg: TrainConfig):
    """The step's metrics, summed over ranks (on the engine's device) since the last log."""
    loss, tokens = all_reduce_sum([meter.loss, meter.tokens], engine.device)
    state.tokens += int(tokens)
    norm = engine.get_global_grad_norm()
    return {
        "loss": loss / max(meter.steps, 1),
        "lr": scheduler.get_last_lr()[0] if scheduler else cfg.lr,
        "tokens_per_s": tokens / max(time.perf_counter() - meter.since, 1e-9),
        "grad_norm": float(norm) if norm is not None else float("nan"),
        "tokens": state.tokens,
    }


def save_and_report(
    engine: Any,
    state: TrainState,
    metrics: dict,
    job: RoleJob,
    world: int,
    fingerprint: dict[str, Any] | None = None,
):
    """Every rank writes its ZeRO shards, RNG state and file manifest to a local dir; Ray Train
    merges the ranks' dirs in storage. Rank 0 adds the state, history and `fingerprint`."""
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    tag = f"step{state.step}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=tag)
        (Path(d) / "rng").mkdir()
        torch.save(_rng_state(), Path(d) / "rng" / f"rank{rank}.pt")
        if rank == 0:
            Path(d, STATE_FILE).write_text(json.dumps({
                "step": state.step, "tag": tag, "tokens": state.tokens,
                "data_order": _data_order(job.cfg, world),
            }))  # fmt: skip
            Path(d, HISTORY_FILE).write_text(json.dumps(state.history))
            if fingerprint is not None:
                Path(d, FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1))
        files = {str(f.relative_to(d)): f.stat().st_size for f in Path(d).rglob("*") if f.is_file()}
        (Path(d) / "manifest").mkdir()
        Path(d, "manifest", f"rank{rank}.json").write_text(json.dumps(files))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _due(step: int, every: int | None, last: bool) -> bool:
    return last or bool(every) and step % every == 0


# --- the worker -----------------------------------------------------------------------------------


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import deepspeed
    import numpy as np
    import ray.train
    import torch

    from trainers.tracking import Tracker, open_tracker

    job: RoleJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = device_plan(cfg, job.role)
    if plan.on_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"{job.role}: use_gpu is set but this worker's torch sees no GPU")
    if not plan.on_gpu:
        # Plain gloo: the shared-memory comm op costs a ~30 s JIT compile on a fresh machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {job.role}[{rank}] %(message)s")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data.
    tokenizer = load_tokenizer(cfg.base_model)
    data = load_data(job, tokenizer)
    epoch0 = batches(
        data.train.lengths, cfg.micro_batch_size, seed=cfg.seed, epoch=0,
        group_by_length=cfg.group_by_length,
    )  # fmt: skip
    total_steps = cfg.max_steps or steps_per_epoch(len(epoch0), world, cfg.grad_accum) * cfg.epochs

    # Engine, then resume (after everything that draws random numbers at start-up).
    engine, scheduler = build_engine(job, plan, world, total_steps)
    device = engine.device
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint(cfg.resume_from)
    state = resume(engine, checkpoint, cfg, rank, world, data.fingerprint)
    held, counted = (
        eval_batches(data.eval, cfg, tokenizer.pad_token_id, rank, world) if data.eval else ([], 0)
    )
    if rank == 0:
        log.info(
            "%s: %d examples from %d problems (%d truncated, %d dropped, %d unbuildable), "
            "eval %d examples from %d problems, %d steps, world %d, padding %.1f%%",
            job.role, len(data.train), data.train_problems, data.train.truncated,
            data.train.dropped, data.unbuildable, len(data.eval or ()), data.eval_problems,
            total_steps, world, 100 * padding_fraction(data.train.lengths, epoch0),
        )  # fmt: skip
    tracker: Tracker = Tracker()
    if rank == 0:
        tracker = open_tracker(
            cfg.tracker, log_dir=job.log_dir or "tensorboard",
            run_name=f"{cfg.run_name}-{job.role}", params={**asdict(cfg), "role": job.role},
        )  # fmt: skip

    micro = micro_batches(data.train.lengths, cfg, rank, world, skip=state.step * cfg.grad_accum)
    positions_limit = absolute_positions(engine.module.config)
    meter, epoch, last = Meter(), 0, state.step >= total_steps
    t_start = time.perf_counter()
    while not last:
        # Step.
        group = []
        for _ in range(cfg.grad_accum):
            epoch, idx = next(micro)
            batch = collate([data.train[i] for i in idx], tokenizer.pad_token_id)
            drawn = train_position_ids(batch["attention_mask"], cfg.train_positions,
                                       cfg.position_factor, positions_limit,
                                       cfg.position_share)  # fmt: skip
            if drawn is not None:
                batch["position_ids"] = drawn
            group.append(batch)
        meter.add(train_step(engine, group, device))
        state.step += 1
        last = state.step >= total_steps
        checkpoint_now = _due(state.step, cfg.checkpoint_every, last)

        # Log, and evaluate (at every checkpoint too, so `--export best` can rank them).
        metrics: dict[str, Any] = {}
        if _due(state.step, cfg.log_every, checkpoint_now):
            metrics.update(log_metrics(engine, scheduler, meter, state, cfg))
            meter = Meter()
        if held and _due(state.step, cfg.eval_every, checkpoint_now):
            metrics["eval_loss"] = evaluate(engine, held, device, counted)
        if metrics:
            point = {"step": state.step, **metrics}
            state.history.append(point)
            tracker.log({k: v for k, v in metrics.items() if k != "tokens"}, state.step)
            if rank == 0:
                log.info("step %d/%d %s", state.step, total_steps, _fmt(metrics))
            metrics.update(role=job.role, step=state.step, epoch=epoch,
                           resumed_from_step=state.resumed_from)  # fmt: skip

        # Checkpoint.
        if checkpoint_now:
            metrics["train_s"] = time.perf_counter() - t_start
            tracker.sync()
            save_and_report(engine, state, metrics, job, world, data.fingerprint)
        elif metrics:
            ray.train.report(metrics)
    tracker.close()


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )
