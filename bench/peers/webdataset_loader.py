"""WebDataset's canonical pipeline over cocoshard's own jpeg shards (plain WebDataset tars).

    WebDataset(urls, shardshuffle=...).shuffle(1000).decode("pil").to_tuple(...)
        .map_tuple(torchvision transforms).batched(N) -> WebLoader(batch_size=None, workers)

Per-sample PIL decode and torchvision transforms (RandomResizedCrop, flip, ToTensor, Normalize) in
the loader workers, as WebDataset's examples train ImageNet. The shards split over the workers
(`split_by_worker`), so each reads whole shards; float32 NCHW, made channels_last on arrival.
"""

from __future__ import annotations

import numpy as np
import torch
from pipelines import Pipeline

from peers.common import (
    MEAN,
    RATIO,
    SCALE,
    STD,
    PeerUnavailable,
    dataloader_epochs,
    version,
)


def build(data, batch: int, workers: int, size: int, device: torch.device) -> Pipeline:
    release = version("webdataset")
    try:
        import webdataset as wds
        from torchvision import transforms
    except ImportError as exc:
        raise PeerUnavailable(f"webdataset does not import: {exc}") from None
    urls = sorted(str(p) for p in data.shards["jpeg"].glob("train-*.tar"))
    if len(urls) < workers:
        raise PeerUnavailable(f"{len(urls)} shards for {workers} workers: WebDataset splits by whole shards")
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=SCALE, ratio=RATIO),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )

    def labels(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg;png", "labels.npy", "__key__")
        .map_tuple(lambda image: transform(image.convert("RGB")), labels, str)
        .batched(batch, partial=False)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    epoch = dataloader_epochs(loader, device)
    return Pipeline(
        "webdataset",
        epoch,
        "float32 channels_last",
        torch.float32,
        version=release,
        peer=True,
        notes="canonical pipeline over cocoshard's jpeg shards: PIL decode, per-sample torchvision "
        "transforms, shards split over workers",
    )
