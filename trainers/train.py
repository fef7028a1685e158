"""Train the Socratic students on a Ray cluster: one Ray Train + DeepSpeed run per role.

    python trainers/train.py --config trainers/configs/cpu_tiny.yaml
    ray job submit --working-dir . -- \
        python trainers/train.py --config trainers/configs/gpu_gpt2_large.yaml

The decomposer and the solver (and any baseline in `--roles`) train at the same time as separate
`TorchTrainer` runs sharing the cluster, each with its own scaling config; `--sequential` runs
them one after another for clusters too small to hold both. Each run checkpoints to
`--storage-path`, recovers from worker failures from its latest checkpoint, and is exported at
the end to a plain Hugging Face dir under `--output/<role>`.

Before anything starts, the driver drops the training problems that share a 13-gram with the
problems the students will be evaluated on (`--decontaminate`, `decontamination`), and the
count goes into each role's summary and `provenance.json`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python trainers/train.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from socratic.adapters import LOCAL_SUFFIXES, DatasetSpec, load_problems
from socratic.config import parse_config
from socratic.decontaminate import (
    NgramIndex,
    Report,
    auto_eval_specs,
    decontaminate,
    problems_from_file,
)
from socratic.records import Problem
from trainers.config import TrainConfig, roles_of
from trainers.data import build_examples, read_accepted
from trainers.export import FINGERPRINT_FILE, copy_export, export_to, provenance
from trainers.loop import (
    RoleJob,
    check_checkpoint,
    check_fingerprint,
    data_fingerprint,
    device_plan,
    load_tokenizer,
    run_fingerprint,
    split_rows,
    train_worker,
)
from trainers.tracking import check_tracker

log = logging.getLogger("train")


def check_config(cfg: TrainConfig) -> None:
    """Settings that only make sense together, checked before anything starts."""
    if cfg.export == "best" and not (cfg.eval_fraction or cfg.eval_data):
        raise ValueError(
            "--export best ranks checkpoints by eval loss: give --eval-fraction or --eval-data"
        )
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise ValueError(f"--eval-every must be at least 1; got {cfg.eval_every}")
    check_tracker(cfg.tracker)
    if cfg.resume_from:
        check_checkpoint(cfg.resume_from)
    check_decontaminate(cfg.decontaminate)


def check_decontaminate(setting: str) -> None:
    """A `--decontaminate FILE` that is not there (or of a type nobody reads) fails here, with
    its path, before the data is read; one without question texts fails in `decontamination`."""
    if setting in ("auto", "off"):
        return
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(
            f"--decontaminate: no such file {path.resolve()} (give auto, off, or a problems file)"
        )
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(
            f"--decontaminate: {path} is not one of {', '.join(LOCAL_SUFFIXES)} (a problems file)"
        )


def decontamination(
    cfg: TrainConfig,
    rows: Sequence[Mapping[str, Any]],
    load: Callable[[DatasetSpec], Iterable[Problem]] = load_problems,
) -> Report:
    """On the driver, before the data goes to any worker: which training problems share a
    13-gram with the evaluation problems (`socratic.decontaminate`); `split_rows` drops them.

    `--decontaminate auto` takes the evaluation set from the rows' own `dataset` column: each
    family is evaluated on its test split (`socratic.decontaminate.EVAL_SPLITS`), loaded as
    `pipelines/evaluate.py` loads it by default (the hub, through `load`). A set that cannot be
    loaded (offline, no `datasets`) or a family with no known test split is skipped with a
    warning that says so: auto must never fail a run that trained before it existed, nor pass
    for checked what was not. `off` checks nothing; a FILE is read with
    `socratic.adapters.read_local` and must give question texts. Dropping every problem is an
    error: the data then is the evaluation set, and `off` is how to train on it anyway.
    """
    setting = cfg.decontaminate
    problems = [(str(r["id"]), str(r["question"])) for r in rows]
    skipped: list[str] = []
    if setting == "off":
        report = _unchecked(problems, "nothing (--decontaminate off)", ["--decontaminate off"])
        log.info("decontamination: off; %d training problems not checked", report.checked)
        return report
    if setting != "auto":
        evals, name = problems_from_file(setting), setting
    else:
        specs, skipped = auto_eval_specs(str(r["dataset"]) for r in rows)
        evals, names = [], []
        for spec in specs:
            label = f"{spec.name}/{spec.split}"
            log.info("decontamination: loading %s, the evaluation set of this data", label)
            try:
                evals += _eval_problems(spec, load)
                names.append(label)
            except Exception as e:  # the hub unreachable, `datasets` missing, a bad cache, ...
                skipped.append(f"{label}: could not be loaded ({type(e).__name__}: {e})")
        for note in skipped:
            log.warning(
                "decontamination skipped for %s; give --decontaminate FILE (a local copy of the "
                "evaluation problems) to check, or --decontaminate off to say it is not wanted",
                note,
            )
        if not names:
            return _unchecked(problems, "nothing (no evaluation set loaded)", skipped)
        name = ", ".join(names)
    report = decontaminate(problems, NgramIndex(evals, name=name))
    report.skipped = skipped
    log.info(report.line())
    for pid, m in list(report.matches.items())[:5]:
        log.info("  e.g. %s ~ %s: %r", pid, m.eval_id, m.ngram)
    if report.checked and report.dropped == report.checked:
        raise ValueError(
            f"{report.line()}: every training problem is an evaluation problem; "
            "--decontaminate off trains on them anyway"
        )
    return report


# (family, split) -> its (id, question)s, or why they could not be loaded: once per process.
# Several runs in one process (pipelines/quality.py) then load an evaluation set once, and an
# unreachable hub costs its ~24 s of retries once, not once per run.
_EVAL_SETS: dict[tuple[str, str], list[tuple[str, str]] | Exception] = {}


def _eval_problems(
    spec: DatasetSpec, load: Callable[[DatasetSpec], Iterable[Problem]]
) -> list[tuple[str, str]]:
    if load is not load_problems:  # a caller's own loader: its business
        return [(p.id, p.question) for p in load(spec)]
    key = (spec.name, spec.split)
    if key not in _EVAL_SETS:
        try:
            _EVAL_SETS[key] = [(p.id, p.question) for p in load(spec)]
        except Exception as e:
            _EVAL_SETS[key] = e
    got = _EVAL_SETS[key]
    if isinstance(got, Exception):
        raise got
    return got


def _unchecked(problems: Sequence[tuple[str, str]], what: str, skipped: list[str]) -> Report:
    return Report(what, checked=len({pid for pid, _ in problems}), skipped=skipped)


def decontamination_summary(cfg: TrainConfig, report: Report) -> dict[str, Any]:
    """What goes into each role's summary and `provenance.json`."""
    return {"setting": cfg.decontaminate, **report.summary()}


def check_data(
    cfg: TrainConfig, drop: frozenset[str] = frozenset(), rows: list[dict] | None = None
) -> dict[str, int]:
    """Fail before any worker starts if the data cannot train every role (names the path), or
    differs from what a local `--resume-from` checkpoint was trained on (`check_resume`).
    `drop` and `rows` as in `split_rows`."""
    rows, held = split_rows(cfg, drop, rows)
    counts = {}
    for role in cfg.role_list:
        examples, _ = build_examples(rows, role)
        if not examples:
            raise ValueError(f"{cfg.data}: the {len(rows)} accepted rows give no {role} examples")
        counts[role] = len(examples)
        if held and not build_examples(held, role)[0]:
            raise ValueError(f"the {len(held)} held-out rows give no {role} eval examples")
    if held:
        n_held = len({r["id"] for r in held})
        log.info(
            "eval loss on %d held-out problems (%d train)", n_held, len({r["id"] for r in rows})
        )
    check_resume(cfg, rows)
    return counts


def check_resume(cfg: TrainConfig, rows: list[dict[str, Any]]) -> None:
    """On the driver: a local `--resume-from` trained on other data, `--max-length`, solver form
    or tokenizer (for any of the roles) fails before any worker starts. Workers check again,
    the token sequences too, and for URIs and Ray Train's own restores (`trainers.loop.resume`).
    """
    if not cfg.resume_from or "://" in cfg.resume_from:
        return
    f = Path(cfg.resume_from) / FINGERPRINT_FILE
    if not f.is_file():
        return  # an older checkpoint: the workers resume it with a warning
    saved = json.loads(f.read_text())
    tokenizer, data = load_tokenizer(cfg.base_model), data_fingerprint(rows)
    for role in cfg.role_list:
        now = run_fingerprint(cfg, role, rows, tokenizer, data=data)
        check_fingerprint(saved, now, cfg.resume_from)


def run_dir(cfg: TrainConfig, role: str) -> str:
    """The role's Ray Train run folder in storage (a path or a URI)."""
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}-{role}"


def fit_role(job: RoleJob) -> dict[str, Any]:
    """One role's Ray Train run. Runs inside a zero-CPU Ray task, so it only trains: the export
    happens on the driver, where `--output` means what the user meant."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, scaling = job.cfg, job.cfg.scaling_for(job.role)
    ranked = {}
    if cfg.export == "best":  # Ray keeps the best two by eval loss, and always the latest
        ranked = dict(checkpoint_score_attribute="eval_loss", checkpoint_score_order="min")
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=device_plan(cfg, job.role).backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.run_name}-{job.role}",
            storage_path=cfg.storage_path,  # absolute: run() resolved it
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, **ranked),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.role}: training ended without a checkpoint ({result.error})")
    chosen, chosen_metrics = result.checkpoint, result.metrics or {}
    if cfg.export == "best" and result.best_checkpoints:
        chosen, chosen_metrics = min(
            result.best_checkpoints, key=lambda cm: cm[1].get("eval_loss", float("inf"))
        )
    m = result.metrics or {}
    return {
        "role": job.role,
        "steps": m.get("step"),
        "tokens": m.get("tokens"),
        "final_loss": m.get("loss"),
        "eval_loss": m.get("eval_loss"),
        "train_s": round(m.get("train_s", time.perf_counter() - t0), 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "resumed_from_step": m.get("resumed_from_step", 0),
        "workers": scaling.num_workers,
        "checkpoint": result.checkpoint.path,
        "export_checkpoint": chosen,
        "export_metrics": dict(chosen_metrics),
    }


def export_role(job: RoleJob, fitted: dict[str, Any]) -> dict[str, Any]:
    """On the driver: consolidate the chosen checkpoint into `--output/<role>` (path or URI),
    once per role of a shared student (`decomposer+solver`: the same weights in
    `--output/decomposer` and `--output/solver`, each with its role's provenance, so
    evaluation and Serve load them as the two students they expect; consolidated once, then
    copied). `export` is the first dir, `exports` every role's."""
    cfg = job.cfg
    checkpoint = fitted.pop("export_checkpoint")
    metrics = fitted.pop("export_metrics")
    fitted["exports"] = {}
    with checkpoint.as_directory() as d:
        for role in roles_of(job.role):
            record = provenance(
                role=role, config=asdict(cfg), deepspeed=job.deepspeed,
                checkpoint=checkpoint.path, metrics=metrics, export=cfg.export,
            )  # fmt: skip
            record["student"] = job.role  # the roles these weights were trained on
            if "decontamination" in fitted:
                record["decontamination"] = fitted["decontamination"]
            out = f"{cfg.output.rstrip('/')}/{role}"
            first = next(iter(fitted["exports"].values()), None)
            fitted["exports"][role] = (
                copy_export(first, out, record) if first
                else export_to(d, cfg.base_model, out, record)
            )  # fmt: skip
    fitted["export"] = next(iter(fitted["exports"].values()))
    fitted["exported_step"] = metrics.get("step")
    return fitted


def _absolute(paths: str | None) -> str | None:
    """Local paths of a comma-separated list made absolute (URIs kept), as `--data` is."""
    if not paths:
        return paths
    return ",".join(
        p if "://" in p else str(Path(p).resolve()) for p in (x.strip() for x in paths.split(","))
    )


def prepare(cfg: TrainConfig) -> tuple[list[RoleJob], dict[str, Any]]:
    """Everything `run` does before Ray starts: paths made absolute, every check, the
    decontamination; one `RoleJob` per role (carrying the dropped problem ids), and the
    decontamination summary that goes into each role's summary and `provenance.json`."""
    cfg = cfg.with_absolute_paths()
    cfg = replace(cfg, eval_data=_absolute(cfg.eval_data), resume_from=_absolute(cfg.resume_from))
    if cfg.decontaminate not in ("auto", "off"):
        cfg = replace(cfg, decontaminate=str(Path(cfg.decontaminate).resolve()))
    check_config(cfg)
    deepspeed = cfg.read_deepspeed()
    rows = read_accepted(cfg.data_paths)
    report = decontamination(cfg, rows)
    drop = frozenset(report.matches)
    counts = check_data(cfg, drop, rows)
    log.info("examples per role: %s", counts)
    jobs = [
        RoleJob(cfg, role, deepspeed, log_dir=f"{run_dir(cfg, role)}/tensorboard", drop=drop)
        for role in cfg.role_list
    ]
    return jobs, decontamination_summary(cfg, report)


def run(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train every role in `cfg.roles`, then export each on this driver; one summary per role."""
    import ray

    jobs, decontaminated = prepare(cfg)
    cfg = jobs[0].cfg
    if not ray.is_initialized():
        from socratic.ray_address import resolve_address

        ray.init(address=resolve_address(cfg.address), configure_logging=False)
    # The wrapper holds no CPU: a wrapper holding one would starve its own training workers.
    remote_fit = ray.remote(num_cpus=0)(fit_role)
    if cfg.sequential:
        fitted = [ray.get(remote_fit.remote(job)) for job in jobs]
    else:
        fitted = ray.get([remote_fit.remote(job) for job in jobs])
    for f in fitted:
        f["decontamination"] = decontaminated
    return [export_role(job, f) for job, f in zip(jobs, fitted, strict=True)]


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{r['role']}: {r['steps']} steps, {r['tokens']} tokens, {r['train_s']} s training "
        f"({r['wall_s']} s with start-up), final loss {r['final_loss']:.4f}"
        + (f", eval loss {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "")
        + (f", resumed from step {r['resumed_from_step']}" if r["resumed_from_step"] else "")
        + f" -> {', '.join(r['exports'].values())}"
        for r in results
    ]
    decon = next((r["decontamination"] for r in results if r.get("decontamination")), None)
    if decon:  # one run, one decontamination: said once, before the roles
        skipped = f"; not checked: {'; '.join(decon['skipped'])}" if decon["skipped"] else ""
        lines.insert(0, (
            f"decontamination ({decon['setting']}): dropped {decon['dropped']} of "
            f"{decon['checked']} training problems sharing a {decon['ngram']}-gram with "
            f"{decon['eval_set']}{skipped}"
        ))  # fmt: skip
    return "\n".join(lines)


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
