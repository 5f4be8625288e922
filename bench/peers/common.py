"""What every peer shares: the normalisation constants, a torchvision transform, versions, keys."""

from __future__ import annotations

import importlib
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


def imported_release(module: str, distribution_prefix: str, install_hint: str) -> str:
    """'nvidia-dali-cuda130 2.4.0': the installed distribution whose name starts with
    `distribution_prefix`, once `module` imports; PeerUnavailable saying why not otherwise.

    A peer published in several builds (DALI: one per CUDA major version) is found by what imports,
    not by one build's name."""
    builds = sorted(
        f"{dist.metadata['Name']} {dist.version}"
        for dist in md.distributions()
        if (dist.metadata["Name"] or "").lower().startswith(distribution_prefix)
    )
    try:
        importlib.import_module(module)
    except ImportError as exc:
        if builds:
            raise PeerUnavailable(
                f"{', '.join(builds)} is installed but {module} does not import: {exc}"
            ) from None
        raise PeerUnavailable(f"{module} is not installed ({install_hint})") from None
    return builds[0] if builds else ""


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
