"""`.cls` parsing and multi-hot vectors: real label files, every malformed case, and round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoshard.pure.labels import (
    LabelError,
    class_ids,
    format_cls,
    multi_hot,
    parse_cls,
)


def test_parses_every_real_label_file_like_the_challenge_dataset(coco_sample):
    files = sorted((coco_sample / "labels" / "train" / "train").glob("*.cls"))
    assert len(files) == 126
    for path in files:
        # what the statement's Dataset builds: int() of every line
        expected = sorted({int(line) for line in path.read_text().splitlines()})
        assert list(parse_cls(path.read_bytes()).ids) == expected


@pytest.mark.parametrize(
    ("text", "ids", "duplicates"),
    [
        ("0\n41\n42\n", (0, 41, 42), 0),
        ("41\n0\n", (0, 41), 0),  # sorted
        ("3\n3\n5\n3\n", (3, 5), 2),  # repeats dropped and counted
        ("", (), 0),  # empty file: an image with no class
        ("\n\n", (), 0),
        (" 7 \r\n12\r\n", (7, 12), 0),  # spaces and CRLF
        ("79", (79,), 0),  # no final newline
        ("007\n", (7,), 0),
        ("\ufeff5\n", (5,), 0),  # a BOM written by some editors
    ],
)
def test_accepts_what_it_can_read(text, ids, duplicates):
    assert parse_cls(text) == (ids, duplicates)
    assert parse_cls(text.encode("utf-8")) == (ids, duplicates)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("80\n", "line 1: class id 80 is outside 0-79"),
        ("1\n200\n", "line 2: class id 200 is outside 0-79"),
        ("-1\n", "line 1: '-1' is not an integer class id"),
        ("cat\n", "line 1: 'cat' is not an integer class id"),
        ("1.0\n", "'1.0' is not an integer"),
        ("1 2\n", "'1 2' is not an integer"),
        ("1_0\n", "'1_0' is not an integer"),  # int() would read 10
        ("\u0665\n", "is not an integer"),  # an Arabic-Indic five: int() would read 5
        (b"\xff\xfe1\n", "not UTF-8 text"),
    ],
)
def test_rejects_what_it_cannot_read_and_says_where(content, message):
    with pytest.raises(LabelError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_cls(content)


def test_num_classes_bounds_the_ids():
    assert parse_cls("9\n", num_classes=10).ids == (9,)
    with pytest.raises(LabelError):
        parse_cls("10\n", num_classes=10)


def test_multi_hot_and_back():
    vector = multi_hot([0, 5, 79])
    assert vector.dtype == np.uint8 and vector.shape == (80,)
    assert vector.sum() == 3 and vector[[0, 5, 79]].tolist() == [1, 1, 1]
    assert class_ids(vector) == (0, 5, 79)
    assert multi_hot([]).sum() == 0


@given(st.sets(st.integers(0, 79)))
def test_format_then_parse_round_trips(ids):
    text = format_cls(ids)
    assert parse_cls(text) == (tuple(sorted(ids)), 0)
    assert class_ids(multi_hot(ids)) == tuple(sorted(ids))


@given(st.lists(st.integers(0, 79), max_size=30))
def test_duplicates_counted_exactly(lines):
    parsed = parse_cls("\n".join(map(str, lines)))
    assert parsed.ids == tuple(sorted(set(lines)))
    assert parsed.duplicates == len(lines) - len(set(lines))
