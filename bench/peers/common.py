"""What every peer shares: the normalisation constants, a torchvision transform, versions, keys."""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import torch
from pipelines import RATIO, SCALE, PeerUnavailable  # noqa: F401  (re-exported for the peer modules)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def version(distribution: str) -> str:
    """The installed version of `distribution`, or PeerUnavailable."""
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        raise PeerUnavailable(f"{distribution} is not installed (bash tools/install-peers.sh)") from None


def tensor_transform(size: int):
    """Per-sample augmentation of a uint8 CHW tensor with torchvision's v2 transforms (antialiased
    resize on uint8, then one float conversion and normalisation): the fastest torchvision way."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def to_channels_last(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An NCHW float batch as the model takes it: on the device, channels_last."""
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def labels_of(keys: list[str], data) -> torch.Tensor:
    """uint8 (N, 80) labels of `keys`, from the .cls files (for peers that carry only an index)."""
    return torch.from_numpy(np.stack([data.labels[key] for key in keys]))


def dataloader_epochs(loader, device: torch.device):
    """`epoch(number)` over a loader of (NCHW float images, labels, keys) batches, made channels_last
    on arrival."""

    def epoch(number: int):
        for images, labels, keys in loader:
            yield to_channels_last(images, device), labels, list(keys)

    return epoch
