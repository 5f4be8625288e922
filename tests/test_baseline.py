"""The statement-style folder Dataset used as the benchmark baseline, on real COCO photos."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from bench.baseline import (
    FolderDataset,
    build_folder_loader,
    find_train_folders,
    folder_train_transform,
)
from cocoshard.errors import UserError
from cocoshard.loading.resample import IMAGENET_MEAN, IMAGENET_STD


def test_one_sample_per_label_file_with_its_labels(coco_sample):
    images, labels = find_train_folders(coco_sample)
    dataset = FolderDataset(images, labels)
    assert len(dataset) == 126  # two images have no .cls file and are not samples
    names = dataset.label_files
    assert names == sorted(names)
    for index in (0, len(dataset) - 1):
        image, target = dataset[index]
        ids = {int(t) for t in (labels / names[index]).read_text().split()}
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert target.dtype == torch.float32 and set(torch.nonzero(target).flatten().tolist()) == ids


def test_grayscale_photos_come_out_as_three_equal_channels(coco_sample):
    images, labels = find_train_folders(coco_sample)
    dataset = FolderDataset(images, labels)
    gray = [
        i
        for i, name in enumerate(dataset.label_files)
        if Image.open(images / name.replace(".cls", ".jpg")).mode == "L"
    ]
    assert gray, "coco-sample holds grayscale photos"
    image, _ = dataset[gray[0]]
    r, g, b = image.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


def test_transform_gives_normalised_float_tensors(coco_sample):
    images, labels = find_train_folders(coco_sample)
    torch.manual_seed(0)
    dataset = FolderDataset(images, labels, folder_train_transform(96))
    image, _ = dataset[3]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    low = min(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert low - 1e-5 <= image.min() and image.max() <= high + 1e-5


def test_keys_select_a_subset(coco_sample):
    images, labels = find_train_folders(coco_sample)
    everything = FolderDataset(images, labels).label_files
    subset = FolderDataset(images, labels, keys=[everything[5][:-4], everything[2][:-4], "missing"])
    assert subset.label_files == [everything[2], everything[5]]


def test_loader_gives_float32_batches_in_worker_processes(coco_sample):
    loader = build_folder_loader(coco_sample, batch_size=32, workers=2, size=64, max_images=64)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(32, 3, 64, 64)] * 2
    assert all(b[0].dtype == torch.float32 and b[1].shape == (32, 80) for b in batches)


def test_flat_layout_and_bad_label_files(coco_sample, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    source_images, source_labels = find_train_folders(coco_sample)
    os.symlink(source_images, tmp_path / "images" / "train")
    (tmp_path / "labels" / "train").mkdir()
    first = sorted(source_labels.glob("*.cls"))[0]
    (tmp_path / "labels" / "train" / first.name).write_text("3\nseven\n")
    images, labels = find_train_folders(tmp_path)
    dataset = FolderDataset(images, labels)
    with pytest.raises(UserError, match=rf"{first.name}: line 2"):
        dataset[0]
    with pytest.raises(UserError, match="no train images folder|no train labels folder"):
        find_train_folders(tmp_path / "images")
