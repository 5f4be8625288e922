"""Threshold files: written atomically, read back exactly, every value and the file itself checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cocoshard.errors import UserError
from cocoshard.scoring.threshold_files import read_thresholds_file, write_thresholds_file


def test_written_thresholds_read_back_exactly(tmp_path: Path) -> None:
    values = np.linspace(0.0, 1.0, 80)
    path = tmp_path / "thresholds.json"
    write_thresholds_file(path, values, tuned_on="val", kept_default=[3, 7])
    assert np.array_equal(read_thresholds_file(path), values)
    assert json.loads(path.read_text())["kept_default"] == [3, 7]
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temporary left


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"thresholds": [0.5] * 79}),
        json.dumps({"thresholds": [0.5] * 79 + [5.0]}),
        json.dumps({"thresholds": [0.5] * 79 + [-1.0]}),
        json.dumps({"thresholds": [0.5] * 79 + [True]}),
        json.dumps({"thresholds": [0.5] * 79 + ["0.5"]}),
        '{"thresholds": [' + ", ".join(["0.5"] * 79 + ["NaN"]) + "]}",
    ],
    ids=["79 values", "5.0", "-1.0", "a boolean", "a string", "NaN"],
)
def test_values_other_than_80_finite_numbers_in_0_1_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(UserError, match=r"t.json: 'thresholds' must be 80 finite numbers in \[0, 1\]"):
        read_thresholds_file(path)


def test_files_that_are_not_threshold_files_are_named(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)  # never written: reading it would block forever
    cases = {
        tmp_path / "absent.json": "cannot be read",
        fifo: "not a regular file",
        Path("/dev/zero"): "not a regular file",
    }
    (tmp_path / "list.json").write_text("[0.5]")
    (tmp_path / "text.json").write_text("thresholds: 0.5")
    cases[tmp_path / "list.json"] = "not a thresholds file"
    cases[tmp_path / "text.json"] = "cannot be read as a thresholds JSON file"
    for path, message in cases.items():
        with pytest.raises(UserError, match=f"--thresholds {path}: .*{message}"):
            read_thresholds_file(path)
