"""How settings are declared, read, checked and shown: the machinery behind `cocoshard.config`.

    cfg = resolve(TrainConfig, {"epochs": 3}, "train.toml")   # defaults <- file <- flags, checked
    print_config(cfg); to_dict(cfg); from_dict(TrainConfig, saved)

`opt` declares a field (default and help line); `Validated` makes a config check itself when it is
made; `positive`, `non_negative` and `fraction` are the checks the configs share, each naming the
flag. A `--config FILE` is TOML or JSON (keys may use - or _), read as any file a user names
(`cocoshard.input_files`); values from it are checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from cocoshard.errors import ConfigError
from cocoshard.input_files import InputError, read_input

C = TypeVar("C")
CONFIG_LIMIT = 2**20  # bytes of a --config file: a few dozen settings need ~1 KB


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field: its default and the one line of help the CLI shows."""
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{flag(name)} must be > 0 (got {getattr(cfg, name)})")


def non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ConfigError(f"{flag(name)} must be >= 0 (got {value})")


def fraction(cfg: Any, name: str, low_open: bool = True) -> None:
    value = getattr(cfg, name)
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ConfigError(f"{flag(name)} must be in {'(0' if low_open else '[0'}, 1] (got {value})")


class Validated:
    """Validates on construction (and on `dataclasses.replace`): one place holds each rule."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the flag when a value cannot work."""


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Each setting of a config class (internal fields aside) with its resolved type."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def optional_of(kind: Any) -> Any:
    """X for an `X | None` (or `Optional[X]`) field type, None for any other type."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return None


def _coerce(name: str, value: Any, kind: Any, const: Any = None) -> Any:
    """Check a value read from a config file against the field's type."""
    inner = optional_of(kind)
    if inner is not None:
        if value is None:
            return None
        if const is not None and isinstance(value, bool):  # `resume = true` in a file
            return const if value else None
        kind = inner
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if origin is tuple:  # tuple[str, ...]: a list in a file
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(f"{name}: expected a list of {args[0].__name__}, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML or JSON file of overrides (keys may use - or _)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = read_input(p, CONFIG_LIMIT).decode("utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except InputError as exc:
        raise ConfigError(f"config file {p}: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type[C], overrides: dict[str, Any] | None = None, file: str | None = None) -> C:
    """Defaults, then the config file, then explicit overrides; validated once, when built."""
    known = {f.name: (kind, f.metadata.get("const")) for f, kind in fields_of(cls)}
    values: dict[str, Any] = {}
    for source, data in (
        ("config file", read_config_file(file) if file else {}),
        ("override", overrides or {}),
    ):
        for key, value in data.items():
            if key not in known:
                raise ConfigError(
                    f"unknown setting {key!r} in {source} for {cls.__name__}; known: {', '.join(known)}"
                )
            values[key] = _coerce(key, value, *known[key])
    if any(f.name == "given" for f in dataclasses.fields(cls)):
        values["given"] = frozenset(values)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The settings of a config as plain JSON-able values (internal fields aside)."""
    return {f.name: getattr(cfg, f.name) for f, _ in fields_of(type(cfg))}


def from_dict(cls: type[C], data: dict[str, Any], source: str = "settings") -> C:
    """Rebuild a config saved by `to_dict`, checking every value's type (keys this version does not
    know, from another version, are ignored)."""
    known = {f.name: (kind, f.metadata.get("const")) for f, kind in fields_of(cls)}
    return cls(
        **{
            key: _coerce(f"{source}: {key}", value, *known[key])
            for key, value in data.items()
            if key in known
        }
    )


def print_config(cfg: Any, console: Any = None, extra: dict[str, Any] | None = None) -> None:
    """Print the resolved configuration once (and `extra`: what a run resolved at start), two per row."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    items = [*to_dict(cfg).items(), *(extra or {}).items()]
    table = Table(
        title=type(cfg).__name__.removesuffix("Config").lower() + " settings",
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    for _ in range(2):
        table.add_column(style="cyan", no_wrap=True)
        table.add_column(overflow="fold")
    half = (len(items) + 1) // 2
    for left, right in zip(items[:half], items[half:] + [("", "")], strict=False):
        table.add_row(
            Text(left[0]), Text(repr(left[1])), Text(right[0]), Text(repr(right[1]) if right[0] else "")
        )
    (console or Console(stderr=True)).print(table)
