"""Typed configuration from YAML and the command line, for every script in the project.

Each stage describes its settings once, as a dataclass whose fields carry their help text
(`field(metadata={"help": ...})`). `parse_config` turns that into an argparse CLI, reads
`--config FILE.yaml` (keys are field names) and lets flags override the file, so a run is
reproducible from its YAML and tweakable from the shell, and no stage passes loose dicts around.

YAML values are converted to each field's type (`coerce`), never trusted: PyYAML reads YAML 1.1,
where `2e-5` is the *string* '2e-5' and `no` a boolean, while `"no"` is a truthy string. A value
that does not convert is an error naming the file, the key and the type it should have.
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

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


class ConfigError(ValueError):
    """A configuration value that does not fit its field; `key` is its dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, Path, X | None, list[X], dict[K, V], Any).

    Conversions are the lossless ones only: '2e-5' -> 2e-05, 3 -> 3.0, 4.0 -> 4, the usual
    yes/no/true/false/on/off/1/0 words -> bool. Anything else (2.5 for an int, 'maybe' or 2 for
    a bool, a list for a str) raises `ConfigError`, so a typo cannot become a silent setting.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return coerce(value, rest[0], key)
        raise TypeError(f"{key}: unsupported option type {tp!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if value is None:
        raise ConfigError(key, f"expected {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise ConfigError(key, f"expected bool (true/false, yes/no, on/off, 1/0), got {value!r}")
    if tp is int:
        if type(value) is int:
            return value
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise ConfigError(key, f"expected int, got {value!r}")
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(key, f"expected float, got {value!r}")
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if type(value) is int:  # `run_name: 2024` - exact as text
            return str(value)
        raise ConfigError(key, f"expected str, got {value!r} (quote it in YAML)")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(key, f"expected a path, got {value!r}")
    raise TypeError(f"{key}: unsupported option type {tp!r}")


def _number(value: Any) -> int | float | None:
    """An int or float from a number or numeric text (bool is not a number here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def typed_fields(cls: type, values: Any, key: str) -> dict[str, Any]:
    """`values`, a mapping of some of `cls`'s dataclass fields, each converted to its type.

    For partial overrides of a dataclass (a role's `Scaling`): unknown keys are refused."""
    if not isinstance(values, dict):
        raise ConfigError(key, f"expected a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            key,
            f"unknown {cls.__name__} keys {', '.join(map(str, unknown))} "
            f"(known: {', '.join(names)})",
        )
    return {k: coerce(v, hints[k], f"{key}.{k}") for k, v in values.items()}


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
        if not f.init or f.metadata.get("cli") is False or f.name == EXPLICIT:
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


EXPLICIT = "explicit_options"  # a field that, if a config class has it, records who set what


def parse_config(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` and flags; unknown YAML keys are an error.

    Each YAML value is converted to its field's type (`coerce`) and checked against the
    field's `choices`; errors name the file and the key. A class with an `explicit_options`
    field gets, there, each option the user set mapped to where: `"flag"` or the YAML path
    (so code can let a user's explicit choice win over, say, a DeepSpeed JSON, and say so).
    """
    parser = build_parser(cls)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    explicit: dict[str, str] = {}
    path = args.pop("config", None)
    yaml_keys: set[str] = set()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"{path}: cannot read the config: {e}")
        if not isinstance(data, dict):
            parser.error(f"{path}: expected a mapping of option names to values")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != EXPLICIT}
        unknown = sorted(str(k) for k in set(data) - set(fields))
        if unknown:
            parser.error(f"{path}: unknown options {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, raw in data.items():
            try:
                value = coerce(raw, hints[key], key)
            except ConfigError as e:
                parser.error(f"{path}: {e}")
            choices = fields[key].metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                parser.error(
                    f"{path}: {key}: {value!r} is not one of {', '.join(map(str, choices))}"
                )
            values[key] = value
            explicit[key] = str(path)
        yaml_keys = set(data)
    values.update(args)
    explicit.update(dict.fromkeys(args, "flag"))
    if any(f.name == EXPLICIT for f in dataclasses.fields(cls)):
        values[EXPLICIT] = explicit
    try:
        return cls(**values)
    except ConfigError as e:
        where = f"{path}: " if e.key.split(".")[0] in yaml_keys - set(args) else ""
        parser.error(f"{where}{e}")
        raise  # unreachable: parser.error exits
    except (TypeError, ValueError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:  # noqa: A002
    """A dataclass field with its CLI help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
