"""How settings are declared, read, checked and shown: the machinery behind `cocoshard.config`.

    cfg = resolve(TrainConfig, {"epochs": 3}, "train.toml")   # defaults <- file <- flags, checked
    print_config(cfg); to_dict(cfg); from_dict(TrainConfig, saved)

`opt` declares a field (default and help line); `Validated` makes a config check itself when it is
made; `finite`, `positive`, `non_negative`, `fraction` and `in_range` are the checks the configs
share, each naming the flag and each refusing NaN and infinity (which pass `<= 0` comparisons).
A `--config FILE` is TOML or JSON, or YAML where PyYAML is installed (keys may use - or _), read
as any file a user names (`cocoshard.input_files`: bounded size and nesting, each key once);
values from it are checked against the field's type. A file may hold one section per command
(`[train]`, `[predict]`): a command reads its own and the top-level settings it has
(`command_settings`). An unknown setting is named with the command and the closest known setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from cocoshard.errors import ConfigError
from cocoshard.input_files import (
    InputError,
    check_nesting,
    check_parsed_nesting,
    parse_json,
    parse_toml,
    read_input,
)

C = TypeVar("C")
CONFIG_LIMIT = 2**20  # bytes of a --config file: a few dozen settings need ~1 KB


def opt(default: Any, help: str, **extra: Any) -> Any:
    """A config field: its default and the one line of help the CLI shows."""
    return field(default=default, metadata={"help": help, **extra})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(cfg: Any, name: str) -> Any:
    """The value of setting `name`, refused unless a finite number (NaN and infinity pass every
    `<` and `<=` test the wrong way, so each check starts here)."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag(name)} must be a number (got {value!r})")
    if not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number (got {value})")
    return value


def finite(cfg: Any, *names: str) -> None:
    """Each setting is a finite number (or unset)."""
    for name in names:
        if getattr(cfg, name) is not None:
            _number(cfg, name)


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        if _number(cfg, name) <= 0:
            raise ConfigError(f"{flag(name)} must be > 0 (got {getattr(cfg, name)})")


def non_negative(cfg: Any, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is not None and _number(cfg, name) < 0:
            raise ConfigError(f"{flag(name)} must be >= 0 (got {getattr(cfg, name)})")


def fraction(cfg: Any, name: str, low_open: bool = True) -> None:
    value = _number(cfg, name)
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ConfigError(f"{flag(name)} must be in {'(0' if low_open else '[0'}, 1] (got {value})")


def in_range(cfg: Any, name: str, low: float, high: float) -> None:
    """low <= the setting <= high (unset passes): the range its readers accept, said with the flag."""
    if getattr(cfg, name) is not None and not low <= _number(cfg, name) <= high:
        raise ConfigError(f"{flag(name)} must be in {low:,}-{high:,} (got {getattr(cfg, name):,})")


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


def _shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
            raise ConfigError(f"{name}: {_shown(value)} is not one of {', '.join(map(str, args))}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {_shown(value)}")
        return value
    if origin is tuple:  # tuple[str, ...]: a list in a file
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(f"{name}: expected a list of {args[0].__name__}, got {value!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {kind.__name__}, got {_shown(value)}")
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML, JSON or YAML file of overrides (keys may use - or _; tables are command sections),
    each setting given once, nothing nested deeper than sections of settings need."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = read_input(p, CONFIG_LIMIT).decode("utf-8")
    except InputError as exc:
        raise ConfigError(f"config file {p}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} cannot be parsed: not UTF-8 text ({exc})") from None
    data = parse_settings_text(p, text)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table/object of settings")
    return _dash_keys(data, p)


def _dash_keys(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Keys with - read as _, in command sections too; a setting given twice (`batch-size` and
    `batch_size`) is refused."""
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in settings:
            raise ConfigError(
                f"config file {path}: the setting {name!r} is given twice ({key!r} and another)"
            )
        settings[name] = _dash_keys(value, path) if isinstance(value, dict) else value
    return settings


YAML_SUFFIXES = (".yaml", ".yml")
FORMATS_HINT = "--config takes TOML (.toml) or JSON (.json), or YAML (.yaml) where PyYAML is installed"


def parse_settings_text(path: Path, text: str) -> Any:
    """The settings in `text`, read by the file's suffix: .json as JSON, .yaml/.yml as YAML (with
    PyYAML), anything else as TOML; a parse error names the file and the formats it may be in."""
    if path.suffix.lower() in YAML_SUFFIXES:
        return _parse_yaml(path, text)
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        return parse_json(text) if kind == "JSON" else parse_toml(text)  # bounded nesting, keys once
    except InputError as exc:
        raise ConfigError(f"config file {path} cannot be parsed as {kind} ({exc}): {FORMATS_HINT}") from None


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ModuleNotFoundError:
        raise ConfigError(
            f"config file {path} is YAML, which needs PyYAML (pip install pyyaml); or write it as TOML "
            f"or JSON"
        ) from None
    try:
        check_nesting(text)
        data = yaml.safe_load(text)
        check_parsed_nesting(data)
    except InputError as exc:
        raise ConfigError(f"config file {path} cannot be parsed as YAML ({exc})") from None
    except RecursionError:  # indentation nests without brackets: the parser's own depth is the bound
        raise ConfigError(f"config file {path} cannot be parsed as YAML: nested too deep") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} cannot be parsed as YAML ({exc}): {FORMATS_HINT}") from None

    def number(value: Any) -> Any:  # YAML 1.1 reads 1e-3 (no dot) as text: read it as the number it is
        if isinstance(value, dict):
            return {k: number(v) for k, v in value.items()}
        return float(value) if isinstance(value, str) and _NUMBER.match(value) else value

    return number(data)


def command_name(cls: type) -> str:
    """The command a config class belongs to, as users type it (TrainConfig: train)."""
    return cls.__name__.removesuffix("Config").lower()


def command_settings(
    data: dict[str, Any], command: str, commands: dict[str, type] | None, source: str
) -> dict[str, Any]:
    """The settings a file gives `command`: its top-level ones and its own [command] section.

    In a file with sections, a top-level setting is shared: it applies to the commands that have
    it (one that no command has is refused). A section must be named after a command."""
    sections = {key: value for key, value in data.items() if isinstance(value, dict)}
    if not sections:
        return data
    names = list(commands or {command: type(None)})
    for name in sections:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise ConfigError(f"{source}: [{name}] is not a command: {hint}sections: {', '.join(names)}")
    shared = {key: value for key, value in data.items() if key not in sections}
    if commands is not None and command in commands:
        anywhere = {f.name for cls in commands.values() for f, _ in fields_of(cls)}
        mine = {f.name for f, _ in fields_of(commands[command])}
        for key in shared:
            if key not in anywhere:
                raise unknown_setting(key, source, "any command", sorted(anywhere))
        shared = {key: value for key, value in shared.items() if key in mine}
    return {**shared, **sections.get(command, {})}


def unknown_setting(key: str, source: str, command: str, known: list[str]) -> ConfigError:
    """The error for a setting `command` does not have, with the closest one it does."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown setting {key!r} in {source} for {command}{hint} (known: {', '.join(known)})")


def resolve(
    cls: type[C],
    overrides: dict[str, Any] | None = None,
    file: str | None = None,
    command: str | None = None,
    commands: dict[str, type] | None = None,
) -> C:
    """Defaults, then the config file (its [command] section too), then explicit overrides;
    validated once, when built. `commands` (name: config class) lets a file with sections share
    top-level settings between commands."""
    command = command or command_name(cls)
    known = {f.name: (kind, f.metadata.get("const")) for f, kind in fields_of(cls)}
    values: dict[str, Any] = {}
    from_file = (
        command_settings(read_config_file(file), command, commands, f"config file {file}") if file else {}
    )
    for source, data in (
        (f"config file {file}", from_file),
        ("override", overrides or {}),
    ):
        for key, value in data.items():
            if key not in known:
                raise unknown_setting(key, source, f"cocoshard {command}", list(known))
            named = key if source == "override" else f"{source}: {key}"  # a file's value names the file
            values[key] = _coerce(named, value, *known[key])
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
    """Print the resolved configuration once (and `extra`: what a run resolved at start), two
    settings per row where the console is wide enough, one where it is narrow (80 columns)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console(stderr=True)
    items = [*to_dict(cfg).items(), *(extra or {}).items()]
    per_row = 2 if console.width >= 110 else 1
    table = Table(
        title=command_name(type(cfg)) + " settings",
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    for _ in range(per_row):
        table.add_column(style="cyan", no_wrap=True)
        table.add_column(overflow="fold")
    rows = (len(items) + per_row - 1) // per_row
    columns = [items[i * rows : (i + 1) * rows] for i in range(per_row)]
    for row in range(rows):
        cells: list[Text] = []
        for column in columns:
            key, value = column[row] if row < len(column) else ("", "")
            cells += [Text(key), Text(repr(value) if key else "")]
        table.add_row(*cells)
    console.print(table)


def inherit(source: type, name: str, default: Any) -> Any:
    """A field that means exactly what `source`'s field `name` means (its help), with its own default."""
    original = next(f for f in dataclasses.fields(source) if f.name == name)
    return field(default=default, metadata={**original.metadata, "inherited": source.__name__})
