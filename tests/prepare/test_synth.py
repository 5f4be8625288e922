"""The synthetic data set: challenge layout, determinism, label statistics, and labels that match pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cocoshard import NUM_CLASSES
from cocoshard.cli import main
from cocoshard.config import SynthConfig
from cocoshard.errors import UserError
from cocoshard.prepare.synth import (
    COLOURS,
    MARKER,
    OUTLINES,
    SHAPES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    Difficulty,
    class_probabilities,
    class_shape_colour,
    draw_image,
    generated_class_names,
    write_synthetic,
)
from cocoshard.pure.labels import parse_cls


def _files(root, folder, suffix):
    return sorted((root / folder).glob(f"*{suffix}"))


def test_layout_is_the_challenges(synth_root):
    train = _files(synth_root, TRAIN_IMAGES, ".jpg")
    labels = _files(synth_root, TRAIN_LABELS, ".cls")
    test = _files(synth_root, TEST_IMAGES, ".jpg")
    assert len(train) == len(labels) == 300 and len(test) == 40
    assert [p.stem for p in train] == [p.stem for p in labels]
    assert not {p.stem for p in train} & {p.stem for p in test}
    assert (
        len(_files(synth_root, TEST_LABELS, ".cls")) == 40
    )  # hidden answers, outside the challenge's folders
    assert all(len(p.stem) == 12 and p.stem.isdigit() for p in train + test)


def test_images_are_jpegs_shaped_like_the_challenges(synth_root):
    sizes = []
    for path in _files(synth_root, TRAIN_IMAGES, ".jpg") + _files(synth_root, TEST_IMAGES, ".jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
    widths, heights = np.array(sizes).T
    assert (np.maximum(widths, heights) == 224).all()
    assert (np.minimum(widths, heights) >= 36).all()
    portrait = (heights > widths).mean()
    assert 0.12 < portrait < 0.36  # 24% expected
    assert len(set(np.minimum(widths, heights))) > 20  # varied short sides, not one aspect ratio


def test_labels_are_one_to_six_classes_with_a_long_tail(synth_root):
    labels = [parse_cls(p.read_bytes()).ids for p in _files(synth_root, TRAIN_LABELS, ".cls")]
    per_image = np.array([len(ids) for ids in labels])
    assert per_image.min() >= 1 and per_image.max() <= 6
    assert 2.4 < per_image.mean() < 3.2
    counts = np.zeros(NUM_CLASSES)
    for ids in labels:
        counts[list(ids)] += 1
    assert counts.argmax() == 0
    assert counts[:10].sum() > 3 * counts[-10:].sum()
    metadata = json.loads((synth_root / MARKER).read_text())
    assert (
        metadata["status"] == "complete" and metadata["class_counts"]["train"] == counts.astype(int).tolist()
    )


def test_default_tail_keeps_the_rarest_class_learnable():
    # expected share of images holding each class, from the object-count and class distributions
    p = class_probabilities(Difficulty().tail)
    weights = np.array([0.20, 0.25, 0.20, 0.15, 0.12, 0.08])
    share = 1 - (weights[:, None] * (1 - p[None, :]) ** np.arange(1, 7)[:, None]).sum(axis=0)
    assert share.argmax() == 0 and share.min() >= 0.01
    assert np.allclose(class_probabilities(0.0), 1 / NUM_CLASSES)


def test_every_class_is_a_distinct_shape_and_colour():
    pairs = {class_shape_colour(c) for c in range(NUM_CLASSES)}
    assert len(pairs) == NUM_CLASSES == len(SHAPES) * len(COLOURS)
    assert len(set(generated_class_names())) == NUM_CLASSES
    # frequent classes spread over colours: the ten most frequent use at least six colours
    assert len({class_shape_colour(c)[1] for c in range(10)}) >= 6
    for outline in OUTLINES.values():  # unit size: an object never exceeds its drawn diameter
        assert np.isclose(np.linalg.norm(outline, axis=1).max(), 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_drawn_labels_match_the_pixels(seed):
    # with no clutter the background is a muted gradient: each labelled colour must show up as a
    # patch of at least a small object's area, and no other object colour may appear
    rng = np.random.default_rng(seed)
    image, classes = draw_image(rng, 224, Difficulty(clutter=0.0))
    pixels = np.asarray(image, dtype=np.int32)
    colours = {class_shape_colour(c)[1] for c in classes}
    smallest = 0.25 * (224 / 8) ** 2  # a 1/8-size star covers about a quarter of its box
    for name, rgb in COLOURS.items():
        distance = np.abs(pixels - np.array(rgb)).max(axis=2)  # objects are shaded by up to 15%
        if name in colours:
            assert (distance < 60).sum() > smallest, name
        else:
            assert (distance < 45).sum() < 40, name


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    one = write_synthetic(SynthConfig(out=str(tmp_path / "a"), train=24, test=6, seed=5, workers=1))
    write_synthetic(SynthConfig(out=str(tmp_path / "b"), train=24, test=6, seed=5, workers=2))
    write_synthetic(SynthConfig(out=str(tmp_path / "c"), train=24, test=6, seed=6, workers=1))
    files = lambda root: {
        p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != MARKER
    }  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    assert one["class_counts"] == json.loads((tmp_path / "b" / MARKER).read_text())["class_counts"]


def test_rewriting_a_folder_replaces_the_old_set(tmp_path):
    write_synthetic(SynthConfig(out=str(tmp_path), train=20, test=4, seed=0, workers=1))
    write_synthetic(SynthConfig(out=str(tmp_path), train=8, test=0, seed=1, workers=1))
    assert len(_files(tmp_path, TRAIN_IMAGES, ".jpg")) == len(_files(tmp_path, TRAIN_LABELS, ".cls")) == 8
    assert not _files(tmp_path, TEST_IMAGES, ".jpg")


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not written by cocoshard synth"):
        write_synthetic(SynthConfig(out=str(tmp_path), train=4, test=0))
    assert (tmp_path / "images" / "photo.jpg").read_bytes() == b"precious"


def test_difficulty_knobs_are_checked_and_used(tmp_path):
    with pytest.raises(UserError):
        write_synthetic(SynthConfig(out=str(tmp_path), train=2, min_scale=0.5, max_scale=0.2))
    flat = write_synthetic(SynthConfig(out=str(tmp_path), train=200, test=0, tail=0.0, workers=1))
    counts = np.array(flat["class_counts"]["train"])
    assert counts.max() < 4 * max(counts.mean(), 1)  # balanced classes: no head
    assert flat["difficulty"]["tail"] == 0.0


def test_cli(tmp_path):
    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path),
                "--train",
                "10",
                "--test",
                "3",
                "--workers",
                "1",
                "--clutter",
                "0.5",
            ]
        )
        == 0
    )
    assert len(_files(tmp_path, TRAIN_IMAGES, ".jpg")) == 10
    assert json.loads((tmp_path / MARKER).read_text())["difficulty"]["clutter"] == 0.5
    assert main(["synth", "--out", str(tmp_path), "--min-scale", "0.5", "--max-scale", "0.4"]) == 2


def test_rotation_zero_keeps_shapes_upright():
    # an upright square fills its bounding box; turned by a random angle it mostly does not
    def square_fill(rotation):
        fills = []
        for seed in range(400):
            image, classes = draw_image(
                np.random.default_rng(seed), 224, Difficulty(clutter=0.0, tail=0.0, rotation=rotation)
            )
            colours = [class_shape_colour(c)[1] for c in classes]
            for c in classes:
                shape, colour = class_shape_colour(c)
                if shape == "square" and colours.count(colour) == 1:
                    near = np.abs(np.asarray(image, np.int32) - np.array(COLOURS[colour])).max(axis=2) < 60
                    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
                    fills.append(near.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
            if len(fills) >= 8:
                return np.array(fills)
        raise AssertionError("too few squares drawn")

    assert square_fill(0.0).min() > 0.85
    assert np.median(square_fill(180.0)) < 0.8
    with pytest.raises(UserError):
        SynthConfig(rotation=200)  # the rule lives in the config, checked when it is made


def test_colour_statistics_alone_do_not_name_the_classes(synth_root):
    # score each class by how many pixels of its colour the image holds: the best a model that
    # sees colour but not shape can do. It must stay far below a model that binds shape to colour.
    from cocoshard.pure.metrics import mean_average_precision

    palette = np.array(list(COLOURS.values()))
    colour_of = [list(COLOURS).index(class_shape_colour(c)[1]) for c in range(NUM_CLASSES)]
    scores, labels = [], []
    for path in _files(synth_root, TRAIN_IMAGES, ".jpg"):
        pixels = np.asarray(Image.open(path), np.int32)[::2, ::2].reshape(-1, 1, 3)
        counts = (np.abs(pixels - palette[None]).max(axis=2) < 50).sum(axis=0)
        scores.append(counts[colour_of])
        ids = parse_cls((synth_root / TRAIN_LABELS / f"{path.stem}.cls").read_bytes()).ids
        labels.append(np.isin(np.arange(NUM_CLASSES), ids))
    colour_only = mean_average_precision(np.array(scores, float), np.array(labels))
    assert 0.05 < colour_only < 0.3, colour_only
