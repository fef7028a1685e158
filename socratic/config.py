"""Typed configuration from YAML and the command line, for every script in the project.

Each stage describes its settings once, as a dataclass whose fields carry their help text
(`field(metadata={"help": ...})`). `parse_config` turns that into an argparse CLI, reads
`--config FILE.yaml` (keys are field names) and lets flags override the file, so a run is
reproducible from its YAML and tweakable from the shell, and no stage passes loose dicts around.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, help="YAML file whose keys are the options below (flags win)"
    )
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, optional = _base_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {
            "help": f.metadata.get("help", ""),
            "default": argparse.SUPPRESS,  # unset flags must not override the YAML file
        }
        if default is not None:
            kwargs["help"] += f" (default: {default})"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kwargs["type"] = tp
            if optional:
                kwargs["metavar"] = tp.__name__.upper()
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {tp!r}")
        parser.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` and flags; unknown YAML keys are an error."""
    parser = build_parser(cls)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    path = args.pop("config", None)
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            parser.error(f"{path}: expected a mapping of option names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            parser.error(f"{path}: unknown options {', '.join(unknown)}")
        values.update(data)
    values.update(args)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:  # noqa: A002
    """A dataclass field with its CLI help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
