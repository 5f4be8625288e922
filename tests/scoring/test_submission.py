"""The submission JSON: what is written, and every way a file can break the format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoshard.errors import UserError
from cocoshard.scoring import submission as sub

KEYS = ["000000000139", "000000000285", "000000000632"]


def good() -> dict:
    return {"000000000139": [56, 60, 62], "000000000285": [21], "000000000632": [57, 59, 73]}


# ----------------------------------------------------------------------------------- build and write


def test_build_lists_sorted_ids_per_key() -> None:
    pred = np.zeros((3, 80), bool)
    pred[0, [62, 56, 60]] = True
    pred[2, 5] = True
    assert sub.build_submission(KEYS, pred) == {KEYS[0]: [56, 60, 62], KEYS[1]: [], KEYS[2]: [5]}


def test_min_labels_adds_the_top_scoring_classes_only_where_short() -> None:
    scores = np.full((3, 80), 0.1)
    scores[0, 7], scores[0, 9] = 0.45, 0.3
    scores[1, 3], scores[1, 4] = 0.9, 0.2
    scores[2, [1, 2]] = 0.8
    pred = scores > 0.5
    result = sub.build_submission(KEYS, pred, scores, min_labels=1)
    assert result == {KEYS[0]: [7], KEYS[1]: [3], KEYS[2]: [1, 2]}
    result = sub.build_submission(KEYS, pred, scores, min_labels=2)
    assert result == {KEYS[0]: [7, 9], KEYS[1]: [3, 4], KEYS[2]: [1, 2]}


def test_min_labels_keeps_predicted_classes_even_when_they_score_lower() -> None:
    scores = np.array([[0.2, 0.9, 0.1]])
    pred = np.array([[True, False, False]])  # e.g. a lower tuned threshold for class 0
    assert sub.build_submission(["a"], pred, scores, min_labels=2) == {"a": [0, 1]}


def test_build_refuses_repeated_keys_and_missing_scores() -> None:
    with pytest.raises(ValueError, match="repeated: x"):
        sub.build_submission(["x", "x"], np.zeros((2, 80), bool))
    with pytest.raises(ValueError, match="scores"):
        sub.build_submission(["x"], np.zeros((1, 80), bool), min_labels=1)


def test_written_file_is_the_statement_format(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    sub.write_submission(path, {KEYS[1]: [21], KEYS[0]: [62, 56, 60]})
    text = path.read_text()
    assert (
        text == '{\n    "000000000139": [\n        56,\n        60,\n        62\n    ],\n'
        '    "000000000285": [\n        21\n    ]\n}\n'
    )
    assert sub.load_submission(path, expected=KEYS[:2]) == {KEYS[0]: [56, 60, 62], KEYS[1]: [21]}
    assert not list(tmp_path.glob(".tmp-*"))


def test_write_refuses_an_invalid_submission_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    with pytest.raises(UserError, match="out of range"):
        sub.write_submission(path, {"a": [80]})
    assert not path.exists()


# ----------------------------------------------------------------------------------- rejections

MALFORMED = [
    ("not an object", [[1, 2]], None, "top level must be a JSON object"),
    ("unknown key", {**good(), "000000000999": [1]}, KEYS, "'000000000999': unknown image"),
    ("extension kept", {**good(), "000000000632.jpg": [1]}, KEYS, "drop the extension"),
    (
        "missing image",
        {k: v for k, v in good().items() if k != KEYS[1]},
        KEYS,
        "'000000000285': missing image",
    ),
    ("float id", {**good(), KEYS[1]: [21.0]}, KEYS, "'000000000285': item 0 \\(21.0\\): 21.0 is a float"),
    (
        "bool id",
        {**good(), KEYS[2]: [57, True]},
        KEYS,
        "'000000000632': item 1 \\(true\\): true is a boolean",
    ),
    ("string id", {**good(), KEYS[0]: ["56"]}, KEYS, "'000000000139': item 0 \\(\"56\"\\)"),
    ("null id", {**good(), KEYS[0]: [None]}, KEYS, "'000000000139': item 0 \\(null\\)"),
    (
        "out of range",
        {**good(), KEYS[0]: [56, 80]},
        KEYS,
        "'000000000139': item 1 \\(80\\): 80 is out of range",
    ),
    ("negative", {**good(), KEYS[0]: [-1]}, KEYS, "-1 is out of range"),
    (
        "duplicates",
        {**good(), KEYS[2]: [57, 59, 57]},
        KEYS,
        "'000000000632': class id\\(s\\) 57 listed more than once",
    ),
    ("value not a list", {**good(), KEYS[1]: 21}, KEYS, "'000000000285': the value must be a list"),
    ("nested object", {**good(), KEYS[1]: {"ids": [21]}}, KEYS, "'000000000285': the value must be a list"),
]


@pytest.mark.parametrize("name,data,expected,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_file_is_rejected_naming_the_entry(
    tmp_path: Path, name, data, expected, message
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as error:
        sub.load_submission(path, expected=expected)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"a": [1], "a": [2]}', "key 'a' appears more than once"),
        ('{"a": [NaN]}', "NaN is not a number JSON allows"),
        ('{"a": [Infinity]}', "Infinity"),
        ('{"a": [1],}', "not a valid submission JSON"),
        ("", "not a valid submission JSON"),
    ],
)
def test_text_level_errors_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        sub.read_submission_json(path)


def test_non_utf8_and_missing_files_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes(b'{"caf\xe9": [1]}')
    with pytest.raises(UserError, match="not UTF-8"):
        sub.read_submission_json(path)
    with pytest.raises(UserError, match="no such file"):
        sub.read_submission_json(tmp_path / "absent.json")


def test_only_a_regular_file_of_bounded_size_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)  # never written: reading it would block forever
    for path in (Path("/dev/zero"), fifo, tmp_path):
        with pytest.raises(UserError, match=f"{path}: not a regular file"):
            sub.read_submission_json(path)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(sub.SUBMISSION_LIMIT + 1)  # sparse: no disk used
    with pytest.raises(UserError, match="huge.json: .* bytes, more than the"):
        sub.read_submission_json(huge)


def test_many_problems_are_counted_after_the_first_few() -> None:
    with pytest.raises(UserError) as error:
        sub.validate_submission({str(i): [99] for i in range(25)})
    assert "25 problem(s)" in str(error.value) and "and 15 more" in str(error.value)


def test_allowed_keys_accept_a_subset_but_not_strangers() -> None:
    assert sub.validate_submission({KEYS[0]: [1]}, allowed=KEYS) == {KEYS[0]: [1]}
    with pytest.raises(UserError, match="'zzz': unknown image"):
        sub.validate_submission({"zzz": [1]}, allowed=KEYS)


def test_unsorted_lists_are_accepted_sorted_and_reported() -> None:
    data = {**good(), KEYS[0]: [62, 56, 60]}
    assert sub.validate_submission(data, expected=KEYS)[KEYS[0]] == [56, 60, 62]
    assert sub.unsorted_entries(data) == [KEYS[0]]


def test_to_matrix_follows_the_given_key_order() -> None:
    matrix = sub.to_matrix(good(), [KEYS[1], KEYS[0]])
    assert matrix.shape == (2, 80)
    assert np.flatnonzero(matrix[0]).tolist() == [21] and np.flatnonzero(matrix[1]).tolist() == [56, 60, 62]


# ----------------------------------------------------------------------------------- properties

stems = st.text(alphabet="0123456789abcdef_-", min_size=1, max_size=14)
submissions = st.dictionaries(stems, st.lists(st.integers(0, 79), unique=True, max_size=18), max_size=40)


@settings(max_examples=150, deadline=None)
@given(submissions, st.randoms(use_true_random=False))
def test_serialise_round_trips_and_ignores_key_order(data: dict, rnd) -> None:
    text = sub.serialise(data)
    parsed = sub.parse_submission_text(text)
    assert sub.validate_submission(parsed, expected=data.keys()) == {k: sorted(v) for k, v in data.items()}
    assert list(parsed) == sorted(parsed)
    items = list(data.items())
    rnd.shuffle(items)
    assert sub.serialise(dict(items)) == text


@settings(max_examples=150, deadline=None)
@given(submissions, st.integers(0, 3), st.randoms(use_true_random=False))
def test_build_then_validate_accepts_exactly_the_built_keys(data: dict, min_labels: int, rnd) -> None:
    keys = list(data)
    pred = np.zeros((len(keys), 80), bool)
    for row, key in enumerate(keys):
        pred[row, data[key]] = True
    scores = np.array([[rnd.random() for _ in range(80)] for _ in keys]).reshape(len(keys), 80)
    built = sub.build_submission(keys, pred, scores, min_labels=min_labels)
    checked = sub.validate_submission(sub.parse_submission_text(sub.serialise(built)), expected=keys)
    for key in keys:
        assert set(data[key]) <= set(checked[key])
        assert len(checked[key]) == max(len(data[key]), min_labels)


@settings(max_examples=100, deadline=None)
@given(submissions.filter(bool), st.sampled_from([80, -1, 3.0, True, "7", None]))
def test_one_bad_id_anywhere_is_named(data: dict, bad) -> None:
    key = sorted(data)[0]
    broken = {**data, key: [*data[key], bad]}
    with pytest.raises(UserError, match=f"{key!r}: item {len(data[key])}"):
        sub.validate_submission(broken, expected=data.keys())
