"""The submission JSON: build it from predictions, check it strictly, write it atomically.

The leaderboard takes one JSON object mapping each test image's stem (the file name without
`.jpg`, exactly as named) to the list of class ids (ints 0-79) predicted for it:

    {
        "000000000139": [
            56,
            60
        ],
        ...
    }

What this module writes: keys sorted, values sorted lists of distinct ints, indent 4, UTF-8, a
final newline. What it accepts when checking a file: the same, except that a list need not be
sorted (the order of a set of labels means nothing to a scorer, so `validate_submission` sorts it
and `unsorted_entries` lets the caller say so). Everything else is rejected, naming the entry:
text that is not JSON, NaN/Infinity, a duplicated key, a top level that is not an object, an
unknown or missing image, a value that is not a list, an id that is not an int (floats such as
`3.0` and booleans included), an id out of range, an id listed twice.

I/O: `read_submission_json` reads a file, `write_submission` writes one; the rest is pure.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import NUM_CLASSES
from cocoshard.atomic import atomic_write_text
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, read_input
from cocoshard.pure.decision import top_up
from cocoshard.pure.format import key_problem

# The challenge's submission (~5,000 images) is ~150 KB; a file far larger is not one.
SUBMISSION_LIMIT = 64 * 1024 * 1024

MAX_REPORTED = 10  # problems listed in one error message; the rest are counted

Submission = dict[str, list[int]]


# ----------------------------------------------------------------------------------- build


def build_submission(
    keys: Sequence[str],
    predictions: np.ndarray,
    scores: np.ndarray | None = None,
    min_labels: int = 0,
) -> Submission:
    """Map each key to the sorted ids of its predicted classes.

    `predictions` is a boolean (N, C) array. With `min_labels` > 0 an image with fewer predicted
    classes gets its highest-scoring other classes added until it has `min_labels` (every COCO
    image has at least one label, so an empty list only ever costs recall); that needs `scores`.
    The rule is `cocoshard.pure.decision`'s, the one every reported score is computed with.
    """
    predictions = np.asarray(predictions).astype(bool)
    if predictions.ndim != 2 or predictions.shape[0] != len(keys):
        raise ValueError(f"predictions of shape {predictions.shape} for {len(keys)} keys")
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if repeated:
        raise ValueError(f"keys must be distinct; repeated: {', '.join(repeated[:MAX_REPORTED])}")
    if min_labels > 0:
        if scores is None:
            raise ValueError("min_labels needs the scores to rank the classes")
        predictions = top_up(predictions, np.asarray(scores), min_labels)
    return {str(key): np.flatnonzero(row).tolist() for key, row in zip(keys, predictions, strict=True)}


# ----------------------------------------------------------------------------------- write


def serialise(submission: Submission) -> str:
    """The exact text written: keys sorted, indent 4, newline at the end."""
    ordered = {key: sorted(submission[key]) for key in sorted(submission)}
    return json.dumps(ordered, indent=4) + "\n"


def write_submission(path: str | os.PathLike, submission: Submission, num_classes: int = NUM_CLASSES) -> None:
    """Check `submission` against its own keys, then write it atomically."""
    validate_submission(submission, expected=submission.keys(), num_classes=num_classes, source=str(path))
    atomic_write_text(path, serialise(submission))


# ----------------------------------------------------------------------------------- read and check


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears more than once")
        seen[key] = value
    return seen


def parse_submission_text(text: str, source: str = "predictions") -> Any:
    """Parse JSON strictly: NaN/Infinity and repeated keys are errors, not silently accepted."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{source}: not a valid submission JSON: {exc}") from exc
    except RecursionError:
        raise UserError(
            f"{source}: not a submission: JSON nested too deeply (a submission is one flat object)"
        ) from None


def read_submission_json(path: str | os.PathLike) -> Any:
    """Read and strictly parse a submission file (not yet checked: see `validate_submission`).

    Only a regular file of at most SUBMISSION_LIMIT bytes is read (a pipe would block, a device
    or a huge file would fill memory).
    """
    file = Path(path)
    if not file.exists():
        raise UserError(f"{file}: no such file")
    try:
        data = read_input(file, SUBMISSION_LIMIT)
    except InputError as exc:
        raise UserError(f"{file}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 text ({exc})") from exc
    return parse_submission_text(text, str(file))


def _id_problem(value: Any, num_classes: int) -> str | None:
    """Why `value` is not a class id, or None when it is one."""
    if isinstance(value, bool):
        return f"{json.dumps(value)} is a boolean, not a class id"
    if isinstance(value, float):
        return f"{value!r} is a float; class ids are ints 0-{num_classes - 1}"
    if not isinstance(value, int):
        return f"{json.dumps(value)} is not an int class id"
    if not 0 <= value < num_classes:
        return f"{value} is out of range 0-{num_classes - 1}"
    return None


def _entry_problems(key: str, value: Any, num_classes: int) -> list[str]:
    if not isinstance(value, list):
        return [f"{key!r}: the value must be a list of class ids, got {json.dumps(value)[:60]}"]
    problems = []
    for position, item in enumerate(value):
        problem = _id_problem(item, num_classes)
        if problem:
            problems.append(f"{key!r}: item {position} ({json.dumps(item)}): {problem}")
    ints = Counter(item for item in value if isinstance(item, int) and not isinstance(item, bool))
    repeated = sorted(item for item, count in ints.items() if count > 1)
    if repeated:
        problems.append(f"{key!r}: class id(s) {', '.join(map(str, repeated))} listed more than once")
    return problems


def _key_problems(
    keys: Iterable[str], expected: Iterable[str] | None, allowed: Iterable[str] | None
) -> list[str]:
    present = set(keys)
    problems = []
    for key in sorted(present):  # whatever the images: a key is an image's file stem, and nothing else
        problem = key_problem(key)
        if problem:
            hint = (
                " (keys are file stems: drop the extension)"
                if "." in key and key_problem(key.split(".")[0]) is None
                else ""
            )
            problems.append(f"{key!r}: not an image key: {problem}{hint}")
    known = set(expected) if expected is not None else set(allowed) if allowed is not None else None
    if known is not None:
        for key in sorted(k for k in present - known if key_problem(k) is None):
            hint = " (keys are file stems: drop the extension)" if Path(key).stem in known else ""
            problems.append(f"{key!r}: unknown image, not one of the expected keys{hint}")
    if expected is not None:
        problems += [
            f"{key!r}: missing image (every image must appear once)"
            for key in sorted(set(expected) - present)
        ]
    return problems


def validate_submission(
    data: Any,
    *,
    expected: Iterable[str] | None = None,
    allowed: Iterable[str] | None = None,
    num_classes: int = NUM_CLASSES,
    source: str = "predictions",
) -> Submission:
    """Check parsed JSON against the format; return it with every list sorted.

    `expected`: the exact set of keys the file must hold (e.g. the test images): unknown and
    missing keys are errors. `allowed`: a superset the keys must come from (e.g. every labelled
    image), for a file that covers only some of them. Raises `UserError` naming each offending
    entry (the first `MAX_REPORTED`, then a count).
    """
    if not isinstance(data, dict):
        raise UserError(
            f"{source}: the top level must be a JSON object of image -> class ids, got a {_json_type(data)}"
        )
    problems = _key_problems(data.keys(), expected, allowed)
    for key, value in data.items():
        problems += _entry_problems(key, value, num_classes)
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise UserError(f"{source}: {len(problems)} problem(s) with the submission format:\n  {shown}{more}")
    return {key: sorted(value) for key, value in data.items()}


def _json_type(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def unsorted_entries(data: dict[str, list[int]]) -> list[str]:
    """Keys whose list is not in ascending order (accepted, but worth a note). Call it on data
    that `validate_submission` accepted."""
    return [key for key, value in data.items() if value != sorted(value)]


def load_submission(
    path: str | os.PathLike,
    *,
    expected: Iterable[str] | None = None,
    allowed: Iterable[str] | None = None,
    num_classes: int = NUM_CLASSES,
) -> Submission:
    """Read, parse and check a submission file in one call."""
    data = read_submission_json(path)
    return validate_submission(
        data, expected=expected, allowed=allowed, num_classes=num_classes, source=str(path)
    )


def to_matrix(submission: Submission, keys: Sequence[str], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Boolean (len(keys), num_classes) predictions in the order of `keys`."""
    matrix = np.zeros((len(keys), num_classes), dtype=bool)
    for row, key in enumerate(keys):
        matrix[row, submission[key]] = True
    return matrix
