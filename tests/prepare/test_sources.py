"""Finding the inputs in either layout (or where the flags say), and pairing images with labels."""

from __future__ import annotations

import json
import shutil

import pytest

from cocoshard import CLASSES
from cocoshard.errors import UserError
from cocoshard.prepare.sources import dataset_class_names, find_sources, take_inventory

ZIP_LAYOUT = ("images/train-resized/train-resized", "labels/train/train", "images/test-resized/test-resized")
FLAT_LAYOUT = ("images/train", "labels/train", "images/test")


@pytest.fixture
def flat_copy(tmp_path, coco_sample):
    """coco-sample rearranged in the flat layout some copies of the zip unpack to."""
    root = tmp_path / "flat"
    for zipped, flat in zip(ZIP_LAYOUT, FLAT_LAYOUT):
        shutil.copytree(coco_sample / zipped, root / flat)
    return root


def test_finds_the_zip_layout(coco_sample):
    sources = find_sources(str(coco_sample))
    assert (sources.train_images, sources.train_labels, sources.test_images) == tuple(
        (coco_sample / p).resolve() for p in ZIP_LAYOUT
    )


def test_flat_layout_packs_to_the_same_shards(flat_copy, tmp_path, pack_dir, sample_shards_jpeg):
    sources = find_sources(str(flat_copy))
    assert sources.train_labels == (flat_copy / "labels/train").resolve()
    out = pack_dir(flat_copy, tmp_path / "out", shard_samples=16)
    shards = sorted(p.name for p in sample_shards_jpeg.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == shards
    assert all((out / name).read_bytes() == (sample_shards_jpeg / name).read_bytes() for name in shards)


def test_explicit_folders_override_the_root(flat_copy, tmp_path):
    sources = find_sources(str(tmp_path / "absent"), *(str(flat_copy / p) for p in FLAT_LAYOUT))
    assert sources.test_images == (flat_copy / "images/test").resolve()
    with pytest.raises(UserError, match="--train-labels .* is not a folder"):
        find_sources(str(flat_copy), train_labels=str(flat_copy / "nope"))


def test_missing_folders_say_what_was_looked_for(tmp_path, coco_sample):
    shutil.copytree(coco_sample / ZIP_LAYOUT[0], tmp_path / ZIP_LAYOUT[0])
    with pytest.raises(
        UserError, match=r"no train labels folder .* looked for .*labels/train/train or .*labels/train$"
    ):
        find_sources(str(tmp_path))
    (tmp_path / "labels/train/train").mkdir(parents=True)
    sources = find_sources(str(tmp_path))
    assert sources.test_images is None  # optional: a set without test images packs train and val
    with pytest.raises(UserError, match=r"no \.cls files in"):
        take_inventory(sources)
    for image in (tmp_path / ZIP_LAYOUT[0]).iterdir():
        image.unlink()
    with pytest.raises(UserError, match="no image files in"):
        take_inventory(sources)


def test_inventory_of_the_real_sample(coco_sample):
    inventory = take_inventory(find_sources(str(coco_sample)))
    assert len(inventory.labelled) == 126 and len(inventory.test) == 32
    assert [key for key, *_ in inventory.labelled] == sorted(key for key, *_ in inventory.labelled)
    assert len(inventory.unlabelled) == 2 and inventory.rejected == [] and inventory.deduplicated == []
    key, image, cls, ids = inventory.labelled[0]
    assert image.name == f"{key}.jpg" and cls.name == f"{key}.cls" and ids == tuple(sorted(ids))


def test_class_names_come_from_a_synthetic_set(tmp_path):
    assert dataset_class_names(tmp_path) == list(CLASSES)
    (tmp_path / "synthetic.json").write_text(json.dumps({"classes": [f"thing {i}" for i in range(80)]}))
    assert dataset_class_names(tmp_path)[79] == "thing 79"
    (tmp_path / "synthetic.json").write_text(json.dumps({"classes": ["too", "few"]}))
    assert dataset_class_names(tmp_path) == list(CLASSES)
    (tmp_path / "synthetic.json").write_text("{not json")
    assert dataset_class_names(tmp_path) == list(CLASSES)


def test_a_root_one_level_off_names_the_challenge_folder(coco_sample, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=f"give --root {coco_sample}$"):
        find_sources(str(coco_sample / "images"))  # one level too deep
    (tmp_path / "ms-coco").symlink_to(coco_sample, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="the challenge folder is ms-coco: give --root ms-coco$"):
        find_sources(".")  # the folder that holds the unzipped ms-coco
