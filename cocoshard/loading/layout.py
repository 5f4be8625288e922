"""Where each sample of a shard keeps its image and labels, checked once per file version.

    layout = ShardLayout.build(read_shard(url, sha256, count), canvas_size=224, labelled=True)
    layout.problems.get(i)                           # why sample i is bad (BadSample's words), or None
    h, w = layout.fill(i, canvases, row, canvas_bytes)   # its image into a canvas's top-left corner
    layout.copy_pixels(samples, rows, canvases, canvas_bytes)  # a batch's raw images, one loop
    label_rows[rows] = layout.labels[samples]        # checked multi-hot labels, one gather

A stream worker reads the same shards every epoch. Checking a sample again each time (its key,
which image member it has, the `.npy` header of its pixels, the declared size of its JPEG, its
labels) cost more than copying its pixels: a raw 224 px sample took 62 µs in one process on the
2-core bench machine, ~12 of them the copy; through a layout it takes 14-17. A layout does those
checks once per file version in each process that reads the shard (the sha256 already ties the
bytes to the manifest; building one costs ~6 µs a sample), keeps where each image's bytes lie,
and keeps the shard mapped, so that later epochs' copies find their pages mapped (a fresh map
costs ~5 µs a sample in page faults). What a check finds is the message `fill_canvas`,
`fill_labels` and `compressed_image` raise, word for word: a bad sample is met in the same place
with the same words, skipped or not as before (tests/loading/test_shard_layout.py).
"""

from __future__ import annotations

import math
import mmap
from typing import NamedTuple

import numpy as np

from cocoshard import NUM_CLASSES
from cocoshard.loading.decode import check_pixel_count, decode_image_to_canvas, image_extension
from cocoshard.loading.device_decode import compressed_image
from cocoshard.loading.tario import BadSample, MappedShard, Sample
from cocoshard.pure.format import (
    EXT_LABELS,
    EXT_PIXELS,
    NpyArray,
    decode_labels,
    encode_labels,
    pixels_layout,
)


class ShardLayout(NamedTuple):
    """One shard's samples as positions in its mapped bytes (lists: read one item at a time)."""

    stamp: int  # the file version it was built from (0: a download, never kept)
    data: bytes | mmap.mmap  # the shard's bytes, held so that `flat` and `view` stay valid
    flat: np.ndarray  # the same bytes as uint8
    view: memoryview  # and as a memoryview (the cheapest to slice and copy from)
    keys: list[str]
    exts: list[str]  # the image member of each sample ("" for a bad one)
    starts: list[int]  # where its image's bytes start in the shard (for pixels: after the .npy header)
    ends: list[int]
    sizes: list[tuple[int, int]]  # (h, w) of stored pixels; (0, 0) for an encoded image
    kinds: list[int]  # with `send_bytes`: the device decoder's kind of each compressed image
    labels: np.ndarray | None  # uint8 (samples, 80), checked; None for an unlabelled split
    problems: dict[int, str]  # sample -> why it cannot be used

    @classmethod
    def build(
        cls, shard: MappedShard, *, canvas_size: int, labelled: bool, send_bytes: bool = False
    ) -> ShardLayout:
        index, view = shard.table, memoryview(shard.data)
        count = len(index.keys)
        exts, starts, ends = [""] * count, [0] * count, [0] * count
        sizes, kinds = [(0, 0)] * count, [0] * count
        label_spans: list[tuple[int, int, int]] = []  # (sample, start, end) of each labels member
        problems: dict[int, str] = {}
        headers: dict[bytes, NpyArray] = {}  # .npy headers met, checked: most images share a shape
        bounds, first = index.bounds.tolist(), 0  # each member's (start, end), samples in order
        for i, (key, members) in enumerate(zip(index.keys, index.exts, strict=True)):
            first += len(members)
            try:
                ext = image_extension(key, members)
                start, end = bounds[first - len(members) + members.index(ext)]
                if send_bytes:
                    _, kinds[i] = compressed_image(Sample(key, {ext: view[start:end]}))
                elif ext == EXT_PIXELS:
                    sizes[i], start = _pixels(view[start:end], start, canvas_size, headers)
                else:
                    check_pixel_count(view[start:end], ext)
                if labelled:
                    if EXT_LABELS not in members:
                        raise BadSample(f"no .{EXT_LABELS} member (this split should be labelled)")
                    label_spans.append((i, *bounds[first - len(members) + members.index(EXT_LABELS)]))
            except BadSample as exc:
                problems[i] = str(exc)
                continue
            exts[i], starts[i], ends[i] = ext, start, end
        flat = np.frombuffer(shard.data, dtype=np.uint8)
        labels = _labels(flat, label_spans, count, problems) if labelled else None
        for i in problems:
            exts[i] = ""
        return cls(
            shard.stamp,
            shard.data,
            flat,
            view,
            index.keys,
            exts,
            starts,
            ends,
            sizes,
            kinds,
            labels,
            problems,
        )

    def check(self, i: int) -> None:
        """Raise BadSample when sample `i` cannot be used."""
        problem = self.problems.get(i)
        if problem is not None:
            raise BadSample(problem)

    def fill(self, i: int, canvases: np.ndarray, row: int, canvas_bytes: memoryview) -> tuple[int, int]:
        """Write sample `i`'s image (checked: `check`) into `canvases[row]`; its (h, w). BadSample when
        an encoded image does not decode. `canvas_bytes`: the same memory as `canvases` (uint8
        (n, S, S, 3), C order) as bytes, through which an image as wide as the canvas is copied
        whole (a fifth of the cost of numpy's strided assignment, for 4 images in 5 at 224 px)."""
        ext = self.exts[i]
        if ext == EXT_PIXELS:
            self.copy_pixels([i], [row], canvases, canvas_bytes)
            return self.sizes[i]
        return decode_image_to_canvas(self.image(i), ext, canvases[row], checked=True)

    def copy_pixels(
        self, samples: list[int], rows: list[int], canvases: np.ndarray, canvas_bytes: memoryview
    ) -> None:
        """`fill` for each sample of `samples` that holds pixels (checked), into its row of `rows`;
        the others are left alone. One loop per shard and batch, its names bound once."""
        exts, sizes, starts, flat, view = self.exts, self.sizes, self.starts, self.flat, self.view
        side = canvases.shape[2]
        stride = side * side * 3
        for i, row in zip(samples, rows, strict=True):
            if exts[i] != EXT_PIXELS:
                continue
            height, width = sizes[i]
            start, size = starts[i], height * width * 3
            if width == side:
                at = row * stride
                canvas_bytes[at : at + size] = view[start : start + size]
            else:
                canvases[row, :height, :width] = flat[start : start + size].reshape(height, width, 3)

    def image(self, i: int) -> memoryview:
        """Sample `i`'s image member's bytes (for pixels: the array's bytes alone)."""
        return self.view[self.starts[i] : self.ends[i]]


def _pixels(
    member: memoryview, start: int, canvas_size: int, headers: dict[bytes, NpyArray]
) -> tuple[tuple[int, int], int]:
    """((h, w), where the pixels start in the shard) of a `.pixels.npy` member at `start`."""
    head = bytes(member[: 10 + (member[8] | member[9] << 8)]) if len(member) >= 10 else b""
    layout = headers.get(head)
    if layout is None or len(member) != layout.offset + math.prod(layout.shape):
        try:
            layout = pixels_layout(member, canvas_size)
        except ValueError as exc:
            raise BadSample(str(exc)) from None
        headers[head] = layout
    return (layout.shape[0], layout.shape[1]), start + layout.offset


def _labels(
    flat: np.ndarray, spans: list[tuple[int, int, int]], count: int, problems: dict[int, str]
) -> np.ndarray:
    """The checked multi-hot rows of every sample, from its labels member's (sample, start, end);
    a sample whose member is not 80 zeros and ones behind the one header `encode_labels` writes
    gets the message `decode_labels` gives into `problems`."""
    rows = np.zeros((count, NUM_CLASSES), np.uint8)
    if not spans:
        return rows
    canonical = encode_labels(np.zeros(NUM_CLASSES, np.uint8))
    header = len(canonical) - NUM_CLASSES
    table = np.array(spans, dtype=np.int64)
    usual = table[:, 2] - table[:, 1] == len(canonical)
    members = flat[table[usual, 1, None] + np.arange(len(canonical))]  # one gather for the shard
    good = (members[:, :header] == np.frombuffer(canonical[:header], np.uint8)).all(axis=1)
    good &= members[:, header:].max(axis=1, initial=0) <= 1
    rows[table[usual, 0][good]] = members[good, header:]
    checked = set(table[usual, 0][good].tolist())
    for i, start, end in spans:
        if i not in checked:
            try:
                rows[i] = decode_labels(flat[start:end].data)
            except ValueError as exc:
                problems[i] = str(exc)
    return rows
