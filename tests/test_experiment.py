"""`socratic-distill run experiment.yaml`: one file runs annotate -> train -> evaluate, resumably.

Parsing is checked without Ray: each section is validated by its stage's own config class (a
typo names the section and the key), paths are wired from one stage to the next, `--dry-run`
prints the plan. One end-to-end run on the bundled sample (gold annotation, tiny student, two
training steps per role, a two-problem evaluation) is then run again, where every stage must be
skipped and the table printed again, and once more with the evaluation deleted, where only the
evaluation may run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.experiment import SERVE_OPTIONS, ExperimentError, load_experiment, main
from tests.support.paths import REPO

SAMPLE = REPO / "pipelines" / "experiments" / "sample.yaml"


def _write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


def _base(tmp_path: Path, **sections) -> dict:
    data = {
        "output_dir": str(tmp_path / "out"),
        "annotate": {"dataset": "sample", "mode": "gold"},
        "train": {"base_model": "gpt2"},
        "evaluate": {"limit": 2},
    }
    data.update(sections)
    return data


# --- parsing (no Ray) ----------------------------------------------------------------------------


def test_unknown_key_names_the_section_and_the_key(tmp_path: Path, capsys) -> None:
    f = _write(tmp_path, _base(tmp_path, train={"base_model": "gpt2", "max_step": 3}))
    with pytest.raises(ExperimentError, match=r"exp\.yaml: train: unknown train option max_step "
                       r"\(did you mean max_steps\?\) \(TrainConfig takes: "):  # fmt: skip
        load_experiment(f)
    assert main([str(f), "--dry-run"]) == 2
    assert "train: unknown train option max_step" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_dri": "x"}, r"unknown top-level keys output_dri \(did you mean output_dir\?\)"),
        ({"evaluate": {"calculator": "maybe"}}, r"evaluate: evaluate\.calculator: 'maybe' is not"),
        ({"evaluate": {"limit": "two"}}, r"evaluate: evaluate\.limit: expected int"),
        ({"annotate": {"dataset": "sample", "address": "auto"}}, r"annotate: address: set it once"),
        ({"stages": ["annotate", "trian"]}, r"stages: unknown trian"),
        ({"serve": {"prot": 1}}, r"serve: unknown serve option prot \(did you mean port\?\)"),
        ({"train": {"lr": 0.1}}, r"train: base_model must be set"),
        ({"train": {"base_model": "gpt2", "config": "nope.yaml"}}, r"config: no file nope\.yaml"),
    ],
)
def test_errors_name_what_is_wrong(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        load_experiment(_write(tmp_path, _base(tmp_path, **change)))


def test_a_config_files_unknown_key_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("max_length: 64\nbogus: 1\n")
    data = _base(tmp_path, train={"base_model": "gpt2", "config": "t.yaml"})
    with pytest.raises(ExperimentError, match=r"t\.yaml: unknown train option bogus"):
        load_experiment(_write(tmp_path, data))


def test_paths_are_wired_from_stage_to_stage(tmp_path: Path) -> None:
    data = _base(
        tmp_path,
        train={"config": "trainers/configs/cpu_tiny.yaml", "base_model": "gpt2", "lr": 0.01},
        serve={"port": 8123},
    )
    data["annotate"]["seed"] = 3
    exp = load_experiment(_write(tmp_path, data), ["train.max_steps=3", "evaluate.split=dev"])
    out = str(tmp_path / "out")
    assert exp.stages == ("annotate", "train", "evaluate", "serve")  # serve: it has a section
    assert exp.annotate.output == f"{out}/annotations"
    assert exp.train.data == exp.annotate.output
    # The stage's own YAML (cpu_tiny) < our wiring (its `output` is replaced) < the section.
    assert (exp.train.output, exp.train.storage_path) == (f"{out}/students", f"{out}/ray_results")
    assert (exp.train.max_length, exp.train.lr, exp.train.max_steps) == (384, 0.01, 3)
    assert exp.train.explicit("lr") and exp.train.explicit("max_length")
    assert exp.train.explicit("output") is None  # wired, not the user's
    assert exp.evaluate.models == exp.train.output
    assert (exp.evaluate.dataset, exp.evaluate.split, exp.evaluate.limit) == ("sample", "dev", 2)
    assert exp.evaluate.seed == 3  # a dataset option of annotate's; `split`, `limit` are not
    assert exp.evaluate.output == f"{out}/eval"
    assert exp.serve["decomposer"] == f"{out}/students/decomposer" and exp.serve["port"] == 8123
    assert exp.manifest == f"{out}/experiment.json"


def test_evaluate_naming_another_dataset_takes_nothing_from_annotate(tmp_path: Path) -> None:
    data = _base(tmp_path, evaluate={"dataset": "arith", "dataset_config": "ops=1-1"})
    data["annotate"]["path"] = str(tmp_path / "mine.jsonl")
    exp = load_experiment(_write(tmp_path, data), stages="evaluate")
    assert exp.stages == ("evaluate",)
    assert (exp.evaluate.dataset, exp.evaluate.path) == ("arith", None)


def test_the_shipped_sample_parses_and_ships() -> None:
    exp = load_experiment(SAMPLE)
    assert exp.stages == ("annotate", "train", "evaluate")
    assert exp.annotate.mode == "gold" and exp.train.max_steps == 20  # from cpu_tiny.yaml
    assert exp.evaluate.calculator == "on"
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "experiments/*.yaml" in data["package-data"]["pipelines"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys) -> None:
    f = _write(tmp_path, _base(tmp_path, serve={}))
    assert main([str(f), "--dry-run", "--stages", "train,evaluate,serve"]) == 0
    out = capsys.readouterr().out
    students = tmp_path / "out" / "students"
    assert "== annotate" not in out
    assert "== train: would run (not run yet)" in out
    assert f'data: "{tmp_path / "out" / "annotations"}"' in out
    assert f'models: "{students}"' in out and f"output: {tmp_path / 'out' / 'eval'}" in out
    assert f"socratic-distill serve --decomposer {students}/decomposer" in out
    assert not (tmp_path / "out").exists()


def test_a_failed_stage_is_recorded_and_resumed_next_time(tmp_path: Path, capsys) -> None:
    data = _base(tmp_path, train={"base_model": "gpt2", "data": str(tmp_path / "none")})
    f = _write(tmp_path, data)
    assert main([str(f), "--stages", "train"]) == 2
    err = capsys.readouterr().err
    assert "error: train failed: " in err and "rerun the same command to resume" in err
    record = json.loads((tmp_path / "out" / "experiment.json").read_text())["stages"]["train"]
    assert record["status"] == "failed" and record["error"]
    assert main([str(f), "--stages", "train", "--dry-run"]) == 0
    assert "== train: would run (resuming: its last run ended failed)" in capsys.readouterr().out


def test_cli_runs_the_experiment_command(capsys) -> None:
    assert cli.COMMANDS["run"][0] == "pipelines.experiment"
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: socratic-distill run ") and "SECTION.KEY=VALUE" in out


def test_serve_options_are_the_serve_commands_flags(capsys) -> None:
    from serve import app

    with pytest.raises(SystemExit):
        app.main(["--help"])
    flags = set(re.findall(r"--([a-z][a-z-]+)", capsys.readouterr().out)) - {"help"}
    assert {k.replace("_", "-") for k in SERVE_OPTIONS} | {"address"} == flags


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_then_skipped_then_only_evaluate(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    data = {
        "output_dir": str(out),
        "annotate": {"dataset": "sample", "split": "train", "mode": "gold", "limit": 8},
        "train": {
            "config": "trainers/configs/cpu_tiny.yaml", "base_model": str(tiny_model_dir),
            "max_length": 256, "max_steps": 2, "checkpoint_every": 2, "warmup_steps": 1,
            "tracker": "none",
        },
        "evaluate": {"limit": 2, "max_new_tokens": 8, "batch_size": 2},
    }  # fmt: skip
    f = _write(tmp_path, data)
    assert main([str(f)]) == 0
    first = capsys.readouterr().out
    manifest = json.loads((out / "experiment.json").read_text())
    assert {s: r["action"] for s, r in manifest["stages"].items()} == dict.fromkeys(
        ("annotate", "train", "evaluate"), "ran"
    )
    assert all(r["status"] == "done" and r["wall_s"] > 0 for r in manifest["stages"].values())
    for role in ("decomposer", "solver"):
        assert (out / "students" / role / "config.json").is_file()
        assert f"{out / 'students' / role}" in first  # where each artifact went
    assert f"predictions    {out / 'eval'}/predictions" in first
    table = first[first.index("== accuracy ==") :]
    assert "| Socratic, decomposer + solver | on |" in table

    # Again: every stage is skipped, and the table printed again from the evaluation's summary.
    assert main([str(f)]) == 0
    second = capsys.readouterr().out
    for stage in ("annotate", "train", "evaluate"):
        assert re.search(rf"\] {stage}: skipped, finished already", second), second
    assert second[second.index("== accuracy ==") :] == table

    # The evaluation deleted: only it runs again.
    shutil.rmtree(out / "eval")
    assert main([str(f)]) == 0
    third = capsys.readouterr().out
    manifest = json.loads((out / "experiment.json").read_text())
    actions = {s: r["action"] for s, r in manifest["stages"].items()}
    assert actions == {"annotate": "skipped", "train": "skipped", "evaluate": "ran"}, third
    assert manifest["stages"]["train"]["wall_s"] > 0  # a skipped stage keeps the time it took
    assert "train skipped (ran in " in third
    assert "| Socratic, decomposer + solver | on |" in third[third.index("== accuracy ==") :]

    # A training that stopped before the solver's export: only the solver runs again, and Ray
    # Train restores it from its last checkpoint (the same one is exported, no new one written);
    # the evaluation follows, as its students changed.
    provenance = out / "students" / "solver" / "provenance.json"
    checkpoint = json.loads(provenance.read_text())["checkpoint"]
    shutil.rmtree(out / "students" / "solver")
    assert main([str(f)]) == 0
    fourth = capsys.readouterr().out
    manifest = json.loads((out / "experiment.json").read_text())
    actions = {s: r["action"] for s, r in manifest["stages"].items()}
    assert actions == {"annotate": "skipped", "train": "ran", "evaluate": "ran"}, fourth
    assert "exported already: decomposer" in fourth
    assert json.loads(provenance.read_text())["checkpoint"] == checkpoint
