"""A learnable synthetic stand-in for the challenge data, drawn procedurally in its exact layout.

    $ cocoshard synth --out synthetic --train 4000 --test 500 --seed 0

Each of the 80 classes is one object: a shape (disc, square, triangle, star, plus, crescent,
half-disc, heart, ell, arrow) in a colour (red, orange, yellow, green, cyan, blue, magenta, white).
An image holds 1-6 objects, each small (1/8 to 1/3 of the long side by default), at a random
position, scale and rotation, on a cluttered background: a muted gradient, blotchy and pixel noise,
and distractor strokes (lines and arcs, some in the objects' own colours, some drawn over them).
Colour alone does not name a class and shape alone does not either, and several objects share an
image, so a classifier has to bind shape and colour at the same place: a small spatial task, not a
colour histogram. Class frequencies follow a power law (class 0 the most frequent); with the
default tail the rarest class still appears in about 1% of images.

Layout written under OUT (the challenge's, plus two extras):
    images/train-resized/train-resized/KEY.jpg   labels/train/train/KEY.cls
    images/test-resized/test-resized/KEY.jpg     labels/test/test/KEY.cls  (the answers the
                                                 challenge keeps hidden: lets a demo score itself)
    synthetic.json                               settings, class names, class counts
Images are JPEG, long side `size` (224), short side 36/224 of it up to all of it, 24% portrait.
Every image depends only on (seed, split, index): the same seed gives the same bytes, whatever
the number of worker processes.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cocoshard import NUM_CLASSES
from cocoshard.atomic import TMP_PREFIX, atomic_write_text, remove_stale_temporaries
from cocoshard.config import SynthConfig
from cocoshard.errors import UserError
from cocoshard.folder_lock import LOCK_FILE, folder_lock
from cocoshard.output_paths import check_output_folder
from cocoshard.prepare.pool import map_in_workers
from cocoshard.prepare.sources import SYNTHETIC_MARKER
from cocoshard.pure.labels import format_cls
from cocoshard.seeds import numpy_rng
from cocoshard.settings import print_config

SHAPES = ("disc", "square", "triangle", "star", "plus", "crescent", "half-disc", "heart", "ell", "arrow")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 135, 10),
    "yellow": (240, 220, 30),
    "green": (30, 165, 55),
    "cyan": (20, 195, 215),
    "blue": (35, 65, 225),
    "magenta": (225, 40, 190),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
OBJECT_COUNT_WEIGHTS = (0.20, 0.25, 0.20, 0.15, 0.12, 0.08)  # 1..6 objects, mean 2.98

TRAIN_IMAGES = Path("images/train-resized/train-resized")
TRAIN_LABELS = Path("labels/train/train")
TEST_IMAGES = Path("images/test-resized/test-resized")
TEST_LABELS = Path("labels/test/test")
MARKER = SYNTHETIC_MARKER
TEST_KEY_OFFSET = 1_000_000_000  # test keys never collide with train keys
_KEY_FILE = re.compile(r"^[0-9]{12}\.(jpg|cls)$")
_CHUNK = 32


@dataclass(frozen=True)
class Difficulty:
    """The knobs that make the task harder or easier."""

    min_scale: float = 1 / 8  # smallest object, as a fraction of the long side
    max_scale: float = 1 / 3  # largest object, as a fraction of the long side
    clutter: float = 1.0  # multiplies background noise and the number of distractor strokes
    tail: float = 0.8  # class frequency ~ (class + 1) ** -tail; 0 gives balanced classes
    rotation: float = 180.0  # objects turn by up to this many degrees either way; 0 keeps them upright


# ----------------------------------------------------------------------------------- classes


def class_shape_colour(class_id: int) -> tuple[str, str]:
    """(shape, colour) of a class. Colour = (3 * (id // 10) + id) mod 8 spreads the frequent classes
    over every colour and shape, so neither attribute alone predicts frequency."""
    shape = class_id % len(SHAPES)
    colour = (3 * (class_id // len(SHAPES)) + class_id) % len(COLOURS)
    return SHAPES[shape], COLOUR_NAMES[colour]


def generated_class_names() -> list[str]:
    """'red disc', 'orange square', ... in class-id order."""
    return [" ".join(reversed(class_shape_colour(c))) for c in range(NUM_CLASSES)]


def class_probabilities(tail: float) -> np.ndarray:
    """Probability that one drawn object is of each class: a power law, class 0 first."""
    weights = np.arange(1, NUM_CLASSES + 1, dtype=np.float64) ** -tail
    return weights / weights.sum()


def _normalise(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding box and scale so that the farthest vertex is at distance 1."""
    centred = points - (points.min(axis=0) + points.max(axis=0)) / 2
    return centred / np.linalg.norm(centred, axis=1).max()


def _arc(
    radius: float, start: float, stop: float, count: int, centre: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    angles = np.linspace(start, stop, count)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], axis=1)


def _crescent() -> np.ndarray:
    offset, inner = 0.5, 0.8
    x = (1 + offset**2 - inner**2) / (2 * offset)
    y = np.sqrt(1 - x**2)
    outer_angle, inner_angle = np.arctan2(y, x), np.arctan2(y, x - offset)
    outer = _arc(1.0, outer_angle, 2 * np.pi - outer_angle, 28)
    bite = _arc(inner, 2 * np.pi - inner_angle, inner_angle, 20, centre=(offset, 0.0))
    return np.concatenate([outer, bite])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    return np.stack(
        [16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
        axis=1,
    )


def _shape_outlines() -> dict[str, np.ndarray]:
    """Each shape as a polygon in unit coordinates (y down, as in images)."""
    star_angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    a = 0.3
    raw = {
        "disc": _arc(1.0, 0, 2 * np.pi, 40)[:-1],
        "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
        "triangle": _arc(1.0, -np.pi / 2, 3 * np.pi / 2, 4)[:-1],
        "star": np.stack([star_radii * np.cos(star_angles), star_radii * np.sin(star_angles)], axis=1),
        "plus": np.array(
            [
                (-a, -1),
                (a, -1),
                (a, -a),
                (1, -a),
                (1, a),
                (a, a),
                (a, 1),
                (-a, 1),
                (-a, a),
                (-1, a),
                (-1, -a),
                (-a, -a),
            ]
        ),
        "crescent": _crescent(),
        "half-disc": np.concatenate([_arc(1.0, 0, np.pi, 24), [[-1.0, 0.0]]]),
        "heart": _heart(),
        "ell": np.array([(0, 0), (0.4, 0), (0.4, 1.1), (1.0, 1.1), (1.0, 1.5), (0, 1.5)]),
        "arrow": np.array(
            [(-1, -0.18), (0.2, -0.18), (0.2, -0.55), (1, 0), (0.2, 0.55), (0.2, 0.18), (-1, 0.18)]
        ),
    }
    return {name: _normalise(points.astype(np.float64)) for name, points in raw.items()}


OUTLINES = _shape_outlines()


# ----------------------------------------------------------------------------------- drawing


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height): long side `size`; short side mostly 4:3, some square, 16:9 or anything
    down to 36/224 of it."""
    pick = rng.random()
    if pick < 0.45:
        ratio = 3 / 4
    elif pick < 0.60:
        ratio = 1.0
    elif pick < 0.70:
        ratio = 9 / 16
    else:
        ratio = rng.uniform(36 / 224, 1.0)
    short = max(1, int(round(size * ratio)))
    return (short, size) if rng.random() < 0.24 else (size, short)


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    return np.array(rgb, dtype=np.float32) * 255


def _background(rng: np.random.Generator, width: int, height: int, clutter: float) -> Image.Image:
    """A muted two-colour gradient in a random direction, with blotchy and per-pixel noise."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, stop = _muted_colour(rng), _muted_colour(rng)
    pixels = start + ramp[..., None] * (stop - start)
    coarse = rng.normal(128, 40, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels += (np.asarray(blotches, dtype=np.float32) - 128) * 0.5 * clutter
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * 6 * clutter
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _stroke_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Half the strokes borrow an object colour, so that colour alone cannot name a class."""
    if rng.random() < 0.5:
        base = np.array(COLOURS[COLOUR_NAMES[rng.integers(len(COLOURS))]], dtype=np.float64)
    else:
        base = _muted_colour(rng)
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 12, 3), 0, 255))


def _strokes(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, count: int
) -> None:
    """Distractors: long thin polylines and open arcs, never closed shapes."""
    unit = max(width, height) / 224
    for _ in range(count):
        line_width = max(1, int(round(rng.integers(1, 4) * unit)))
        colour = _stroke_colour(rng)
        if rng.random() < 0.6:
            points = [
                (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
                for _ in range(int(rng.integers(2, 5)))
            ]
            draw.line(points, fill=colour, width=line_width, joint="curve")
        else:
            x0, y0 = rng.uniform(-0.2, 0.8) * width, rng.uniform(-0.2, 0.8) * height
            extent = rng.uniform(0.2, 0.7) * max(width, height)
            start = float(rng.uniform(0, 360))
            draw.arc(
                [x0, y0, x0 + extent, y0 + extent],
                start,
                start + float(rng.uniform(60, 200)),
                fill=colour,
                width=line_width,
            )


def _object_colour(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour], dtype=np.float64) * rng.uniform(0.85, 1.05)
    return tuple(int(v) for v in np.clip(base + rng.normal(0, 10, 3), 0, 255))


def _place(
    rng: np.random.Generator, radius: float, width: int, height: int, placed: list[tuple[float, float, float]]
) -> tuple[float, float] | None:
    """A centre keeping the object inside the image and mostly clear of the others, or None."""
    for _ in range(30):
        x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        if all(np.hypot(x - px, y - py) > 0.8 * (radius + pr) for px, py, pr in placed):
            return x, y
    return None


def draw_image(
    rng: np.random.Generator, size: int, difficulty: Difficulty
) -> tuple[Image.Image, tuple[int, ...]]:
    """One image and the distinct classes drawn in it (at least one)."""
    width, height = _image_size(rng, size)
    image = _background(rng, width, height, difficulty.clutter)
    draw = ImageDraw.Draw(image)
    strokes = int(rng.poisson(7 * difficulty.clutter))
    _strokes(draw, rng, width, height, strokes)
    objects = 1 + int(rng.choice(len(OBJECT_COUNT_WEIGHTS), p=OBJECT_COUNT_WEIGHTS))
    classes = rng.choice(NUM_CLASSES, size=objects, p=class_probabilities(difficulty.tail))
    placed: list[tuple[float, float, float]] = []
    drawn: set[int] = set()
    for class_id in classes.tolist():
        diameter = size * np.exp(rng.uniform(np.log(difficulty.min_scale), np.log(difficulty.max_scale)))
        radius = min(diameter, min(width, height) - 2) / 2
        centre = _place(rng, radius, width, height, placed)
        if centre is None and drawn:
            continue
        centre = centre or (width / 2, height / 2)
        shape, colour = class_shape_colour(class_id)
        turn = np.radians(rng.uniform(-difficulty.rotation, difficulty.rotation))
        rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        points = OUTLINES[shape] @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points.tolist()], fill=_object_colour(rng, colour))
        placed.append((centre[0], centre[1], radius))
        drawn.add(class_id)
    _strokes(draw, rng, width, height, int(rng.poisson(1.5 * difficulty.clutter)))
    return image, tuple(sorted(drawn))


# ----------------------------------------------------------------------------------- writing


def _key(split: str, index: int) -> str:
    return f"{index + 1 if split == 'train' else TEST_KEY_OFFSET + index:012d}"


def _write_whole(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a killed run never leaves half a file under a
    final name. Unlike `atomic_write_bytes` there is no fsync per file: it made drawing 3x slower
    on a busy disk, and a generated set lost to a power cut is simply drawn again."""
    temporary = path.with_name(f"{TMP_PREFIX}{path.name}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # a killed run's, or a link planted there: never written through
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _write_chunk(task: tuple[str, str, int, int, int, int, int, dict[str, float]]) -> list[tuple[int, ...]]:
    """Draw and write images [start, stop) of one split; returns their classes."""
    out, split, start, stop, seed, size, quality, knobs = task
    difficulty = Difficulty(**knobs)
    images, labels = (TRAIN_IMAGES, TRAIN_LABELS) if split == "train" else (TEST_IMAGES, TEST_LABELS)
    written = []
    for index in range(start, stop):
        rng = numpy_rng(seed, 0 if split == "train" else 1, index)
        image, classes = draw_image(rng, size, difficulty)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        key = _key(split, index)
        _write_whole(Path(out) / images / f"{key}.jpg", buffer.getvalue())
        _write_whole(Path(out) / labels / f"{key}.cls", format_cls(classes).encode())
        written.append(classes)
    return written


def _refuse_foreign(out: Path) -> None:
    """Refuse a folder this module did not write (nothing in it is touched)."""
    check_output_folder(out, "--out")
    if (
        out.is_dir()
        and any(entry.name != LOCK_FILE for entry in out.iterdir())
        and not (out / MARKER).is_file()
    ):
        raise UserError(
            f"--out {out} is not empty and holds no {MARKER}: it was not written by cocoshard synth; "
            f"choose an empty or new folder"
        )


def _prepare_folder(out: Path) -> None:
    """Refuse a folder this module did not write; clear the images and labels of an earlier run."""
    _refuse_foreign(out)
    for folder in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        (out / folder).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / folder)
        for entry in (out / folder).iterdir():
            if _KEY_FILE.match(entry.name):
                entry.unlink()


def _class_counts(labels: Sequence[tuple[int, ...]]) -> list[int]:
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for classes in labels:
        counts[list(classes)] += 1
    return counts.tolist()


def write_synthetic(cfg: SynthConfig, progress: bool = False) -> dict[str, Any]:
    """Draw `cfg.train` labelled and `cfg.test` unlabelled images into `cfg.out` in the challenge layout.

    The difficulty knobs: object size range as fractions of the long side (`min_scale`,
    `max_scale`), `clutter` (background noise and distractor strokes; 0 gives a clean gradient),
    `tail` (steepness of the class-frequency power law; 0 gives balanced classes) and `rotation`
    (largest turn of an object in degrees; 0 keeps shapes upright, which needs less data). Returns
    the metadata also saved as `out/synthetic.json` (settings, class names, class counts).
    """
    root = Path(cfg.out)
    _refuse_foreign(root)  # before the lock: a folder refused is left as it was
    with folder_lock(root, "cocoshard synth"):  # a second synth into the same folder is refused at once
        _prepare_folder(root)
        return _write_all(root, cfg, progress)


def _write_all(root: Path, cfg: SynthConfig, progress: bool) -> dict[str, Any]:
    difficulty = Difficulty(cfg.min_scale, cfg.max_scale, cfg.clutter, cfg.tail, cfg.rotation)
    train, test, seed, size, quality = cfg.train, cfg.test, cfg.seed, cfg.size, cfg.quality
    settings = {
        "seed": seed,
        "train": train,
        "test": test,
        "size": size,
        "quality": quality,
        "difficulty": asdict(difficulty),
    }
    atomic_write_text(root / MARKER, json.dumps({"status": "writing", **settings}, indent=1))
    tasks = [
        (str(root), split, start, min(start + _CHUNK, count), seed, size, quality, asdict(difficulty))
        for split, count in (("train", train), ("test", test))
        for start in range(0, count, _CHUNK)
    ]
    chunks = map_in_workers(
        _write_chunk,
        tasks,
        workers=cfg.workers,
        sizes=[t[3] - t[2] for t in tasks],
        progress=progress,
        desc="synth",
    )
    labels = {"train": [], "test": []}
    for task, chunk in zip(tasks, chunks, strict=True):
        labels[task[1]].extend(chunk)
    metadata = {
        "status": "complete",
        **settings,
        "classes": generated_class_names(),
        "class_counts": {split: _class_counts(found) for split, found in labels.items()},
        "labels_per_image": {
            split: float(np.mean([len(c) for c in found])) if found else 0.0
            for split, found in labels.items()
        },
    }
    atomic_write_text(root / MARKER, json.dumps(metadata, indent=1))
    return metadata


def run(cfg: SynthConfig) -> int:
    """`cocoshard synth`: write the data set and summarise it."""
    from rich.console import Console

    print_config(cfg)
    metadata = write_synthetic(cfg, progress=True)
    counts = np.array(metadata["class_counts"]["train"])
    names = metadata["classes"]
    Console(stderr=True).print(
        f"wrote {cfg.train} train and {cfg.test} test images to {cfg.out} "
        f"({metadata['labels_per_image']['train']:.2f} labels per image; most frequent: "
        f"{names[counts.argmax()]} "
        f"in {counts.max()} images, rarest: {names[counts.argmin()]} in {counts.min()})",
        highlight=False,
    )
    return 0
