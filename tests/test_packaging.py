"""Installed like any package: the wheel holds every file a stage reads, and its one command works.

The wheel is built from a copy of the checkout (as from a clean one: no build/, egg-info or
outputs), and must carry every non-Python file of the packages (the playground page, the
DeepSpeed JSONs, the run configs, the prompts, the bundled sample). It is then installed into a
new venv and run from a directory that is not the checkout: `socratic-distill --help`, every
subcommand's `--help`, and one real stage (`annotate --mode gold`, on a fresh local Ray cluster).

Installing torch, Ray and the rest into a new venv costs gigabytes and minutes, so the new venv
borrows them: a `.pth` file names this interpreter's site-packages as a plain path. A plain path
line runs none of the `.pth` files there, so the checkout's editable install (`make install`'s
`-e`) stays out; the test checks that `pipelines`, `serve`, ... are the wheel's copies anyway.
The annotation run has torch, transformers, DeepSpeed and the rest of the extras blocked, as in
a base install (`pip install socratic-distill`, no extras).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from pipelines import cli
from tests.support.paths import REPO

PACKAGES = ("socratic", "pipelines", "trainers", "serve")
# Checkout-only files under the packages: documentation, not read at run time.
NOT_SHIPPED = {"README.md"}
# What a clean checkout does not have (.gitignore) or the wheel never needs.
COPY_IGNORE = (
    ".git", ".venv", "outputs", "shared", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".hypothesis", ".ruff_cache", "*.parquet",
)  # fmt: skip
HEAVY = ("torch", "transformers", "deepspeed", "ray", "accelerate", "fastapi")
# What only the extras install: annotation must run without any of it.
EXTRAS_ONLY = ("torch", "transformers", "deepspeed", "accelerate", "tensorboardX", "matplotlib")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus what could put the checkout (or another cluster) in reach."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


# --- the command, in the checkout (fast) -----------------------------------------------------


def test_help_lists_every_subcommand_without_importing_a_stage() -> None:
    code = (
        "import sys\nfrom pipelines import cli\nrc = cli.main(['--help'])\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out, out
    assert out.strip().splitlines()[-1] == "[] 0", "`--help` imported a stage's dependencies"


def test_errors_and_every_subcommand_implemented(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["nonsense"]) == 2
    assert "unknown subcommand 'nonsense'" in capsys.readouterr().err
    assert all(module for module, _ in cli.COMMANDS.values())
    # `run` is implemented (pipelines/experiment.py): a missing file is its own error, exit 2.
    assert cli.main(["run", "no-such-experiment.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no-such-experiment.yaml: cannot read the experiment" in err and "#23" not in err


def test_subcommand_help_is_the_stages_own(capsys: pytest.CaptureFixture[str]) -> None:
    argv0 = sys.argv
    assert cli.main(["annotate", "--help"]) == 0
    assert sys.argv is argv0  # restored
    out = capsys.readouterr().out
    assert out.startswith("usage: socratic-distill annotate ") and "--mode" in out
    assert cli.main(["annotate", "--no-such-flag"]) == 2
    assert "socratic-distill annotate: error: unrecognized arguments" in capsys.readouterr().err


def test_scripts_still_run_directly() -> None:
    """`python pipelines/annotate.py ...`, as `ray job submit` runs it, is unchanged."""
    for script in ("pipelines/annotate.py", "pipelines/cli.py"):
        out = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
            env=_clean_env(), check=True,
        ).stdout  # fmt: skip
        assert out.startswith("usage: "), out


# --- pyproject: dependencies and extras ------------------------------------------------------


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip().lower()


def test_base_install_is_annotation_only_and_floors_hold() -> None:
    project = _pyproject()["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert not base & {"torch", "transformers", "deepspeed", "accelerate"}, base
    extras = project["optional-dependencies"]
    assert set(extras["all"]) == {"socratic-distill[train,serve,eval]"}
    for extra in ("train", "serve", "eval"):
        assert {"torch", "transformers"} <= {_name(r) for r in extras[extra]}, extra
    assert "deepspeed" in {_name(r) for r in extras["train"]}
    # `from_pretrained(..., dtype=...)`: the keyword exists from transformers 4.56 on.
    every = [r for reqs in [project["dependencies"], *extras.values()] for r in reqs]
    floors = [r for r in every if _name(r) == "transformers"]
    assert floors and all(r.endswith(">=4.56") for r in floors), floors
    assert project["scripts"] == {"socratic-distill": "pipelines.cli:main"}


# --- the wheel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the checkout without build leftovers."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(tmp / "dist"), str(src)],
        check=True, capture_output=True, text=True, env=_clean_env(),
    )  # fmt: skip
    (whl,) = (tmp / "dist").glob("socratic_distill-*.whl")
    return whl


def test_wheel_holds_every_file_the_packages_read(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = Parser().parsestr(z.read(f"{info}/METADATA").decode())
    assert {n.split("/")[0] for n in names} == {*PACKAGES, info}  # no tests/, cluster/, ...
    wanted = {
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")
        and p.name not in NOT_SHIPPED and p.suffix != ".parquet"
    }  # fmt: skip
    assert {
        "serve/static/index.html", "trainers/ds_zero2.json", "trainers/ds_zero3.json",
        "trainers/configs/cpu_tiny.yaml", "pipelines/prompts/socratic_math.yaml",
        "socratic/sample/problems.jsonl",
    } <= wanted  # fmt: skip
    assert not wanted - names, f"left out of the wheel: {sorted(wanted - names)}"
    modules = {
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert not modules - names, f"modules left out of the wheel: {sorted(modules - names)}"
    assert "socratic-distill = pipelines.cli:main" in entry_points
    unconditional = [r for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    assert not {_name(r) for r in unconditional} & {"torch", "transformers", "deepspeed"}


# --- installed, outside the checkout ---------------------------------------------------------


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A new venv holding the wheel (pip-installed, console script and all): (its root, its
    site-packages).

    Its dependencies are this interpreter's, named by a plain-path `.pth` line (see the module
    docstring): nothing of the checkout comes along."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True, text=True, env=_clean_env(),
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    deps = [p for p in dict.fromkeys(ours) if Path(p).is_dir() and Path(p) != Path(purelib)]
    (Path(purelib) / "_socratic_test_deps.pth").write_text("\n".join(deps) + "\n")
    (Path(purelib) / "_socratic_test_block.py").write_text(_BLOCKER)
    (Path(purelib) / "_socratic_test_block.pth").write_text("import _socratic_test_block\n")
    return venv, Path(purelib)


# Imported at start-up by every process of the new venv (Ray's workers too): with
# SOCRATIC_TEST_BLOCK=torch,... set, those packages cannot be imported, as in a venv without them.
_BLOCKER = """
import os, sys
from importlib.abc import MetaPathFinder

BLOCKED = {n for n in os.environ.get("SOCRATIC_TEST_BLOCK", "").split(",") if n}


class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


if BLOCKED:
    sys.meta_path.insert(0, Blocker())
"""


# Run inside the new venv: every subcommand's --help through `pipelines.cli.main` in one process
# (the stages' imports are seconds each: torch, Ray Serve), and where each package-data path the
# code computes points. Prints one JSON object.
_PROBE = r"""
import contextlib, io, json, sys
from dataclasses import fields
from pathlib import Path
site_dir = Path(sys.argv[1])
import pipelines, serve, socratic, trainers
from pipelines import cli
out = {"modules": {m.__name__: m.__file__ for m in (pipelines, serve, socratic, trainers, cli)},
       "sys_path": sys.path, "editable": [m for m in sys.modules if "editable" in m], "help": {}}
for name in cli.COMMANDS:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main([name, "--help"])
    out["help"][name] = [rc, buf.getvalue().splitlines()[:1]]
from serve.app import PLAYGROUND
from trainers.config import TRAINERS_DIR, TrainConfig
from pipelines.demo import TRAINERS
from pipelines.prompting import PROMPTS_DIR
from socratic.adapters import sample_path
out["files"] = {
    "playground": str(PLAYGROUND),
    "default deepspeed": {f.name: f.default for f in fields(TrainConfig)}["deepspeed"],
    "demo deepspeed": str(TRAINERS / "ds_zero2.json"),
    "zero3": str(TRAINERS_DIR / "ds_zero3.json"),
    "cpu_tiny": str(TRAINERS_DIR / "configs" / "cpu_tiny.yaml"),
    "prompt": str(PROMPTS_DIR / "socratic_math.yaml"),
    "sample": str(sample_path()),
}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_installed_wheel_runs_from_anywhere(installed: tuple[Path, Path], tmp_path: Path) -> None:
    venv, site_dir = installed
    python, command = venv / "bin" / "python", venv / "bin" / "socratic-distill"
    work = tmp_path / "elsewhere"  # not the checkout: no `pipelines/` to import by accident
    work.mkdir()
    env = _clean_env(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")

    probe = subprocess.run(
        [str(python), "-c", _PROBE, str(site_dir)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    for name, file in found["modules"].items():
        assert Path(file).is_relative_to(site_dir), f"{name} imported from {file}, not the wheel"
    assert not found["editable"], found["editable"]
    assert str(REPO) not in found["sys_path"], found["sys_path"]
    for name, (rc, first) in found["help"].items():
        assert rc == 0 and first and first[0].startswith("usage: "), (name, rc, first)
    assert found["help"]["train"][1][0].startswith("usage: socratic-distill train ")
    for what, file in found["files"].items():
        assert Path(file).is_file() and Path(file).is_relative_to(site_dir), (what, file)

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(command), *args], cwd=work, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    top = run("--help")
    assert top.returncode == 0 and "fake-teacher" in top.stdout, top.stderr
    sub = run("fake-teacher", "--help")
    assert sub.returncode == 0 and "--dataset" in sub.stdout, sub.stderr

    # One real stage: the bundled sample's own decompositions, no teacher, a fresh Ray cluster,
    # with what the base install leaves out (the `train`/`serve`/`eval` extras) unimportable.
    env["SOCRATIC_TEST_BLOCK"] = ",".join(EXTRAS_ONLY)
    blocked = subprocess.run([str(python), "-c", "import torch"], cwd=work, env=env,
                             capture_output=True, text=True)  # fmt: skip
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr, blocked.stderr
    ann = run("annotate", "--mode", "gold", "--dataset", "sample", "--split", "train",
              "--output", "out", "--limit", "4", "--address", "local", timeout=240)  # fmt: skip
    assert ann.returncode == 0, ann.stdout[-2000:] + ann.stderr[-3000:]
    assert list((work / "out").glob("*.parquet")), list((work / "out").iterdir())
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert (summary["rows"], summary["accepted"]) == (4, 4), summary
