"""manifest.json of a train/val pack and of a K-fold pack: the schema check, the labelled splits,
several splits read as one, and the shards' identity."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cocoshard.errors import UserError
from cocoshard.prepare.manifest import (
    MANIFEST,
    BadManifest,
    check_manifest,
    fold_splits,
    labelled_splits,
    shards_identity,
    split_names,
    split_shards,
    split_size,
)


def manifest_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def test_a_train_val_manifest_reads_as_before(sample_shards_jpeg):
    manifest = manifest_of(sample_shards_jpeg)
    check_manifest(manifest, "m")
    assert "folds" not in manifest and fold_splits(manifest) == ()
    assert labelled_splits(manifest) == ("train", "val")
    # runs recorded the identity of train and val: the default is that same digest
    assert shards_identity(manifest) == shards_identity(manifest, ("train", "val"))


def test_a_fold_manifest_names_its_folds(sample_folds_jpeg):
    manifest = manifest_of(sample_folds_jpeg)
    check_manifest(manifest, "m")
    assert fold_splits(manifest) == labelled_splits(manifest) == ("fold0", "fold1", "fold2")
    assert shards_identity(manifest) == shards_identity(manifest, ("fold0", "fold1", "fold2"))
    assert split_size(manifest, "fold0+fold2") == sum(
        manifest["splits"][s]["samples"] for s in ("fold0", "fold2")
    )


def _extra_train_split(m: dict) -> None:
    m["splits"]["train"] = m["splits"]["fold0"]


def _misnamed_shard(m: dict) -> None:
    m["splits"]["fold1"]["shards"][0]["name"] = "train-000000.tar"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(folds=1), "'folds' must be in 2-100"),
        (lambda m: m.update(folds="3"), "'folds' must be int"),
        (lambda m: m["splits"].pop("fold2"), "the field 'fold2' is missing"),
        (lambda m: m.update(folds=4), "the field 'fold3' is missing"),
        (_extra_train_split, "splits.train is not a split of these shards"),
        (_misnamed_shard, "is not a fold1 shard name"),
        (
            lambda m: m.pop("folds"),
            "splits.fold0 is not a split of these shards (they have train, val, test)",
        ),
    ],
)
def test_a_fold_manifest_that_does_not_add_up_is_refused(
    sample_folds_jpeg, change: Callable[[dict], Any], message: str
):
    manifest = copy.deepcopy(manifest_of(sample_folds_jpeg))
    change(manifest)
    with pytest.raises(BadManifest) as caught:
        check_manifest(manifest, "shards/manifest.json")
    assert "shards/manifest.json" in str(caught.value) and message in str(caught.value)


def test_several_splits_are_named_with_a_plus_and_each_read_once(sample_folds_jpeg):
    manifest = manifest_of(sample_folds_jpeg)
    assert split_names("fold0+fold2") == ("fold0", "fold2") == split_names(("fold0", "fold2"))
    assert split_names("val") == ("val",)
    names = [entry["name"] for entry in split_shards(manifest, "fold2+fold0")]
    assert names[0].startswith("fold2-") and names[-1].startswith("fold0-")
    with pytest.raises(UserError, match="names fold1 twice"):
        split_shards(manifest, "fold1+fold1")
    with pytest.raises(UserError, match="no 'val' split"):
        split_shards(manifest, "val")
