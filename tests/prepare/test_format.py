"""Shard file names, sample member names and the codecs of their bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cocoshard.prepare.format import (
    decode_hw,
    decode_labels,
    encode_hw,
    encode_labels,
    is_shard_file,
    key_problem,
    shard_name,
    split_member_name,
)
from cocoshard.prepare.labels import multi_hot, parse_cls
from cocoshard.prepare.manifest import list_shard_files


def test_shard_names_and_the_files_pack_owns(tmp_path):
    assert shard_name("train", 42) == "train-000042.tar"
    for name in ("train-000000.tar", "val-000123.tar", "test-999999.tar"):
        assert is_shard_file(name)
    for name in ("train-0.tar", "other-000000.tar", "train-000000.tar.tmp", ".tmp-train-000000.tar", "manifest.json"):
        assert not is_shard_file(name)
    for name in ("val-000001.tar", "train-000000.tar", "notes.txt", ".tmp-train-000002.tar.x1"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "test-000000.tar").mkdir()  # a folder is never a shard
    assert [p.name for p in list_shard_files(tmp_path)] == ["train-000000.tar", "val-000001.tar"]
    assert list_shard_files(tmp_path / "missing") == []


def test_keys_with_a_dot_are_refused_with_the_reason():
    assert key_problem("000000000139") is None
    assert "WebDataset" in key_problem("img.v2")
    assert key_problem("") is not None
    assert key_problem(" padded") is not None
    assert split_member_name("000000000139.labels") == ("000000000139", "labels")
    assert split_member_name("a.b.jpg") == ("a", "b.jpg")  # why dotted keys are refused


@given(st.integers(0, 65535), st.integers(0, 65535))
def test_hw_round_trips(height, width):
    assert len(encode_hw(height, width)) == 4
    assert decode_hw(encode_hw(height, width)) == (height, width)


def test_labels_member_round_trips_and_is_checked():
    vector = multi_hot(parse_cls("0\n41\n79\n").ids)
    data = encode_labels(vector)
    assert len(data) == 80 and decode_labels(data).tolist() == vector.tolist()
    with pytest.raises(ValueError, match="79 bytes"):
        decode_labels(data[:-1])
    with pytest.raises(ValueError, match="other than 0 and 1"):
        decode_labels(b"\x02" + data[1:])
