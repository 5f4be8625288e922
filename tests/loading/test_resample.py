"""Resampling and normalisation: the two resamplers agree, threads and buffers change nothing."""

from __future__ import annotations

import pytest
import torch

from cocoshard.loading.augment import sample_crops, whole_boxes
from cocoshard.loading.resample import IMAGENET_STD, crop_resize_normalise
from tests.loading.test_augment import canvases, gen, normalised


def test_normalisation_matches_imagenet_statistics():
    images = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    images[1] = 255
    sizes = torch.tensor([[8, 8], [8, 8]])
    out = crop_resize_normalise(images, whole_boxes(sizes), torch.zeros(2, dtype=torch.bool), out_size=8)
    assert torch.allclose(out[0, :, 0, 0], normalised(0), atol=1e-6)
    assert torch.allclose(out[1, :, 0, 0], normalised(255), atol=1e-6)


def test_the_two_resamplers_agree():
    images, sizes = canvases(n=8, size=48, seed=3)
    boxes = sample_crops(sizes, generator=gen(1))
    flips = torch.tensor([True, False] * 4)
    a = crop_resize_normalise(images, boxes, flips, out_size=64, method="resize")
    b = crop_resize_normalise(images, boxes, flips, out_size=64, method="grid")
    assert (a - b).abs().max() <= 1.1 / 255 / min(IMAGENET_STD)


def test_threads_split_the_work_without_changing_it():
    images, sizes = canvases(n=9)
    boxes, flips = sample_crops(sizes, generator=gen(3)), torch.tensor([True, False, False] * 3)
    one = crop_resize_normalise(images, boxes, flips, out_size=40, threads=1)
    three = crop_resize_normalise(images, boxes, flips, out_size=40, threads=3)
    assert torch.equal(one, three)


def test_returned_batches_are_never_overwritten_by_later_calls():
    images, sizes = canvases()
    flips = torch.zeros(len(sizes), dtype=torch.bool)
    first = crop_resize_normalise(images, sample_crops(sizes, generator=gen(1)), flips, out_size=32)
    kept = first.clone()
    for seed in range(3):
        crop_resize_normalise(images, sample_crops(sizes, generator=gen(seed + 2)), flips, out_size=32)
    assert torch.equal(first, kept)


def test_bad_arguments_are_refused():
    images, sizes = canvases()
    boxes, flips = whole_boxes(sizes), torch.zeros(len(sizes), dtype=torch.bool)
    with pytest.raises(ValueError, match="uint8 canvases"):
        crop_resize_normalise(images.float(), boxes, flips, out_size=32)
    with pytest.raises(ValueError, match="unknown resampling"):
        crop_resize_normalise(images, boxes, flips, out_size=32, method="nearest")
