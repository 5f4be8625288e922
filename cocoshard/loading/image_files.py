"""Batches from a folder of image files (`predict --images`): the challenge's test folder as it is.

    files, bad = check_image_folder("ms-coco/images/test-resized/test-resized", workers=None)
    batches = folder_batches(files, canvas=224, batch_size=256, workers=2, device=device)

Images are the files named as pack accepts them (`prepare.images.IMAGE_SUFFIXES`); the others are
left out and said so (`skipped_note`). Every image is checked before any is predicted
(`check_image_folder`): read only if it is a regular file of a bounded size, measured from its
header (a JPEG declaring 30000 x 30000 pixels is refused without being decoded), decoded in full
(at reduced scale: the check reads every byte of compressed data) and its colour mode converted,
so that every bad file is named, with its reason, in one message. Good files are
then decoded by loader workers into the top-left corner of a uint8 canvas, like a shard sample
(`cocoshard.loading.decode`), so evaluation sees them exactly as it sees packed images.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cocoshard.errors import UserError
from cocoshard.input_files import InputError, read_input, shown_path
from cocoshard.loading.decode import check_pixel_count, decode_image_to_canvas, decoder_message
from cocoshard.loading.tario import BadSample
from cocoshard.prepare.images import DECODABLE_FORMATS, IMAGE_SUFFIXES, BadImage, name_problem, to_rgb
from cocoshard.prepare.pool import map_in_workers
from cocoshard.prepare.sources import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS


def folder_listing(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(the image files of a folder, sorted; the other files, which are not named as images).

    Images are named as pack accepts them (`prepare.images.IMAGE_SUFFIXES`): what pack packs from
    a folder, predict predicts and evaluate expects. Their stems must be distinct."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    entries = sorted(p for p in root.iterdir() if not p.is_dir())
    files = [p for p in entries if name_problem(p) is None]
    if not files:
        raise UserError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder{_inner_hint(root)}"
        )
    seen: dict[str, Path] = {}
    for file in files:
        if file.stem in seen:
            raise UserError(f"{file} and {seen[file.stem]} share the key {file.stem!r}: keep one")
        seen[file.stem] = file
    return files, [p for p in entries if name_problem(p) is not None]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (by name, as pack accepts them), sorted; their stems distinct."""
    return folder_listing(folder)[0]


def skipped_note(folder: str | os.PathLike, others: list[Path]) -> str | None:
    """What a command says of the files of an image folder that are not named as images."""
    if not others:
        return None
    shown = ", ".join(shown_path(p.name) for p in others[:5])
    return (
        f"{len(others)} file(s) in {folder} are not named as images and were left out, as pack leaves "
        f"them out: {shown}{' ...' if len(others) > 5 else ''}"
    )


def _inner_hint(root: Path) -> str:
    """Where the images are when they sit one folder further down (the zip doubles its folder names:
    images/test-resized/test-resized), as the flag to give."""
    inner = [
        (sub, sum(1 for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        for sub in sorted(p for p in root.iterdir() if p.is_dir())
    ]
    found = [(sub, count) for sub, count in inner if count]
    if not found:
        return ""
    sub, count = found[0]
    return f", but its folder {sub.name} holds {count}: give --images {sub}"


def image_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be predicted, or None when it can (a worker task)."""
    file = Path(path)
    try:
        data = read_input(file, MAX_IMAGE_BYTES)
    except InputError as exc:
        return str(exc)
    if not data:
        return "empty file (0 bytes)"
    ext = file.suffix.lstrip(".").lower()
    try:
        check_pixel_count(data, ext)
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
        if image.width * image.height > MAX_IMAGE_PIXELS:  # a format the header check does not read
            return (
                f"refused, too many pixels: it declares {image.width} x {image.height}, more than the "
                f"{MAX_IMAGE_PIXELS:,} an image may have"
            )
        image.draft(
            "RGB", (max(1, image.width // 8), max(1, image.height // 8))
        )  # JPEG: every byte, 1/8 the work
        image.load()
        to_rgb(image)  # a mode that is not converted is named here, before any is predicted
    except (BadSample, BadImage) as exc:
        return str(exc)
    except Exception as exc:  # a malformed file can break a decoder in any way; it is the file's fault
        kind = (
            "a JPEG"
            if data[:2] == b"\xff\xd8"
            else "a PNG"
            if data[:4] == b"\x89PNG"
            else f"not an image ({', '.join(DECODABLE_FORMATS)})"
        )
        return f"cannot be decoded ({kind}, first bytes {data[:8]!r}): {decoder_message(exc)}"
    return None


def check_image_folder(folder: str | os.PathLike, workers: int | None) -> tuple[list[Path], dict[Path, str]]:
    """(every image file of the folder, {file: reason} for those that cannot be predicted)."""
    files = list_images(folder)
    problems = map_in_workers(
        image_problem,
        [str(f) for f in files],
        workers=workers,
        desc="check images",
        describe=lambda path: shown_path(Path(path).name),
    )
    return files, {f: why for f, why in zip(files, problems, strict=True) if why}


class FolderImages(torch.utils.data.Dataset):
    """Each image of a list decoded into the top-left corner of a `canvas` x `canvas` uint8 canvas."""

    def __init__(self, files: list[Path], canvas: int) -> None:
        self.files, self.canvas = files, canvas

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        file = self.files[index]
        canvas = np.zeros((self.canvas, self.canvas, 3), np.uint8)
        try:
            data = read_input(file, MAX_IMAGE_BYTES)
            height, width = decode_image_to_canvas(data, file.suffix.lstrip(".").lower(), canvas)
            error = ""
        except (BadSample, InputError) as exc:  # checked before, but a file may change in between
            height, width, error = 1, 1, str(exc)
        return torch.from_numpy(canvas), torch.tensor([height, width]), file.stem, error


def folder_batches(
    files: list[Path], canvas: int, batch_size: int, workers: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(uint8 images (N, S, S, 3), sizes (N, 2), keys) of checked files, on `device`, in order."""
    loader = torch.utils.data.DataLoader(
        FolderImages(files, canvas),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    by_key = {file.stem: file for file in files}
    for images, sizes, keys, errors in loader:
        bad = [(key, error) for key, error in zip(keys, errors, strict=True) if error]
        if bad:
            raise UserError(f"{by_key[bad[0][0]]} changed since it was checked: {bad[0][1]}")
        yield images.to(device, non_blocking=True), sizes.to(device, non_blocking=True), list(keys)
