"""Reading a file a user names: only a regular file, and never more than a size bound.

    data = read_input(path, limit=64 * 2**20)      # bytes, or InputError saying why not

Every file cocoshard reads on a user's word goes through `read_input`: images and `.cls` files
(pack, predict, evaluate), a submission, a thresholds file, a `--config` file. A symlink to a
regular file is fine. The file is opened without blocking, so that a named pipe cannot stall the
run, and checked with `fstat` before a byte is read, so that a link to /dev/zero or a huge file
cannot fill the memory.

    settings = parse_toml(text)        # or parse_json(text): a dict, or InputError saying why not

A JSON or TOML file a user gives (`--config`, a thresholds file, a manifest) is parsed by
`parse_json` / `parse_toml`: nesting deeper than `MAX_NESTING` is refused before the recursive
parser sees it (100,000 `[` would end Python's parsers in a RecursionError) and again on the
parsed values (TOML's dotted keys nest without brackets), and a key given twice is refused rather
than the last one silently winning.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

MAX_NESTING = 64  # levels of arrays and tables; cocoshard's own files use three


class InputError(ValueError):
    """An input file that cannot be read; the message is the reason recorded for it."""


def shown_path(path: str | os.PathLike) -> str:
    """A path as text that survives printing and JSON: bytes that are not UTF-8 appear as \\xNN."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_input(path: Path, limit: int) -> bytes:
    """The bytes of a regular input file of at most `limit` bytes; InputError says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("not a regular file (a pipe, device, socket or folder is never an input)")
        if info.st_size > limit:
            raise InputError(f"{info.st_size:,} bytes, more than the {limit:,} an input may have")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise InputError(f"more than the {limit:,} bytes an input may have")
    return data


# ----------------------------------------------------------------------------------- JSON and TOML


# What the nesting scan looks at: strings and comments (skipped whole) and brackets.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_TOML_TOKENS = re.compile(
    r'"""(?:[^\\]|\\.)*?(?:"""|$)|\'\'\'.*?(?:\'\'\'|$)|"(?:[^"\\\n]|\\.)*"?|\'[^\'\n]*\'?|#[^\n]*|[\[\]{}]',
    re.DOTALL,
)


def _skeleton(text: str, toml: bool) -> str:
    """The text with every string made `s` and every comment removed: what is left is structure."""

    def keep(token: re.Match) -> str:
        found = token.group()
        return found if found in "[]{}" else "" if found.startswith("#") else "s"

    return (_TOML_TOKENS if toml else _JSON_TOKENS).sub(keep, text)


def check_nesting(text: str, toml: bool = False, limit: int = MAX_NESTING) -> None:
    """InputError when arrays and objects (tables) nest deeper than `limit` outside strings, or a
    TOML dotted key (`a.b.c = 1`, each dot a table) has more than `limit` parts."""
    skeleton, depth = _skeleton(text, toml), 0
    for bracket in re.finditer(r"[\[\]{}]", skeleton):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > limit:
            raise InputError(f"nested more than {limit} levels deep (arrays or tables in arrays)")
    if toml:
        for part in re.split(r"[\s=\[\]{},]+", re.sub(r"\s*\.\s*", ".", skeleton)):
            if part.count(".") >= limit:
                raise InputError(f"a dotted key nests more than {limit} tables deep")


def check_parsed_nesting(data: Any, limit: int = MAX_NESTING) -> None:
    """InputError when parsed lists and dicts nest deeper than `limit` (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise InputError(f"nested more than {limit} levels deep")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise InputError(f"the key {key!r} is given twice")
        found[key] = value
    return found


def parse_json(text: str) -> Any:
    """Parse JSON text: nesting bounded, a repeated key refused; InputError says why not."""
    check_nesting(text)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except InputError:
        raise
    except RecursionError:  # a backstop: check_nesting bounds what the parser sees
        raise InputError(f"nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:
        raise InputError(f"not valid JSON: {exc}") from None


def parse_toml(text: str) -> dict[str, Any]:
    """Parse TOML text (a repeated key is an error in TOML itself): nesting bounded; InputError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    check_nesting(text, toml=True)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise InputError(f"nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise InputError(f"not valid TOML: {exc}") from None
    check_parsed_nesting(data)
    return data
