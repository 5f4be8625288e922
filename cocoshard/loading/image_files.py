"""Batches from a folder of image files (`predict --images`): the challenge's test folder as it is.

Each image is decoded by loader workers into the top-left corner of a uint8 canvas, like a shard
sample (`cocoshard.loading.decode`), so that evaluation sees it exactly as it sees packed images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cocoshard.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The images of a folder (jpg, jpeg, png), sorted; their stems must be distinct."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    seen: dict[str, Path] = {}
    for file in files:
        if file.stem in seen:
            raise UserError(f"{file} and {seen[file.stem]} share the key {file.stem!r}: keep one")
        seen[file.stem] = file
    return files


class FolderImages(torch.utils.data.Dataset):
    """Each image of a folder decoded into the top-left corner of a `canvas` x `canvas` uint8 canvas.

    A file that fails to decode comes back flagged (with a blank canvas) rather than raised in a
    worker, so that the main process can name the file in a clear error.
    """

    def __init__(self, files: list[Path], canvas: int) -> None:
        self.files, self.canvas = files, canvas

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        from cocoshard.loading.decode import decode_image_to_canvas
        from cocoshard.loading.tario import BadSample

        file = self.files[index]
        canvas = np.zeros((self.canvas, self.canvas, 3), np.uint8)
        try:
            height, width = decode_image_to_canvas(file.read_bytes(), file.suffix.lstrip(".").lower(), canvas)
            error = ""
        except (BadSample, OSError) as exc:
            height, width, error = 1, 1, str(exc)
        return torch.from_numpy(canvas), torch.tensor([height, width]), file.stem, error


def folder_batches(
    folder: str | os.PathLike, canvas: int, batch_size: int, workers: int, device: torch.device
) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]]:
    """(number of images, iterator of (uint8 images (N,S,S,3), sizes (N,2), keys) on `device`)."""
    files = list_images(folder)
    files_by_key = {file.stem: file for file in files}
    loader = torch.utils.data.DataLoader(
        FolderImages(files, canvas), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for images, sizes, keys, errors in loader:
            bad = [(key, error) for key, error in zip(keys, errors) if error]
            if bad:
                raise UserError(f"{files_by_key[bad[0][0]]}: {bad[0][1]}")
            yield images.to(device, non_blocking=True), sizes.to(device, non_blocking=True), list(keys)

    return len(files), batches()
