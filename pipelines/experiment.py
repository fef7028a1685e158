"""One experiment file: annotate -> train -> evaluate (-> serve), resumable, from one YAML.

    socratic-distill run experiment.yaml                     # every stage, or what is left
    socratic-distill run experiment.yaml --stages train,evaluate train.max_steps=200
    socratic-distill run experiment.yaml --dry-run           # the plan: configs, paths, skips
    python pipelines/experiment.py experiment.yaml           # the same, as `ray job submit` runs it
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python pipelines/experiment.py experiment.yaml output_dir=s3://bucket/run1

The file has a section per stage, each holding exactly the keys of that stage's own config (the
flags of `socratic-distill annotate|train|evaluate|serve`, underscores for dashes), checked by
that stage's own config class, so a typo is an error naming the section and the key:

    output_dir: outputs/gsm8k-run1   # annotations/, students/, ray_results/, eval/, experiment.json
    stages: [annotate, train, evaluate]          # default: these, plus serve if it has a section
    address: null                    # Ray address for every stage (default: RAY_ADDRESS or local)
    annotate: {dataset: gsm8k, split: train, model: gpt-4o-mini}
    train: {config: trainers/configs/gpu_gpt2_large.yaml, base_model: gpt2-large}
    evaluate: {methods: iterative, calculator: both}
    serve: {port: 8000}

`config: FILE.yaml` in a section is that stage's own `--config` file; the section's keys win over
it. Wiring, for each key a section leaves unset: annotate's `output` is `<output_dir>/annotations`
and becomes train's `data`; train's `output` is `<output_dir>/students` (checkpoints under
`<output_dir>/ray_results`) and becomes evaluate's `models` and serve's `decomposer`/`solver`;
evaluate writes `<output_dir>/eval` and takes annotate's dataset keys (`dataset`, `path`,
`dataset_config`, `hub_id`, `seed`, a custom dataset's fields, ...) unless it names another
dataset; its split stays `test`.
`SECTION.KEY=VALUE` arguments override the file (values read as YAML).

Resume: each stage is recognised as finished by its own completion artifact, and then skipped
with a line saying so: annotation's `summary.json` with no row missing and nothing stopped or
still running at the Batch API; training's exported `<role>/provenance.json` for every role
(written last by the export); evaluation's `summary.json` with every method and no problem
missing. A stage whose config changed since it finished (`experiment.json` keeps a digest of
each), or that follows a stage which ran now, runs again. An unfinished stage is simply run
again into the same output and resumes by its own mechanism: annotation skips the rows it has,
Ray Train restores each role from the latest checkpoint of the same `storage_path`/`run_name`
(a checkpoint trained on other data or `max_length` is refused by its fingerprint check), and
evaluation, which is cheap, redoes its methods. `<output_dir>/experiment.json` records each
stage's status, output and wall time.

On a cluster: the command is an ordinary Ray job entrypoint. Every stage joins the cluster in
`RAY_ADDRESS` (which `ray job submit` sets for the driver), or the top-level `address:`, through
`socratic.ray_address`. Give `output_dir` as an absolute path on shared storage or a URI: under
`--working-dir` a relative path lands in the job's temporary working directory on the head node.
A `serve` stage runs last and blocks, like `socratic-distill serve` (the command it runs is
printed first); leave it out of a job that should end.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import posixpath
import shlex
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/experiment.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs as pafs
import yaml

from pipelines.annotate_config import AnnotateConfig
from pipelines.evaluate import EvaluateConfig, results_markdown
from pipelines.evaluate import format_summary as format_evaluation
from pipelines.journal import absolute, output_fs
from socratic.config import EXPLICIT, ConfigError, coerce
from trainers.config import TrainConfig
from trainers.export import PROVENANCE_FILE

log = logging.getLogger("experiment")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("annotate", "train", "evaluate", "serve")
CONFIGS: dict[str, type] = {
    "annotate": AnnotateConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}
TOP_LEVEL = ("output_dir", "stages", "address", *STAGES)
# What evaluate takes from annotate: every option both configs have (the dataset options that
# `DatasetSpec.from_config` reads, custom-dataset fields included) but these, each stage's own.
STAGE_OWN = ("split", "limit", "output", "address", "force_unlock", "actors", "actor_cpus")
DATASET_KEYS = tuple(
    f.name
    for f in dataclasses.fields(AnnotateConfig)
    if f.name in {g.name for g in dataclasses.fields(EvaluateConfig)} and f.name not in STAGE_OWN
)
# The options of `socratic-distill serve` (serve/app.py `main`), typed for checking here rather
# than at the end of a long run; tests/test_experiment.py checks them against its --help.
SERVE_OPTIONS: dict[str, Any] = {
    "decomposer": str,
    "solver": str,
    "num_cpus": float,
    "host": str,
    "port": int,
    "max_new_tokens": int,
    "max_batch_size": int,
    "request_timeout_s": float,
    "no_calculator": bool,
    "answer_kind": str,
    "model_cpus": float,
    "num_gpus": float,
    "dtype": str,
    "ready_timeout_s": float,
    "decomposer_form": str,
}
MANIFEST = "experiment.json"


class ExperimentError(ValueError):
    """An experiment file that cannot run as written; the message names the file and key."""


class Unfinished(RuntimeError):
    """A stage returned without finishing (a spend cap, a stop, a dry run): later stages wait."""


class StageFailed(RuntimeError):
    """A stage raised; `error` is what it raised (recorded in the manifest before this)."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"{stage} failed: {error}")
        self.stage, self.error = stage, error


@dataclass(frozen=True)
class ExperimentConfig:
    """The stages of one experiment, each with its own resolved config and paths."""

    source: str
    output_dir: str  # absolute path or URI
    stages: tuple[str, ...]  # selected, in pipeline order
    annotate: AnnotateConfig | None = None
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    serve: dict[str, Any] | None = None  # `socratic-distill serve` options
    address: str | None = None

    @property
    def manifest(self) -> str:
        return posixpath.join(self.output_dir, MANIFEST)

    def output(self, stage: str) -> str | None:
        cfg = getattr(self, stage) if stage in CONFIGS else None
        return cfg.output if cfg else None

    def serve_argv(self) -> list[str]:
        """`socratic-distill serve` arguments for the trained students."""
        argv = []
        for key, value in (self.serve or {}).items():
            if isinstance(value, bool):
                argv += [f"--{key.replace('_', '-')}"] if value else []
            elif value is not None:
                argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv + (["--address", self.address] if self.address else [])


# --- reading the file ---------------------------------------------------------------------------


def load_experiment(
    path: str | Path, overrides: Sequence[str] = (), stages: str | None = None
) -> ExperimentConfig:
    """The experiment in `path`, with `SECTION.KEY=VALUE` overrides and a `--stages` subset.

    Raises `ExperimentError` naming the file, the section and the key of anything wrong."""
    src = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"{src}: cannot read the experiment: {e}") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{src}: expected a mapping with sections {', '.join(STAGES)}")
    for item in overrides:
        _override(data, item, src)
    unknown = sorted(map(str, set(data) - set(TOP_LEVEL)))
    if unknown:
        raise ExperimentError(
            f"{src}: unknown top-level keys {', '.join(unknown)}{_hint(unknown, TOP_LEVEL)} "
            f"(known: {', '.join(TOP_LEVEL)})"
        )
    sections: dict[str, dict[str, Any]] = {}
    for name in (n for n in STAGES if n in data):  # `serve:` with nothing under it counts
        raw = data[name] or {}
        if not isinstance(raw, dict):
            raise ExperimentError(f"{src}: {name}: expected a mapping of {name} options")
        sections[name] = dict(raw)
    selected = _stages(stages if stages is not None else data.get("stages"), sections, src)
    address = data.get("address")
    out = absolute(str(data.get("output_dir") or f"outputs/{Path(path).stem}"))

    # Each stage: its own `config:` file, then our wiring, then the section's keys.
    layers = {name: _layers(name, sections.get(name, {}), src) for name in STAGES}
    annotate_keys = {**layers["annotate"][0], **layers["annotate"][1]}
    wired: dict[str, dict[str, Any]] = {
        "annotate": {"output": posixpath.join(out, "annotations")},
        "train": {
            "output": posixpath.join(out, "students"),
            "storage_path": posixpath.join(out, "ray_results"),
        },
        "evaluate": {"output": posixpath.join(out, "eval")},
    }
    own = {name: {k: v for k, (v, _) in layers[name][1].items()} for name in STAGES}
    if "annotate" in sections:  # a section's own `output` wins over ours (ours over its file's)
        wired["train"]["data"] = own["annotate"].get("output", wired["annotate"]["output"])
    students = own["train"].get("output", wired["train"]["output"])
    wired["evaluate"]["models"] = students
    ev = {**layers["evaluate"][0], **layers["evaluate"][1]}
    if "dataset" not in ev or ev["dataset"][0] == annotate_keys.get("dataset", (None,))[0]:
        wired["evaluate"].update(  # build_stage keeps only the keys EvaluateConfig has
            {k: v[0] for k, v in annotate_keys.items() if k in DATASET_KEYS and k not in ev}
        )
    if address is not None:
        for name in CONFIGS:
            wired[name]["address"] = str(address)

    configs: dict[str, Any] = {}
    for name, cls in CONFIGS.items():
        if name in sections or name in selected:
            configs[name] = build_stage(cls, name, layers[name], wired[name], src)
    train = configs.get("train")
    if train and "://" not in train.deepspeed and not Path(train.deepspeed).is_absolute():
        # The shipped configs name `trainers/ds_zero2.json`: here, else in the package, from any
        # working dir (TrainConfig.with_absolute_paths resolves it against the working dir only).
        here, packaged = Path(train.deepspeed).resolve(), PACKAGE_ROOT / train.deepspeed
        ds = here if here.is_file() or not packaged.is_file() else packaged
        configs["train"] = replace(train, deepspeed=str(ds))
    serve = None
    if "serve" in sections or "serve" in selected:
        file_keys, keys = layers["serve"]
        values = {"decomposer": f"{students}/decomposer", "solver": f"{students}/solver"}
        values.update({k: v for k, (v, _) in {**file_keys, **keys}.items()})
        try:
            serve = {k: coerce(v, SERVE_OPTIONS[k], f"serve.{k}") for k, v in values.items()}
        except ConfigError as e:
            raise ExperimentError(f"{src}: {e}") from None
    return ExperimentConfig(
        source=str(Path(path).resolve()),
        output_dir=out,
        stages=selected,
        serve=serve,
        address=None if address is None else str(address),
        **configs,
    )


def _override(data: dict[str, Any], item: str, src: str) -> None:
    """`train.max_steps=50` or `output_dir=/data/run1` into `data` (the value read as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ExperimentError(f"override {item!r}: expected SECTION.KEY=VALUE or KEY=VALUE")
    value = yaml.safe_load(text) if text else None
    section, dot, name = key.partition(".")
    if not dot:
        data[key] = value
        return
    if section not in STAGES:
        raise ExperimentError(f"override {item!r}: no section {section!r} ({', '.join(STAGES)})")
    if not isinstance(data.get(section) or {}, dict):
        raise ExperimentError(f"{src}: {section}: expected a mapping of {section} options")
    data[section] = {**(data.get(section) or {}), name: value}


def _stages(value: Any, sections: dict[str, Any], src: str) -> tuple[str, ...]:
    if value is None:
        chosen = ["annotate", "train", "evaluate"] + (["serve"] if "serve" in sections else [])
    else:
        chosen = value.split(",") if isinstance(value, str) else value
        if not isinstance(chosen, list):
            raise ExperimentError(f"{src}: stages: expected a list of {', '.join(STAGES)}")
        chosen = [str(s).strip() for s in chosen if str(s).strip()]
    bad = [s for s in chosen if s not in STAGES]
    if bad or not chosen:
        raise ExperimentError(
            f"{src}: stages: unknown {', '.join(bad) or '(none given)'}; choose from "
            f"{', '.join(STAGES)}"
        )
    return tuple(s for s in STAGES if s in chosen)


def _layers(
    name: str, section: dict[str, Any], src: str
) -> tuple[dict[str, tuple[Any, str]], dict[str, tuple[Any, str]]]:
    """(the keys of the section's `config:` file, the section's own keys), each key mapped to
    (value, where it was set)."""
    section = dict(section)
    file_keys: dict[str, tuple[Any, str]] = {}
    config = section.pop("config", None)
    if config is not None:
        f = _find_config(str(config), src)
        try:
            loaded = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ExperimentError(f"{src}: {name}.config: cannot read {f}: {e}") from None
        if not isinstance(loaded, dict):
            raise ExperimentError(f"{f}: expected a mapping of {name} options")
        file_keys = {str(k): (v, str(f)) for k, v in loaded.items()}
    keys = {str(k): (v, f"{src}: {name}") for k, v in section.items()}
    for k, (_, where) in {**file_keys, **keys}.items():
        if k == "address":
            raise ExperimentError(
                f"{where}: address: set it once at the top level (`address:`): one experiment "
                "runs on one cluster"
            )
        if name == "serve" and k not in SERVE_OPTIONS:
            raise ExperimentError(
                f"{where}: unknown serve option {k}{_hint([k], SERVE_OPTIONS)} "
                f"(known: {', '.join(SERVE_OPTIONS)})"
            )
    return file_keys, keys


def _find_config(name: str, src: str) -> Path:
    """A section's `config:` file: as given, beside the experiment file, or in the package (the
    shipped `trainers/configs/*.yaml`, from a wheel too)."""
    for f in (Path(name), Path(src).parent / name, PACKAGE_ROOT / name):
        if f.is_file():
            return f
    raise ExperimentError(
        f"{src}: config: no file {name} (looked here, beside {src}, in the package)"
    )


def build_stage(
    cls: type, name: str, layers: tuple[dict, dict], wired: dict[str, Any], src: str
) -> Any:
    """`cls` (the stage's own config class) from its config file < wiring < section keys.

    Every key is checked as `parse_config` checks a stage's YAML: unknown keys, types (`coerce`)
    and `choices`, so a typo fails here, before any stage has run, naming section and key."""
    file_keys, keys = layers
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != EXPLICIT}
    hints = typing.get_type_hints(cls)
    given = {**file_keys, **keys}
    for key, (_, where) in given.items():
        if key not in fields:
            raise ExperimentError(
                f"{where}: unknown {name} option {key}{_hint([key], fields)} "
                f"({cls.__name__} takes: {', '.join(fields)})"
            )
    given.update({k: (v, "wiring") for k, v in wired.items() if k in fields and k not in keys})
    values: dict[str, Any] = {}
    for key, (raw, where) in given.items():
        try:
            value = coerce(raw, hints[key], f"{name}.{key}")
        except ConfigError as e:
            raise ExperimentError(f"{where}: {e}") from None
        choices = fields[key].metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ExperimentError(
                f"{where}: {name}.{key}: {value!r} is not one of {', '.join(map(str, choices))}"
            )
        values[key] = value
    missing = [k for k, f in fields.items() if _required(f) and k not in values]
    if missing:
        raise ExperimentError(f"{src}: {name}: {', '.join(missing)} must be set (no default)")
    if any(f.name == EXPLICIT for f in dataclasses.fields(cls)):
        values[EXPLICIT] = {k: where for k, (_, where) in given.items() if where != "wiring"}
    try:
        return cls(**values)
    except (ConfigError, TypeError, ValueError) as e:
        raise ExperimentError(f"{src}: {name}: {e}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _hint(keys: Sequence[str], known: Sequence[str]) -> str:
    close = [m for k in keys for m in difflib.get_close_matches(str(k), list(known), n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


# --- what is done -------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    fs, p = output_fs(path)
    try:
        with fs.open_input_stream(p) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: str, data: dict[str, Any]) -> None:
    fs, p = output_fs(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(data, indent=2, default=str).encode())


def _exists(path: str) -> bool:
    fs, p = output_fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def exported_roles(cfg: TrainConfig) -> list[str]:
    """Roles whose export finished (`provenance.json` is written after weights and tokenizer)."""
    return [r for r in cfg.role_list if _exists(posixpath.join(cfg.output, r, PROVENANCE_FILE))]


def completed(exp: ExperimentConfig, stage: str) -> str | None:
    """Why `stage` counts as finished, from its own completion artifact; None if it does not."""
    if stage == "annotate" and exp.annotate:
        s = _read_json(posixpath.join(exp.annotate.output, "summary.json"))
        pending = s is None or s.get("dry_run") or s.get("missing_rows") != 0 or s.get("stopped")
        if not pending and not (s.get("batches") or {}).get("still_running"):
            return f"summary.json: {s['rows']} rows, {s['accepted']} accepted, none missing"
    if stage == "train" and exp.train:
        roles = exported_roles(exp.train)
        if roles == exp.train.role_list:
            return f"exported {', '.join(roles)}"
    if stage == "evaluate" and exp.evaluate:
        s = _read_json(posixpath.join(exp.evaluate.output, "summary.json"))
        if s and isinstance(s.get("results"), list):
            done = {r["method"] for r in s["results"] if not r.get("missing")}
            if set(exp.evaluate.method_list) <= done:
                return f"summary.json: {', '.join(exp.evaluate.method_list)} on {s['problems']}"
    return None


def digest(cfg: Any) -> str:
    """A short hash of a stage's resolved config, to notice a config changed since its run."""
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg or {})
    d.pop(EXPLICIT, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def decide(
    exp: ExperimentConfig, stage: str, manifest: dict[str, Any], upstream_ran: bool
) -> tuple[bool, str]:
    """(skip?, why) for `stage`. Skipped only when its artifact says finished, it was not left
    unfinished since (a killed rerun can leave an older run's summary behind), its config is the
    one that finished, and no earlier stage ran in this invocation (its output may differ)."""
    record = manifest.get("stages", {}).get(stage, {})
    if record.get("status") in ("running", "failed", "interrupted"):
        return False, f"resuming: its last run ended {record['status']}"
    done = completed(exp, stage)
    if done is None:
        return False, "its output is missing or incomplete" if record else "not run yet"
    if record.get("config") not in (None, digest(getattr(exp, stage))):
        return False, "its config changed since it finished"
    if upstream_ran:
        return False, "an earlier stage ran now"
    return True, done


# --- running ------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_annotate(exp: ExperimentConfig, say: Callable[[str], None]) -> bool:
    from pipelines import annotate

    summary = annotate.run(exp.annotate)
    if summary.get("dry_run"):
        raise Unfinished("annotate.dry_run is set: the estimate above, nothing annotated")
    say(annotate.format_summary(summary))
    if summary.get("missing_rows") or summary.get("stopped"):
        raise Unfinished(
            f"annotation ended with {summary['missing_rows']} rows missing "
            f"({summary.get('stopped') or 'see above'}); rerun to resume"
        )
    return bool(summary.get("written_this_run"))


def _run_train(exp: ExperimentConfig, say: Callable[[str], None], everything: bool) -> bool:
    from trainers import train

    cfg = exp.train
    done = [] if everything else exported_roles(cfg)
    pending = [r for r in cfg.role_list if r not in done]
    if done:
        say(f"exported already: {', '.join(done)}")
    runs = [train.run_dir(cfg, r) for r in pending if _exists(train.run_dir(cfg, r))]
    if runs:
        say(
            f"Ray Train resumes from the latest checkpoint in {', '.join(runs)}; one trained on "
            "other data or max_length is refused: delete it, or set train.run_name, to start over"
        )
    for r in train.run(replace(cfg, roles=",".join(pending))):
        loss = f", final loss {r['final_loss']:.4f}" if r.get("final_loss") is not None else ""
        step = r.get("resumed_from_step")
        resumed = f", resumed from step {step}" if step else ""
        say(f"{r['role']}: {r.get('steps')} steps{loss}{resumed} -> {r['export']}")
    return True


def _run_evaluate(exp: ExperimentConfig, say: Callable[[str], None]) -> bool:
    from pipelines import evaluate

    say(format_evaluation(evaluate.run(exp.evaluate)))
    return True


def run(exp: ExperimentConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected stages in order, skipping finished ones; returns the manifest (also
    `<output_dir>/experiment.json`) with the evaluation summary under `evaluation`."""
    manifest = _read_json(exp.manifest) or {}
    manifest.update(
        experiment=exp.source, output_dir=exp.output_dir, stages=manifest.get("stages", {})
    )
    upstream_ran = False
    steps = [s for s in ("annotate", "train", "evaluate") if s in exp.stages]
    for k, stage in enumerate(steps, 1):
        skip, why = decide(exp, stage, manifest, upstream_ran)
        record = manifest["stages"].get(stage, {})
        output = exp.output(stage)
        if skip:
            say(f"== [{k}/{len(steps)}] {stage}: skipped, finished already ({why}) -> {output}")
            manifest["stages"][stage] = {**record, "status": "done", "action": "skipped",
                                         "output": output, "at": _now()}  # fmt: skip
            _write_json(exp.manifest, manifest)
            continue
        say(f"\n== [{k}/{len(steps)}] {stage} ({why}) -> {output} ==")
        entry = {"status": "running", "action": "ran", "output": output,
                 "config": digest(getattr(exp, stage)), "at": _now()}  # fmt: skip
        manifest["stages"][stage] = entry
        _write_json(exp.manifest, manifest)
        t0 = time.perf_counter()
        try:
            if stage == "annotate":
                changed = _run_annotate(exp, say)
            elif stage == "train":  # a finished run to redo: every role, else the unexported
                changed = _run_train(exp, say, everything=completed(exp, stage) is not None)
            else:
                changed = _run_evaluate(exp, say)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            entry.update(status=status, error=str(e) or type(e).__name__,
                         wall_s=round(time.perf_counter() - t0, 1), at=_now())  # fmt: skip
            _write_json(exp.manifest, manifest)
            if isinstance(e, Exception):
                raise StageFailed(stage, e) from e
            raise
        entry.update(status="done", wall_s=round(time.perf_counter() - t0, 1), at=_now())
        _write_json(exp.manifest, manifest)
        say(f"-- {stage} done in {entry['wall_s']} s")
        upstream_ran = upstream_ran or changed
    if exp.evaluate:
        manifest["evaluation"] = _read_json(posixpath.join(exp.evaluate.output, "summary.json"))
    return manifest


def format_report(exp: ExperimentConfig, manifest: dict[str, Any]) -> str:
    """Where every artifact is, then the accuracy table (evaluate's own formatter)."""
    lines = ["", "== where everything is =="]
    if exp.annotate:
        lines.append(f"  annotations    {exp.annotate.output}  (summary.json)")
    if exp.train:
        lines += [f"  {r:<14} {exp.train.output}/{r}" for r in exp.train.role_list]
        lines.append(f"  checkpoints    {exp.train.storage_path}")
    if exp.evaluate:
        out = exp.evaluate.output
        lines.append(f"  predictions    {out}/predictions  (table: {out}/results.md)")
    lines.append(f"  manifest       {exp.manifest}")
    times = []
    for stage, r in manifest["stages"].items():
        took = f"{r.get('wall_s', '?')} s"
        times.append(f"{stage} " + (f"skipped (ran in {took})" if r.get("action") == "skipped"
                                    else f"{r.get('status')} in {took}"))  # fmt: skip
    lines.append("  stages         " + "; ".join(times))
    evaluation = manifest.get("evaluation")
    if evaluation:
        lines += ["", "== accuracy ==", results_markdown(evaluation)]
    elif exp.evaluate:
        lines += ["", f"no evaluation yet at {exp.evaluate.output}"]
    return "\n".join(lines)


def format_plan(exp: ExperimentConfig) -> str:
    """`--dry-run`: each selected stage's resolved config and paths, and whether it would run."""
    manifest = _read_json(exp.manifest) or {}
    lines = [f"experiment {exp.source} -> {exp.output_dir} (manifest: {exp.manifest})"]
    upstream = False
    for stage in exp.stages:
        if stage == "serve":
            lines += ["", "== serve: would start, blocking: " + serve_command(exp)]
            continue
        skip, why = decide(exp, stage, manifest, upstream)
        upstream = upstream or not skip
        verdict = f"would skip, finished already ({why})" if skip else f"would run ({why})"
        lines += ["", f"== {stage}: {verdict}", f"  output: {exp.output(stage)}"]
        cfg = getattr(exp, stage)
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        for key, value in dataclasses.asdict(cfg).items():
            if key not in (EXPLICIT, "output") and value != defaults[key]:
                lines.append(f"  {key}: {json.dumps(value, default=str)}")
    return "\n".join(lines)


def serve_command(exp: ExperimentConfig) -> str:
    return shlex.join(["socratic-distill", "serve", *exp.serve_argv()])


def start_serve(exp: ExperimentConfig) -> int:
    """Serve the trained pair with `socratic-distill serve`'s own `main`; blocks until Ctrl-C.

    The stages' Ray connection is closed first: serve's `main` makes its own, to the same
    address (a fresh local cluster when there is none)."""
    import ray

    from serve import app

    if ray.is_initialized():
        ray.shutdown()
    return app.main(exp.serve_argv())


def known_errors() -> tuple[type[BaseException], ...]:
    """What a stage raises for a user to act on: printed as one line, not a traceback."""
    from pipelines.output_lock import OutputLocked
    from pipelines.spend import SpendRefused
    from pipelines.teacher_client import FatalTeacherError
    from socratic.ray_address import RayAddressError

    return (FileNotFoundError, ValueError, OutputLocked, SpendRefused, FatalTeacherError,
            RayAddressError, Unfinished)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run annotate -> train -> evaluate (-> serve) from one experiment YAML, "
        "skipping finished stages and resuming interrupted ones.",
        epilog="Sections hold each stage's own options (`socratic-distill STAGE --help`); see "
        "pipelines/experiments/sample.yaml.",
    )
    p.add_argument("experiment", type=Path, help="experiment YAML")
    p.add_argument(
        "overrides", nargs="*", metavar="SECTION.KEY=VALUE",
        help="override the file, e.g. train.max_steps=50 output_dir=/data/run1",
    )  # fmt: skip
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        exp = load_experiment(a.experiment, a.overrides, a.stages)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(format_plan(exp))
        return 0
    try:
        manifest = run(exp, _say)
    except StageFailed as e:
        if not isinstance(e.error, known_errors()):
            raise
        print(
            f"error: {e}\nrerun the same command to resume: finished stages are skipped "
            f"(recorded in {exp.manifest})",
            file=sys.stderr,
        )
        return 2
    _say(format_report(exp, manifest))
    if "serve" in exp.stages:
        _say(f"\n== serve: {serve_command(exp)}")
        return start_serve(exp)
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    # Through the importable module, as the other stages do: Ray ships nothing from `__main__`.
    from pipelines.experiment import main as _main

    sys.exit(_main())
