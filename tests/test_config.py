"""Typed configs from YAML and flags: flags win, unknown keys and bad values are clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from socratic.config import option, parse_config


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
