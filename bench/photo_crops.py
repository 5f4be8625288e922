"""The default benchmark set: random crops of real COCO photos, at the challenge's size and quality.

    $ python bench/photo_crops.py --out /tmp/crops --images 4000

Generated images decode and augment about twice as fast as photographs (flat colours compress
well and entropy-decode quickly), so a benchmark on them flatters every pipeline. This set is made
of the repository's real photos (tests/data/coco-sample): each image is a random crop of one of
them (a quarter to all of its area, any aspect ratio the challenge has), resized so its long side
is 224 px with Lanczos, saved as JPEG quality 90 like the challenge's files, mirrored at random.
Its labels are the source photo's `.cls` file (a crop may cut an object out: the labels are for
measuring loaders, not for training). The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "tests" / "data" / "coco-sample"
IMAGES, LABELS = Path("images/train-resized/train-resized"), Path("labels/train/train")
LONG_SIDE, QUALITY = 224, 90


def _short_side_ratio(rng: np.random.Generator) -> float:
    """The challenge's mix: mostly 4:3, some square and 16:9, a few down to 36/224."""
    pick = rng.random()
    if pick < 0.45:
        return 3 / 4
    if pick < 0.60:
        return 1.0
    if pick < 0.70:
        return 9 / 16
    return float(rng.uniform(36 / 224, 1.0))


def crop_photo(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random crop of `photo`, resized to a 224-px long side, portrait about a quarter of the time."""
    width, height = photo.size
    ratio = _short_side_ratio(rng)
    portrait = rng.random() < 0.24
    aspect = ratio if portrait else 1 / ratio  # width / height of the crop
    area = width * height * rng.uniform(0.25, 1.0)
    crop_w = int(min(width, max(8, round(np.sqrt(area * aspect)))))
    crop_h = int(min(height, max(8, round(crop_w / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    scale = LONG_SIDE / max(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    out = crop.resize(size, Image.Resampling.LANCZOS)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def write_photo_crops(out: str | Path, images: int, seed: int = 0, source: Path = SOURCE) -> Path:
    """Write `images` crops and their labels into `out` in the challenge's layout; returns `out`."""
    root = Path(out)
    shutil.rmtree(root, ignore_errors=True)
    (root / IMAGES).mkdir(parents=True)
    (root / LABELS).mkdir(parents=True)
    labelled = sorted(
        p for p in (source / LABELS).glob("*.cls") if (source / IMAGES / f"{p.stem}.jpg").is_file()
    )
    photos = [
        (Image.open(source / IMAGES / f"{p.stem}.jpg").convert("RGB"), p.read_bytes()) for p in labelled
    ]
    rng = np.random.default_rng(seed)
    for index in range(images):
        photo, labels = photos[int(rng.integers(len(photos)))]
        buffer = io.BytesIO()
        crop_photo(photo, rng).save(buffer, format="JPEG", quality=QUALITY)
        key = f"{index + 1:012d}"
        (root / IMAGES / f"{key}.jpg").write_bytes(buffer.getvalue())
        (root / LABELS / f"{key}.cls").write_bytes(labels)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (challenge layout)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_photo_crops(args.out, args.images, args.seed))


if __name__ == "__main__":
    main()
