"""FFCV: its own .beton file (raw pixels or JPEG), its fused decoder-crop, numba-compiled per batch.

    DatasetWriter(path, {"image": RGBImageField(write_mode=..., max_resolution=224), ...})
    Loader(path, order=RANDOM, os_cache=True, drop_last=True, num_workers=W,
           pipelines={"image": [RandomResizedCropRGBImageDecoder, RandomHorizontalFlip,
                                NormalizeImage, ToTensor, ToTorchImage]})

What it took: FFCV's ImageNet example order (ToTensor, ToTorchImage, then NormalizeImage) never
finishes building its loader on a CPU; normalising before ToTensor does (the CPU path of
NormalizeImage works on the NHWC uint8 batch). `num_workers` are FFCV's threads. float32
channels_last.
"""

from __future__ import annotations

import numpy as np
import torch
from pipelines import Pipeline

from peers.common import MEAN, RATIO, SCALE, STD, PeerUnavailable, version


class _Images:
    """The bench images in the order of `data.keys`, as FFCV's writer reads an indexed dataset."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.keys)

    def __getitem__(self, index: int):
        from PIL import Image

        key = self.data.keys[index]
        with Image.open(self.data.images / f"{key}.jpg") as image:
            return image.convert("RGB"), self.data.labels[key], index


def _beton(data, mode: str, workers: int):
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = data.cache / f"ffcv-{mode}.beton"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        fields = {
            "image": RGBImageField(write_mode=mode, max_resolution=224, jpeg_quality=90),
            "labels": NDArrayField(np.dtype("uint8"), (80,)),
            "index": IntField(),
        }
        DatasetWriter(str(partial), fields, num_workers=workers).from_indexed_dataset(_Images(data))
        partial.rename(path)
    return path


def _build(mode: str, data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    release = version("ffcv")
    try:
        from ffcv.fields.decoders import (
            IntDecoder,
            NDArrayDecoder,
            RandomResizedCropRGBImageDecoder,
        )
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import (
            NormalizeImage,
            RandomHorizontalFlip,
            Squeeze,
            ToTensor,
            ToTorchImage,
        )
    except ImportError as exc:
        raise PeerUnavailable(f"ffcv does not import: {exc}") from None
    path = _beton(data, mode, workers)
    mean, std = np.array(MEAN) * 255, np.array(STD) * 255
    image = [
        RandomResizedCropRGBImageDecoder((size, size), scale=SCALE, ratio=RATIO),
        RandomHorizontalFlip(),
        NormalizeImage(mean, std, np.float32),
        ToTensor(),
        ToTorchImage(),
    ]
    loader = Loader(
        str(path),
        batch_size=batch,
        num_workers=workers,
        order=OrderOption.RANDOM,
        os_cache=True,
        drop_last=True,
        seed=0,
        pipelines={
            "image": image,
            "labels": [NDArrayDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor(), Squeeze()],
        },
    )

    def epoch(number: int):
        for images, labels, index in loader:
            yield images.to(device, non_blocking=True), labels, [data.keys[i] for i in index.tolist()]

    return Pipeline(
        f"ffcv-{'raw' if mode == 'raw' else 'jpeg'}",
        epoch,
        "float32 channels_last",
        torch.float32,
        version=release,
        peer=True,
        notes=f"{mode} .beton, os_cache, RandomResizedCropRGBImageDecoder; NormalizeImage before ToTensor "
        "(its example's order never builds on a CPU)",
    )


def build_jpeg(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    return _build("jpg", data, batch, workers, size, device)


def build_raw(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    return _build("raw", data, batch, workers, size, device)
