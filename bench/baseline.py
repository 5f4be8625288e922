"""The challenge statement's way to load images, kept as the baseline the benchmarks beat.

Like the statement's `COCOTrainImageDataset`: one sample per `.cls` file (sorted), the image opened
with PIL and converted to RGB, torchvision transforms applied to each sample inside the DataLoader
workers (RandomResizedCrop, horizontal flip, ToTensor, Normalize), float32 batches.

    loader = build_folder_loader("ms-coco", batch_size=128, workers=2, size=224)
    for images, labels in loader: ...   # float32 (N, 3, 224, 224), float32 (N, 80)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from cocoshard import NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.loading.resample import IMAGENET_MEAN, IMAGENET_STD
from cocoshard.prepare.sources import find_sources
from cocoshard.pure.labels import LabelError, parse_cls


def find_train_folders(root: str | os.PathLike) -> tuple[Path, Path]:
    """(image folder, label folder) of the labelled train set under a challenge-layout `root`."""
    sources = find_sources(str(root))
    return sources.train_images, sources.train_labels


def read_label_file(path: Path) -> list[int]:
    """Class ids of one `.cls` file; UserError naming the file when it cannot be read."""
    try:
        return list(parse_cls(path.read_bytes()).ids)
    except LabelError as exc:
        raise UserError(f"{path}: {exc}") from exc


class FolderDataset(torch.utils.data.Dataset):
    """(transformed image, float32 multi-hot labels) for each `.cls` file, sorted by name.

    `keys` keeps only those samples (e.g. the keys of one packed split); `max_images` the first N;
    `with_keys` adds each sample's key (the benchmark checks labels against the .cls files by key).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        label_dir: str | os.PathLike,
        transform: Callable | None = None,
        max_images: int | None = None,
        keys: Iterable[str] | None = None,
        with_keys: bool = False,
    ) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        names = sorted(p.name for p in self.label_dir.glob("*.cls"))
        if keys is not None:
            wanted = set(keys)
            names = [name for name in names if Path(name).stem in wanted]
        self.label_files = names[:max_images]
        if not self.label_files:
            raise UserError(f"no .cls label files in {self.label_dir}")
        self.transform = transform
        self.with_keys = with_keys

    def __len__(self) -> int:
        return len(self.label_files)

    def __getitem__(self, index: int) -> tuple:
        name = self.label_files[index]
        image = Image.open(self.image_dir / (Path(name).stem + ".jpg")).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        labels = torch.zeros(NUM_CLASSES)
        labels[read_label_file(self.label_dir / name)] = 1.0
        return (image, labels, Path(name).stem) if self.with_keys else (image, labels)


def folder_train_transform(
    size: int, scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> transforms.Compose:
    """Per-sample PIL augmentation: what the statement does, with the same crop range as ours."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def build_folder_loader(
    root: str | os.PathLike,
    *,
    batch_size: int,
    workers: int,
    size: int = 224,
    scale: Sequence[float] = (0.35, 1.0),
    seed: int = 0,
    max_images: int | None = None,
    keys: Iterable[str] | None = None,
    with_keys: bool = False,
) -> torch.utils.data.DataLoader:
    """The statement's training DataLoader over a challenge folder: shuffled, `workers` processes."""
    images, labels = find_train_folders(root)
    dataset = FolderDataset(
        images,
        labels,
        folder_train_transform(size, scale),
        max_images=max_images,
        keys=keys,
        with_keys=with_keys,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
