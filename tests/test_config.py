"""Typed configs from YAML and flags: flags win, unknown keys and bad values are clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from socratic.config import ConfigError, build_parser, coerce, option, parse_config


@dataclass(frozen=True)
class Demo:
    """A demo config."""

    name: str = option(help="a required name")
    steps: int = option(10, help="how many")
    lr: float | None = option(None, help="learning rate")
    fast: bool = option(False, help="go fast")
    mode: str = option("a", help="which", choices=("a", "b"))


def test_flags_and_defaults() -> None:
    cfg = parse_config(Demo, ["--name", "x", "--steps", "3", "--lr", "0.5", "--fast"])
    assert cfg == Demo(name="x", steps=3, lr=0.5, fast=True, mode="a")
    assert parse_config(Demo, ["--name", "y"]) == Demo(name="y")


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: from-yaml\nsteps: 7\nfast: true\n")
    assert parse_config(Demo, ["--config", str(path)]) == Demo("from-yaml", 7, None, True)
    assert parse_config(Demo, ["--config", str(path), "--steps", "9", "--no-fast"]).steps == 9


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nstpes: 7\n")
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--config", str(path)])
    assert "unknown options stpes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Demo, [])
    assert "name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--name", "x", "--mode", "c"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--help"])
    out = capsys.readouterr().out
    for flag in ("--name", "--steps", "--lr", "--fast", "--mode", "--config", "how many"):
        assert flag in out


# --- typed YAML values ---------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return ["--config", str(path)]


def test_yaml_values_take_their_field_types(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads `2e-5` as a string and `"no"` stays a truthy string."""
    cfg = parse_config(Demo, _yaml(tmp_path, "name: x\nsteps: 4.0\nlr: 2e-5\nfast: 'no'\n"))
    assert (cfg.steps, cfg.lr, cfg.fast) == (4, 2e-05, False)
    assert type(cfg.steps) is int and type(cfg.lr) is float
    for word, want in [("yes", True), ("on", True), ("'1'", True), ("off", False), ("0", False)]:
        assert parse_config(Demo, _yaml(tmp_path, f"name: x\nfast: {word}\n")).fast is want
    cfg = parse_config(Demo, _yaml(tmp_path, "name: 2024\nlr: 3\n"))
    assert (cfg.name, cfg.lr) == ("2024", 3.0) and type(cfg.lr) is float


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("steps: 2.5", "steps: expected int, got 2.5"),
        ("steps: '2.5'", "steps: expected int"),
        ("lr: fast", "lr: expected float, got 'fast'"),
        ("fast: maybe", "fast: expected bool"),
        ("fast: 2", "fast: expected bool"),
        ("fast: 1.0", "fast: expected bool"),
        ("steps: true", "steps: expected int, got True"),
        ("name: [a, b]", "name: expected str"),
        ("name: 1.5", "name: expected str"),
        ("steps: ~", "steps: expected int, got null"),
        ("mode: c", "mode: 'c' is not one of a, b"),
    ],
)
def test_yaml_values_that_do_not_fit_name_file_key_and_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    args = _yaml(tmp_path, f"name: x\n{line}\n")
    with pytest.raises(SystemExit):
        parse_config(Demo, args)
    err = capsys.readouterr().err
    assert f"{args[1]}: {message}" in err


def test_coerce_containers() -> None:
    assert coerce(["1", 2.0], list[int], "k") == [1, 2]
    assert coerce({"a": "1e3"}, dict[str, float], "k") == {"a": 1000.0}
    assert coerce(None, int | None, "k") is None
    with pytest.raises(ConfigError, match=r"k\[1\]: expected int"):
        coerce([1, 2.5], list[int], "k")
    with pytest.raises(ConfigError, match=r"k\.b: expected float"):
        coerce({"b": "x"}, dict[str, float], "k")


def test_explicit_options_record_who_set_what(tmp_path: Path) -> None:
    @dataclass(frozen=True)
    class WithExplicit:
        a: int = option(1)
        b: int = option(2)
        c: int = option(3)
        explicit_options: dict[str, str] | None = option(None, cli=False)

    args = _yaml(tmp_path, "a: 5\nb: 6\n")
    cfg = parse_config(WithExplicit, [*args, "--b", "7"])
    assert (cfg.a, cfg.b, cfg.c) == (5, 7, 3)
    assert cfg.explicit_options == {"a": args[1], "b": "flag"}
    assert "--explicit-options" not in build_parser(WithExplicit).format_help()
    with pytest.raises(SystemExit):  # not a user option
        parse_config(WithExplicit, _yaml(tmp_path, "explicit_options: {a: flag}\n"))


SCRIPTS = [
    ("pipelines.annotate", "AnnotateConfig", {"dataset": "gsm8k", "output": "o"}),
    ("pipelines.evaluate", "EvaluateConfig", {"dataset": "gsm8k"}),
    ("pipelines.demo", "DemoConfig", {}),
    ("trainers.config", "TrainConfig", {"data": "d", "base_model": "m"}),
]


@pytest.mark.parametrize(("module", "name", "required"), SCRIPTS)
def test_every_script_config_is_typed_from_yaml(
    tmp_path: Path, module: str, name: str, required: dict[str, str]
) -> None:
    """Every script's config class goes through `parse_config`: each number and bool field,
    written the way YAML 1.1 misreads it, arrives with its field's type."""
    import dataclasses
    import importlib
    import typing

    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls)
    lines, want = [f"{k}: {v}" for k, v in required.items()], {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in required or f.metadata.get("cli") is False or "choices" in f.metadata:
            continue
        if tp in (float, float | None):
            lines.append(f"{f.name}: '{f.default if f.default is not None else 2.0:e}'")
            want[f.name] = float(f.default if f.default is not None else 2.0)
        elif tp in (int, int | None):
            value = f.default if f.default is not None else 3
            lines.append(f"{f.name}: {float(value)}")
            want[f.name] = value
        elif tp is bool:
            lines.append(f"{f.name}: '{'yes' if f.default else 'no'}'")
            want[f.name] = bool(f.default)
    assert want, f"{name} has no number or bool options to check"
    cfg = parse_config(cls, _yaml(tmp_path, "\n".join(lines) + "\n"))
    got = {k: getattr(cfg, k) for k in want}
    assert got == want
    assert all(type(got[k]) is type(want[k]) for k in want)


# --- TrainConfig: role_scaling and the DeepSpeed JSON --------------------------------------------

TRAIN = ["--data", "d", "--base-model", "m"]


def test_role_scaling_overrides_are_typed(tmp_path: Path) -> None:
    from trainers.config import TrainConfig

    args = _yaml(
        tmp_path,
        "use_gpu: 'yes'\nrole_scaling:\n  solver: {num_workers: '4', use_gpu: 'no', "
        "cpus_per_worker: 2, resources: {worker: '1e-2'}}\n",
    )
    cfg = parse_config(TrainConfig, [*args, *TRAIN])
    solver, decomposer = cfg.scaling_for("solver"), cfg.scaling_for("decomposer")
    assert (solver.num_workers, solver.use_gpu, solver.cpus_per_worker) == (4, False, 2.0)
    assert solver.resources == {"worker": 0.01} and decomposer.use_gpu is True
    assert "GPU" not in solver.resources_per_worker()


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ("solver: {num_wokers: 4}", "role_scaling.solver: unknown Scaling keys num_wokers"),
        ("solver: {num_workers: 2.5}", "role_scaling.solver.num_workers: expected int, got 2.5"),
        ("solver: {use_gpu: maybe}", "role_scaling.solver.use_gpu: expected bool"),
        ("solver: [1, 2]", "role_scaling.solver: expected a mapping"),
        ("solvr: {num_workers: 1}", "role_scaling: unknown roles solvr"),
    ],
)
def test_role_scaling_errors_name_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scaling: str, message: str
) -> None:
    from trainers.config import TrainConfig

    args = _yaml(tmp_path, f"role_scaling:\n  {scaling}\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, [*args, *TRAIN])
    assert f"{args[1]}: {message}" in capsys.readouterr().err


USER_DS = {
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999]}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 50}},
    "gradient_clipping": 0.5,
    "bf16": {"enabled": "auto"},
    "train_batch_size": 64,
}


def test_deepspeed_json_values_are_respected_and_reported(tmp_path: Path) -> None:
    """The user's optimizer, schedule and clipping stay; gaps are filled from our config; batch
    sizes are ours (they must match the data loader); and each key says where it came from."""
    from trainers.config import TrainConfig

    cfg = parse_config(TrainConfig, TRAIN)
    ds, src = cfg.deepspeed_plan(world_size=2, total_steps=10, on_gpu=False, base=USER_DS)
    assert ds["optimizer"]["params"] == {
        "lr": 3e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "torch_adam": True,
    }  # fmt: skip
    assert ds["scheduler"] == {
        "type": "WarmupLR",
        "params": {
            "warmup_num_steps": 50, "warmup_min_lr": 0.0, "warmup_max_lr": 5e-5,
            "warmup_type": "linear",
        },
    }  # fmt: skip
    assert (ds["gradient_clipping"], ds["bf16"], ds["zero_optimization"]) == (
        0.5, {"enabled": False}, {"stage": 3},
    )  # fmt: skip
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (8, 4)
    assert src["optimizer.params.lr"] == src["gradient_clipping"] == "json"
    assert src["scheduler.params.warmup_num_steps"] == "json"
    assert src["optimizer.params.weight_decay"] == "--weight-decay (default)"
    assert "overrides the JSON's 64" in src["train_batch_size"]
    assert cfg.deepspeed_config(world_size=2, total_steps=10, on_gpu=False, base=USER_DS) == ds
    assert USER_DS["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999]}  # not mutated


def test_options_the_user_set_win_over_the_json_and_say_so(tmp_path: Path) -> None:
    from trainers.config import TrainConfig

    args = _yaml(tmp_path, "grad_clip: 2\n")
    cfg = parse_config(TrainConfig, [*args, *TRAIN, "--lr", "1e-5", "--warmup-steps", "5"])
    ds, src = cfg.deepspeed_plan(world_size=1, total_steps=10, on_gpu=True, base=USER_DS)
    assert ds["optimizer"]["params"]["lr"] == 1e-5
    assert ds["optimizer"]["params"]["torch_adam"] is False  # GPU: DeepSpeed's fused Adam
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5
    assert ds["gradient_clipping"] == 2.0
    assert src["optimizer.params.lr"] == "--lr (set by flag); overrides the JSON's 0.0003"
    assert src["gradient_clipping"] == f"--grad-clip (set by {args[1]}); overrides the JSON's 0.5"


def test_without_optimizer_or_schedule_in_the_json_ours_are_used() -> None:
    """The bundled ZeRO JSONs hold only the ZeRO section: CPU runs get torch's AdamW."""
    from trainers.config import TRAINERS_DIR, TrainConfig

    cfg = parse_config(TrainConfig, [*TRAIN, "--deepspeed", str(TRAINERS_DIR / "ds_zero2.json")])
    ds, src = cfg.deepspeed_plan(world_size=2, total_steps=10, on_gpu=False)
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"betas": [0.9, 0.95], "eps": 1e-8, "lr": 5e-5, "weight_decay": 0.0,
                   "torch_adam": True},
    }  # fmt: skip
    assert ds["scheduler"]["params"]["total_num_steps"] == 10
    assert src["optimizer.type"].startswith("ours") and src["zero_optimization.stage"] == "json"


def test_solver_examples_default_to_packed(tmp_path: Path, capsys) -> None:
    from trainers.config import TrainConfig

    assert parse_config(TrainConfig, TRAIN).solver_examples == "packed"
    cfg = parse_config(TrainConfig, [*TRAIN, "--solver-examples", "per-example"])
    assert cfg.solver_examples == "per-example"
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, [*_yaml(tmp_path, "solver_examples: both\n"), *TRAIN])
    assert "solver_examples: 'both' is not one of packed, per-example" in capsys.readouterr().err


def test_the_driver_reports_deepspeed_sources_when_it_reads_the_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`train.py`'s `run()` reads the JSON once on the driver: that is where the report shows."""
    import json
    import logging

    from trainers.config import TrainConfig

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(USER_DS))
    cfg = parse_config(TrainConfig, [*TRAIN, "--deepspeed", str(path), "--lr", "1e-5"])
    with caplog.at_level(logging.INFO, logger="trainers"):
        assert cfg.read_deepspeed() == USER_DS
    report = caplog.text
    assert f"DeepSpeed settings by source ({path})" in report
    assert "optimizer.params.lr" in report and "overrides the JSON's 0.0003" in report
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        cfg.read_deepspeed()
