"""Batch augmentation: shapes, memory format, value range, crops inside the image, seeding, flips, eval."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoshard.loading.augment import eval_transform, sample_crops, train_augment
from cocoshard.loading.resample import IMAGENET_MEAN, IMAGENET_STD

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


def canvases(n: int = 6, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in random (h, w) regions; everything outside a region is 255."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, size, size, 3), 255, dtype=torch.uint8)
    sizes = torch.randint(size // 3, size + 1, (n, 2), generator=g)
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :h, :w] = torch.randint(0, 200, (h, w, 3), generator=g, dtype=torch.uint8)
    return images, sizes


def normalised(value: int) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (value / 255 - mean) / std


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["resize", "grid"])
def test_train_output_shape_dtype_memory_format_and_range(dtype, method):
    images, sizes = canvases()
    out = train_augment(images, sizes, out_size=48, generator=gen(), dtype=dtype, method=method)
    assert out.shape == (6, 3, 48, 48) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert LOW - 0.02 <= out.float().min() and out.float().max() <= HIGH + 0.02
    plain = train_augment(
        images, sizes, out_size=48, generator=gen(), dtype=dtype, method=method, channels_last=False
    )
    assert plain.is_contiguous() and torch.equal(plain, out)


@pytest.mark.parametrize("method", ["resize", "grid"])
def test_nothing_outside_an_image_region_reaches_the_output(method):
    images = torch.full((4, 40, 40, 3), 250, dtype=torch.uint8)
    sizes = torch.tensor([[40, 40], [17, 33], [40, 9], [5, 5]])
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :h, :w] = 10
    expected = normalised(10).view(1, 3, 1, 1)
    for out in (
        train_augment(images, sizes, out_size=24, generator=gen(), method=method),
        eval_transform(images, sizes, out_size=24, method=method),
    ):
        assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


@pytest.mark.parametrize("method", ["resize", "grid"])
def test_eval_resizes_the_whole_image_without_cropping(method):
    images, sizes = canvases(n=3, size=32, seed=2)
    out = eval_transform(images, sizes, out_size=64, method=method)
    for i, (h, w) in enumerate(sizes.tolist()):
        region = images[i, :h, :w].permute(2, 0, 1)[None].float()
        reference = F.interpolate(region, size=(64, 64), mode="bilinear", align_corners=False)
        reference = (reference / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD
        ).view(1, 3, 1, 1)
        # The CPU path resamples in uint8 fixed point: at most one grey level off.
        assert (out[i : i + 1] - reference).abs().max() <= 1.1 / 255 / min(IMAGENET_STD)


def test_eval_flip_mirrors_every_image():
    images, sizes = canvases(n=3, size=32)
    plain = eval_transform(images, sizes, out_size=32)
    assert torch.equal(eval_transform(images, sizes, out_size=32, flip=True), plain.flip(3))


def test_same_seed_same_batch_other_seed_other_batch():
    images, sizes = canvases()
    a = train_augment(images, sizes, out_size=32, generator=gen(7))
    b = train_augment(images, sizes, out_size=32, generator=gen(7))
    c = train_augment(images, sizes, out_size=32, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_mirrors_the_crop():
    images = (
        torch.arange(16, dtype=torch.uint8).repeat(16, 1)[None, :, :, None].expand(1, 16, 16, 3).contiguous()
        * 10
    )
    sizes = torch.tensor([[16, 16]])
    flipped = unflipped = None
    for seed in range(40):  # whole-image crops: only the flip is random
        out = train_augment(
            images, sizes, out_size=16, generator=gen(seed), scale=(1.0, 1.0), ratio=(1.0, 1.0)
        )
        if out[0, 0, 0, 0] > out[0, 0, 0, -1]:
            flipped = out
        else:
            unflipped = out
    assert flipped is not None and unflipped is not None
    assert torch.equal(flipped, unflipped.flip(3))


def test_a_bad_crop_scale_is_refused():
    images, sizes = canvases()
    with pytest.raises(ValueError, match="crop scale"):
        train_augment(images, sizes, out_size=32, generator=gen(), scale=(0.0, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=12),
    st.floats(0.05, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_crops_stay_inside_each_image_and_respect_the_scale(shapes, scale_min, seed):
    sizes = torch.tensor(shapes)
    boxes = sample_crops(sizes, generator=gen(seed), scale=(scale_min, 1.0))
    top, left, height, width = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all())
    assert bool((top + height <= sizes[:, 0]).all() and (left + width <= sizes[:, 1]).all())
    area = (height * width).double() / (sizes[:, 0] * sizes[:, 1]).double()
    aspect = sizes[:, 1] / sizes[:, 0]
    # Rounding dominates tiny images; an image of a ratio outside (3/4, 4/3) may fall back to a
    # smaller crop of an allowed ratio, as in torchvision.
    checked = (sizes >= 40).all(1) & (aspect >= 3 / 4) & (aspect <= 4 / 3)
    assert bool((area[checked] >= scale_min * 0.9).all())
