"""Class labels as the challenge writes them: `.cls` text in, multi-hot vectors out (pure, no I/O).

A `.cls` file lists the class ids present in one image, one integer 0-79 per line. The parser is
strict about what it cannot interpret (a non-integer line, an id out of range, bytes that are not
text) and lenient about what it can (blank lines, surrounding spaces, CRLF line ends, a repeated id,
an empty file), reporting the lenient cases so that the caller can count them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from cocoshard import NUM_CLASSES

_INTEGER = re.compile(r"[0-9]+")


class LabelError(ValueError):
    """A `.cls` text that cannot be read as class ids; the message says which line and why."""


class ParsedLabels(NamedTuple):
    ids: tuple[int, ...]  # distinct class ids, ascending
    duplicates: int  # lines that repeated an id already listed


def parse_cls(content: str | bytes, num_classes: int = NUM_CLASSES) -> ParsedLabels:
    """Parse the text of a `.cls` file into distinct, sorted class ids.

    Raises LabelError for a line that is not a plain non-negative integer (after stripping
    spaces), an id outside 0..num_classes-1, or bytes that are not UTF-8 text.
    """
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LabelError(f"not UTF-8 text (byte {exc.start})") from None
    content = content.removeprefix("\ufeff")
    seen: set[int] = set()
    duplicates = 0
    for number, line in enumerate(content.splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if not _INTEGER.fullmatch(text):
            raise LabelError(f"line {number}: {_shorten(text)!r} is not an integer class id")
        digits = text.lstrip("0") or "0"
        # Compare lengths first: int() of a huge digit string is slow and, past 4300 digits, refused.
        if len(digits) > len(str(num_classes)) or int(digits) >= num_classes:
            raise LabelError(f"line {number}: class id {_shorten(text)} is outside 0-{num_classes - 1}")
        class_id = int(digits)
        if class_id in seen:
            duplicates += 1
        seen.add(class_id)
    return ParsedLabels(tuple(sorted(seen)), duplicates)


def format_cls(ids: Iterable[int]) -> str:
    """The `.cls` text for a set of class ids: distinct ids ascending, one per line."""
    return "".join(f"{class_id}\n" for class_id in sorted(set(ids)))


def multi_hot(ids: Iterable[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """uint8[num_classes] with 1 at each listed id."""
    vector = np.zeros(num_classes, dtype=np.uint8)
    vector[list(ids)] = 1
    return vector


def class_ids(vector: np.ndarray) -> tuple[int, ...]:
    """The ids set in a multi-hot vector, ascending (the inverse of `multi_hot`)."""
    return tuple(int(i) for i in np.flatnonzero(np.asarray(vector)))


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
