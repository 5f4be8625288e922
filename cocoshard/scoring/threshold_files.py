"""Per-class threshold files: OUT/thresholds.json from `cocoshard train`, and `cocoshard thresholds --out`.

    {"thresholds": [80 numbers in 0-1], "classes": [80 names], ...what they were tuned on and scored}

`predict --thresholds FILE` reads either kind; every value is checked (80 finite numbers in [0, 1])
before one class is predicted with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cocoshard import NUM_CLASSES
from cocoshard.atomic import atomic_write_text
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, parse_json, read_input

THRESHOLDS_LIMIT = 1024 * 1024  # bytes: 80 numbers and a few lines about them need ~3 KB


def check_thresholds(values: Any, source: str) -> np.ndarray:
    """(80,) float64 thresholds; UserError naming `source` unless 80 finite numbers in [0, 1]."""
    if (
        not isinstance(values, list)
        or len(values) != NUM_CLASSES
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
            for v in values
        )
    ):
        raise UserError(f"{source}: 'thresholds' must be {NUM_CLASSES} finite numbers in [0, 1]")
    return np.asarray(values, dtype=np.float64)


def read_thresholds_file(path: str | os.PathLike) -> np.ndarray:
    """The 80 thresholds of a thresholds file, checked."""
    file = Path(path)
    try:
        data = parse_json(read_input(file, THRESHOLDS_LIMIT).decode("utf-8"))
    except (InputError, UnicodeDecodeError) as exc:
        raise UserError(f"--thresholds {file}: cannot be read as a thresholds JSON file ({exc})") from None
    if not isinstance(data, dict) or "thresholds" not in data:
        raise UserError(f"--thresholds {file}: not a thresholds file (no 'thresholds' list)")
    return check_thresholds(data["thresholds"], f"--thresholds {file}")


def write_thresholds_file(path: str | os.PathLike, thresholds: np.ndarray, **about: Any) -> None:
    """Write thresholds (and what they were tuned on, scored, kept at the default) atomically."""
    payload = {"thresholds": [float(t) for t in thresholds], **about}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
