"""The challenge's input files: where they are (either layout) and which image goes with which labels.

    ms-coco/images/train-resized/train-resized/KEY.jpg   or  ms-coco/images/train/KEY.jpg
    ms-coco/labels/train/train/KEY.cls                   or  ms-coco/labels/train/KEY.cls
    ms-coco/images/test-resized/test-resized/KEY.jpg     or  ms-coco/images/test/KEY.jpg

Every file in those folders is an input: a file not named as an image (`prepare.images.IMAGE_SUFFIXES`,
the list predict and evaluate use too) is rejected with its reason, and an image's format is
recognised by its content when it is decoded (`cocoshard.prepare.pack`), so a stray file is
reported rather than skipped. What
cannot be paired or parsed is rejected here with its reason; images without a `.cls` are not
training samples (as in the challenge's Dataset) and are only counted.

Inputs are untrusted: each is read through `cocoshard.input_files.read_input` (regular files only,
never more than a size bound); anything else is rejected with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cocoshard import CLASSES, NUM_CLASSES
from cocoshard.errors import UserError
from cocoshard.input_files import InputError, parse_json, read_input, shown_path
from cocoshard.prepare.images import name_problem
from cocoshard.pure.format import key_problem
from cocoshard.pure.labels import LabelError, parse_cls

# Where each input lives under --root, in the order searched (the zip's layout, then the flat one).
LAYOUTS = {
    "train_images": ("images/train-resized/train-resized", "images/train"),
    "train_labels": ("labels/train/train", "labels/train"),
    "test_images": ("images/test-resized/test-resized", "images/test"),
}
LABEL_SUFFIX = ".cls"
SYNTHETIC_MARKER = "synthetic.json"  # written by cocoshard.prepare.synth, with the names of its classes
# Bounds on what one input may cost. The challenge's files are ~12 KB images of <= 224 x 224 px and
# .cls files of a few bytes; the bounds leave room for any real photo and refuse a bomb.
MAX_IMAGE_BYTES = 64 * 2**20
MAX_LABEL_BYTES = 64 * 2**10
MAX_IMAGE_PIXELS = 64 * 2**20


@dataclass
class Sources:
    train_images: Path
    train_labels: Path
    test_images: Path | None


@dataclass
class Inventory:
    labelled: list[tuple[str, Path, Path, tuple[int, ...]]] = field(
        default_factory=list
    )  # key, image, .cls, ids
    test: list[tuple[str, Path]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    deduplicated: list[str] = field(default_factory=list)


def _looked_for(root: Path, kind: str) -> str:
    return " or ".join(str(root / rel) for rel in LAYOUTS[kind])


def _holds_layout(folder: Path) -> bool:
    return any((folder / rel).is_dir() for rel in LAYOUTS["train_images"]) and any(
        (folder / rel).is_dir() for rel in LAYOUTS["train_labels"]
    )


def _root_hint(base: Path) -> str:
    """`--root` for the challenge folder near `base`: one of its parents (`--root ms-coco/images`) or a
    folder inside it (`--root .` beside the unzipped ms-coco), as the flag to give."""
    near = list(base.absolute().parents)[:3]
    if base.is_dir():
        near += sorted(p for p in base.iterdir() if p.is_dir())[:500]
    for folder in near:
        if _holds_layout(folder):
            relative = os.path.relpath(folder)  # as the user gave --root: relative, or absolute
            far = base.is_absolute() or relative.startswith(os.pardir + os.sep + os.pardir)
            shown = folder if far else relative
            return f"; the challenge folder is {shown}: give --root {shown}"
    return ""


def find_sources(
    root: str,
    train_images: str | None = None,
    train_labels: str | None = None,
    test_images: str | None = None,
) -> Sources:
    """The three input folders: explicit ones as given, the others found under `root` (either layout)."""
    base = Path(root)
    explicit = {"train_images": train_images, "train_labels": train_labels, "test_images": test_images}
    if not all(explicit.values()) and not base.is_dir():
        raise UserError(
            f"--root {base} is not a folder: expected the challenge folder holding "
            f"{', '.join(rel for rels in LAYOUTS.values() for rel in rels[:1])} (or the flat layout "
            f"{', '.join(rels[1] for rels in LAYOUTS.values())}){_root_hint(base)}"
        )
    found: dict[str, Path | None] = {}
    for kind, given in explicit.items():
        if given:
            if not Path(given).is_dir():
                raise UserError(f"--{kind.replace('_', '-')} {given} is not a folder")
            found[kind] = Path(given).resolve()
        else:
            found[kind] = next(
                ((base / rel).resolve() for rel in LAYOUTS[kind] if (base / rel).is_dir()), None
            )
    for kind in ("train_images", "train_labels"):
        if found[kind] is None:
            raise UserError(
                f"no {kind.replace('_', ' ')} folder under --root {base}: looked for "
                f"{_looked_for(base, kind)}{_root_hint(base)}"
            )
    return Sources(found["train_images"], found["train_labels"], found["test_images"])


def _entries(folder: Path, rejected: list[dict[str, str]]) -> list[Path]:
    """The files of an input folder; folders inside are skipped, anything not a regular file is rejected."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            continue
        if entry.is_file():  # follows symlinks: a link to a regular file is fine
            files.append(entry)
        else:
            kind = (
                "a broken symlink"
                if entry.is_symlink() and not entry.exists()
                else "a pipe, device or socket"
            )
            rejected.append({"path": shown_path(entry), "reason": f"not a regular file ({kind})"})
    return files


def _images_by_key(folder: Path, rejected: list[dict[str, str]]) -> dict[str, Path]:
    """Every file of an image folder by key (its stem); the content is checked later, by decoding."""
    images: dict[str, Path] = {}
    for path in _entries(folder, rejected):
        key = path.stem
        problem = (
            name_problem(path)
            or key_problem(key)
            or (f"another file has the same key {key!r}: {images[key].name}" if key in images else None)
        )
        if problem:
            rejected.append({"path": shown_path(path), "reason": problem})
        else:
            images[key] = path
    return images


def _labels_by_key(folder: Path, rejected: list[dict[str, str]]) -> dict[str, Path]:
    labels: dict[str, Path] = {}
    for path in _entries(folder, rejected):
        problem = None if path.suffix == LABEL_SUFFIX else f"not a {LABEL_SUFFIX} labels file"
        problem = problem or key_problem(path.stem)
        if problem:
            rejected.append({"path": shown_path(path), "reason": problem})
        else:
            labels[path.stem] = path
    return labels


def _pair(key: str, image: Path, cls: Path, inventory: Inventory) -> None:
    try:
        parsed = parse_cls(read_input(cls, MAX_LABEL_BYTES))
    except (InputError, LabelError) as exc:
        reason = str(exc)
        inventory.rejected.append({"path": str(cls), "reason": reason})
        inventory.rejected.append(
            {"path": str(image), "reason": f"its labels file {cls.name} was rejected: {reason}"}
        )
        return
    if parsed.duplicates:
        inventory.deduplicated.append(str(cls))
    inventory.labelled.append((key, image, cls, parsed.ids))


def take_inventory(sources: Sources) -> Inventory:
    """Pair images with labels; reject what cannot be paired or parsed; images are decoded later."""
    inventory = Inventory()
    images = _images_by_key(sources.train_images, inventory.rejected)
    labels = _labels_by_key(sources.train_labels, inventory.rejected)
    if not images:
        raise UserError(f"no image files in {sources.train_images}")
    if not labels:
        raise UserError(f"no {LABEL_SUFFIX} files in {sources.train_labels}")
    for key, cls in sorted(labels.items()):
        if key in images:
            _pair(key, images[key], cls, inventory)
        else:
            inventory.rejected.append(
                {"path": str(cls), "reason": f"no image named {key}.* in {sources.train_images}"}
            )
    inventory.unlabelled = [str(images[key]) for key in sorted(set(images) - set(labels))]
    if sources.test_images is not None:
        inventory.test = sorted(_images_by_key(sources.test_images, inventory.rejected).items())
    return inventory


def dataset_class_names(root: str | Path) -> list[str]:
    """The 80 class names: a synthetic set's own (from its synthetic.json), else the challenge's."""
    try:
        names = parse_json(read_input(Path(root) / SYNTHETIC_MARKER, MAX_LABEL_BYTES).decode()).get("classes")
    except (InputError, UnicodeDecodeError, AttributeError):
        return list(CLASSES)
    valid = isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names)
    return names if valid else list(CLASSES)
