"""`cocoshard pack`, read back with nothing but tarfile and numpy: real COCO photos, a generated set,
every kind of bad input, byte-identical re-runs, and what an interrupted run leaves behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocoshard.cli import main
from cocoshard.prepare import pack

# ----------------------------------------------------------------------------------- reading back


def read_split(folder: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} for one split, asserting that no key appears twice."""
    manifest = json.loads((folder / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for entry in manifest["splits"][split]["shards"]:
        in_shard: dict[str, dict[str, bytes]] = {}
        with tarfile.open(folder / entry["name"]) as tar:
            for member in tar:
                key, field = member.name.split(".", 1)
                in_shard.setdefault(key, {})[field] = tar.extractfile(member).read()
        assert not set(in_shard) & set(samples), "a key in two shards"
        assert len(in_shard) == entry["samples"]
        samples.update(in_shard)
    return samples


def read_cls(path: Path) -> np.ndarray:
    """The statement's way: int() of every line, scattered into 80 zeros."""
    vector = np.zeros(80, dtype=np.uint8)
    vector[[int(line) for line in path.read_text().splitlines()]] = 1
    return vector


def challenge_folders(root: Path) -> tuple[Path, Path, Path]:
    return (
        root / "images/train-resized/train-resized",
        root / "labels/train/train",
        root / "images/test-resized/test-resized",
    )


def check_round_trip(shards: Path, root: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """Every labelled image once, labels equal to its .cls, source bytes kept, test unlabelled."""
    images, labels, test_images = challenge_folders(root)
    splits = {split: read_split(shards, split) for split in ("train", "val", "test")}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert not set(train) & set(val)
    assert set(train) | set(val) == {p.stem for p in labels.glob("*.cls")}
    for key, sample in {**train, **val}.items():
        assert np.array_equal(npy(sample["labels.npy"]), read_cls(labels / f"{key}.cls")), key
    assert set(test) == {p.stem for p in test_images.glob("*.jpg")}
    assert all("labels.npy" not in sample for sample in test.values())
    for key, sample in {**train, **val, **test}.items():
        source = (images if key not in test else test_images) / f"{key}.jpg"
        with Image.open(source) as image:
            if "jpg" in sample:
                assert sample["jpg"] == source.read_bytes(), key
            else:  # exactly the image's pixels, nothing around them
                assert np.array_equal(npy(sample["pixels.npy"]), np.asarray(image.convert("RGB"))), key
    return splits


def npy(data: bytes) -> np.ndarray:
    """A member read the way any NumPy user would read it."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def check_manifest(shards: Path, splits: dict[str, dict[str, dict[str, bytes]]]) -> dict:
    import hashlib

    manifest = json.loads((shards / "manifest.json").read_text())
    for split, samples in splits.items():
        entry = manifest["splits"][split]
        assert entry["samples"] == len(samples)
        for shard in entry["shards"]:
            data = (shards / shard["name"]).read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        if split != "test":
            counts = np.sum([npy(s["labels.npy"]) for s in samples.values()], axis=0)
            assert entry["class_counts"] == counts.tolist()
    return manifest


@pytest.mark.parametrize("fixture", ["sample_shards_jpeg", "sample_shards_raw"])
def test_coco_sample_round_trips(fixture, request, coco_sample):
    shards = request.getfixturevalue(fixture)
    splits = check_round_trip(shards, coco_sample)
    manifest = check_manifest(shards, splits)
    assert manifest["pixel_format"] == ("raw" if fixture.endswith("raw") else "jpeg")
    assert manifest["rejected"] == []
    assert manifest["unlabelled_images"]["count"] == 2
    assert len(splits["train"]) + len(splits["val"]) == 126 and len(splits["test"]) == 32
    # shards of 16 samples; the stratified split keeps every class with two images in both splits
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]][:-1] == [16] * (
        len(manifest["splits"]["train"]["shards"]) - 1
    )
    train, val = (np.array(manifest["splits"][s]["class_counts"]) for s in ("train", "val"))
    assert ((train > 0) & (val > 0))[train + val >= 2].all()


def test_both_formats_hold_the_same_split(sample_shards_jpeg, sample_shards_raw):
    for split in ("train", "val", "test"):
        jpeg, raw = read_split(sample_shards_jpeg, split), read_split(sample_shards_raw, split)
        assert list(jpeg) == list(raw)  # same keys in the same order
        for key in jpeg:
            assert (
                Image.open(io.BytesIO(jpeg[key]["jpg"])).size[::-1] == npy(raw[key]["pixels.npy"]).shape[:2]
            )


def test_grayscale_is_kept_as_jpeg_and_decoded_to_rgb_in_raw(
    sample_shards_jpeg, sample_shards_raw, coco_sample
):
    key = "000000000086"  # a grayscale (mode L) photo of the sample
    jpeg = {**read_split(sample_shards_jpeg, "train"), **read_split(sample_shards_jpeg, "val")}[key]
    raw = {**read_split(sample_shards_raw, "train"), **read_split(sample_shards_raw, "val")}[key]
    assert Image.open(io.BytesIO(jpeg["jpg"])).mode == "L"
    pixels = npy(raw["pixels.npy"])
    assert (
        pixels[:, :, 0].any()
        and (pixels[:, :, 0] == pixels[:, :, 1]).all()
        and (pixels[:, :, 1] == pixels[:, :, 2]).all()
    )


def test_train_is_shuffled_val_and_test_sorted(sample_shards_jpeg):
    train = list(read_split(sample_shards_jpeg, "train"))
    assert train != sorted(train)
    for split in ("val", "test"):
        keys = list(read_split(sample_shards_jpeg, split))
        assert keys == sorted(keys)


@pytest.mark.parametrize("fixture", ["synth_shards_jpeg", "synth_shards_raw"])
def test_generated_set_round_trips(fixture, request, synth_root):
    shards = request.getfixturevalue(fixture)
    splits = check_round_trip(shards, synth_root)
    manifest = check_manifest(shards, splits)
    assert len(splits["train"]) + len(splits["val"]) == 300 and len(splits["test"]) == 40
    assert 0.17 <= len(splits["val"]) / 300 <= 0.23
    assert manifest["classes"][0] == "red disc"  # a synthetic set names its own classes
    assert manifest["unlabelled_images"]["count"] == 0 and manifest["rejected"] == []


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("pixel_format", ["jpeg", "raw"])
def test_rerun_is_byte_identical(pixel_format, tmp_path, pack_dir, coco_sample):
    first = _shard_bytes(pack_dir(coco_sample, tmp_path / "a", format=pixel_format, shard_samples=40))
    again = _shard_bytes(pack_dir(coco_sample, tmp_path / "a", format=pixel_format, shard_samples=40))
    alone = _shard_bytes(
        pack_dir(coco_sample, tmp_path / "b", format=pixel_format, shard_samples=40, workers=1)
    )
    assert first == again == alone  # same input: same bytes, whatever the number of workers
    assert {name for name in first if name.endswith(".tar")} == {
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
        "test-000000.tar",
    }


def test_seed_changes_the_split(tmp_path, pack_dir, coco_sample, sample_shards_jpeg):
    other = pack_dir(coco_sample, tmp_path, seed=1, shard_samples=16)
    assert set(read_split(other, "val")) != set(read_split(sample_shards_jpeg, "val"))
    assert set(read_split(other, "test")) == set(read_split(sample_shards_jpeg, "test"))


def test_tar_headers_are_fixed(sample_shards_jpeg):
    with tarfile.open(next(sample_shards_jpeg.glob("train-*.tar"))) as tar:
        members = tar.getmembers()
    assert [m.name.split(".", 1)[1] for m in members[:2]] == ["jpg", "labels.npy"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }


def test_stale_shards_and_temporaries_are_removed(tmp_path, pack_dir, coco_sample):
    pack_dir(coco_sample, tmp_path, shard_samples=8)
    many = {p.name for p in tmp_path.glob("*.tar")}
    for name in ("train-000099.tar", ".tmp-train-000003.tar.abc", "notes.txt"):
        (tmp_path / name).write_bytes(b"old")
    pack_dir(coco_sample, tmp_path, shard_samples=64)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    listed = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in tmp_path.glob("*.tar")} == listed and len(listed) < len(many)
    assert not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / "notes.txt").read_bytes() == b"old"  # not a name pack writes: left alone


def test_a_failing_run_leaves_no_manifest(tmp_path, pack_dir, coco_sample, monkeypatch):
    pack_dir(coco_sample, tmp_path, shard_samples=16)
    real = pack.write_shard
    calls = []

    def fail_on_third(task):
        calls.append(task.name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(task)

    monkeypatch.setattr(pack, "write_shard", fail_on_third)
    with pytest.raises(RuntimeError):
        pack_dir(coco_sample, tmp_path, shard_samples=16, workers=0)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    for shard in tmp_path.glob("*.tar"):  # whatever is under a final name is a whole tar
        with tarfile.open(shard) as tar:
            assert tar.getmembers()


@pytest.mark.slow
def test_a_killed_run_leaves_no_manifest_and_no_partial_shard(tmp_path, synth_root, pack_dir):
    settings = {"format": "raw", "shard_samples": 4}
    reference = _shard_bytes(pack_dir(synth_root, tmp_path / "reference", **settings))
    out = pack_dir(synth_root, tmp_path / "out", **settings)
    command = [
        sys.executable,
        "-m",
        "cocoshard",
        "pack",
        "--root",
        str(synth_root),
        "--out",
        str(out),
        "--format",
        "raw",
        "--shard-samples",
        "4",
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not list(out.glob(".tmp-*")) and time.monotonic() < deadline:  # a shard is being written
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.tar"):  # old or new, a shard under its final name is whole (and the same)
        assert shard.read_bytes() == reference[shard.name]
    pack_dir(synth_root, out, **settings)
    assert _shard_bytes(out) == reference


# ----------------------------------------------------------------------------------- bad input


SOURCE = "000000000009"  # a colour photo of the sample, 224 x 168


def _jpeg_variant(source: Path, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.open(source)
    mode = save.pop("mode", None)
    size = save.pop("size", None)
    image = image.convert(mode) if mode else image
    image = image.resize(size) if size else image
    image.save(buffer, format=save.pop("format", "JPEG"), **save)
    return buffer.getvalue()


@pytest.fixture
def bad_root(tmp_path, coco_sample) -> Path:
    """The challenge layout holding four good photos and one of every bad input the rules name."""
    root = tmp_path / "ms-coco"
    images, labels, test = (
        root / p
        for p in (
            "images/train-resized/train-resized",
            "labels/train/train",
            "images/test-resized/test-resized",
        )
    )
    for folder in (images, labels, test):
        folder.mkdir(parents=True)
    real_images, real_labels, real_test = challenge_folders(coco_sample)
    for key in ("000000000009", "000000000025", "000000000030", "000000000086"):
        shutil.copy(real_images / f"{key}.jpg", images)
        shutil.copy(real_labels / f"{key}.cls", labels)
    shutil.copy(real_test / "000000007888.jpg", test)
    source = real_images / f"{SOURCE}.jpg"
    photo = source.read_bytes()
    files = {
        "zero.jpg": b"",
        "truncated.jpg": photo[: len(photo) // 2],
        "html.jpg": b"<html>Not Found</html>",
        "png.png": _jpeg_variant(source, format="PNG"),
        "png_named_jpg.jpg": _jpeg_variant(source, format="PNG"),
        "truncated_png.png": _jpeg_variant(source, format="PNG")[:-300],
        "cmyk.jpg": _jpeg_variant(source, mode="CMYK", quality=90),
        "big.jpg": _jpeg_variant(source, size=(320, 240), quality=90),
        "progressive.jpg": _jpeg_variant(source, progressive=True, quality=90),
        "badid.jpg": photo,
        "nonint.jpg": photo,
        "dup.jpg": photo,
        "empty.jpg": photo,
        "nolabels.jpg": photo,
        "a.b.jpg": photo,
        "twin.jpg": photo,
        "twin.png": _jpeg_variant(source, format="PNG"),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    cls = {name.split(".")[0]: "3\n" for name in files if name not in ("nolabels.jpg", "a.b.jpg", "twin.png")}
    cls.update(
        {
            "badid": "3\n80\n",
            "nonint": "3\ncat\n",
            "dup": "5\n5\n7\n",
            "empty": "",
            "orphan": "1\n",
            "a.b": "2\n",
        }
    )
    for key, text in cls.items():
        (labels / f"{key}.cls").write_text(text)
    (labels / "notes.txt").write_text("labels made by hand\n")
    (test / "test_zero.jpg").write_bytes(b"")
    return root


EXPECTED_REJECTIONS = {
    "zero.jpg": "empty file (0 bytes)",
    "zero.cls": "its image zero.jpg was rejected",
    "truncated.jpg": "truncated or corrupt JPEG",
    "truncated.cls": "its image truncated.jpg was rejected",
    "html.jpg": "not an image (JPEG, PNG, WEBP, BMP, GIF, TIFF); first bytes b'<html>No'",
    "html.cls": "its image html.jpg was rejected",
    "truncated_png.png": "truncated or corrupt PNG",
    "truncated_png.cls": "was rejected",
    "badid.cls": "line 2: class id 80 is outside 0-79",
    "badid.jpg": "its labels file badid.cls was rejected",
    "nonint.cls": "line 2: 'cat' is not an integer class id",
    "nonint.jpg": "its labels file nonint.cls was rejected",
    "orphan.cls": "no image named orphan.*",
    "a.b.jpg": "contains a '.'",
    "a.b.cls": "contains a '.'",
    "twin.png": "another file has the same key 'twin': twin.jpg",
    "notes.txt": "not a .cls labels file",
    "test_zero.jpg": "empty file (0 bytes)",
}


def test_every_bad_input_lands_where_the_rules_say(bad_root, tmp_path, pack_dir):
    out = pack_dir(bad_root, tmp_path / "out", shard_samples=4)
    manifest = json.loads((out / "manifest.json").read_text())
    rejected = {Path(item["path"]).name: item["reason"] for item in manifest["rejected"]}
    assert len(rejected) == len(manifest["rejected"])
    assert set(rejected) == set(EXPECTED_REJECTIONS)
    for name, reason in EXPECTED_REJECTIONS.items():
        assert reason in rejected[name], (name, rejected[name])
    samples = {**read_split(out, "train"), **read_split(out, "val")}
    stored = {key: next(f for f in s if f in ("jpg", "png")) for key, s in samples.items()}
    assert stored == {
        "000000000009": "jpg",
        "000000000025": "jpg",
        "000000000030": "jpg",
        "000000000086": "jpg",  # 086 is grayscale
        "png": "png",
        "png_named_jpg": "png",
        "cmyk": "png",
        "big": "png",
        "progressive": "jpg",
        "dup": "jpg",
        "empty": "jpg",
        "twin": "jpg",
    }
    images = bad_root / "images/train-resized/train-resized"
    assert samples["progressive"]["jpg"] == (images / "progressive.jpg").read_bytes()
    assert npy(samples["dup"]["labels.npy"]).nonzero()[0].tolist() == [5, 7]
    assert not npy(samples["empty"]["labels.npy"]).any()
    original = np.asarray(Image.open(images / "png.png").convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples["png"]["png"]))), original)  # lossless
    for key, size in (("cmyk", (224, 168)), ("big", (224, 168))):
        decoded = Image.open(io.BytesIO(samples[key]["png"]))
        assert decoded.mode == "RGB" and decoded.size == size
    assert manifest["unlabelled_images"] == {
        "count": 1,
        "examples": [str((images / "nolabels.jpg").resolve())],
    }
    assert manifest["deduplicated_labels"]["count"] == 1
    assert manifest["splits"]["train"]["empty_labels"] + manifest["splits"]["val"]["empty_labels"] == 1
    assert set(read_split(out, "test")) == {"000000007888"}


def test_nothing_is_lost(bad_root, tmp_path, pack_dir):
    out = pack_dir(bad_root, tmp_path / "out", format="raw")
    manifest = json.loads((out / "manifest.json").read_text())
    images, labels, test = challenge_folders(bad_root)
    everything = {p.resolve() for folder in (images, labels, test) for p in folder.iterdir()}
    packed = {**read_split(out, "train"), **read_split(out, "val")}
    in_shards = {p.resolve() for p in images.iterdir() if p.stem in packed and p.name != "twin.png"}
    in_shards |= {(labels / f"{key}.cls").resolve() for key in packed}
    in_shards |= {(test / f"{key}.jpg").resolve() for key in read_split(out, "test")}
    rejected = {Path(item["path"]) for item in manifest["rejected"]}
    unlabelled = {Path(p) for p in manifest["unlabelled_images"]["examples"]}
    assert not in_shards & rejected and not rejected & unlabelled
    assert in_shards | rejected | unlabelled == everything


def test_cli_warns_by_default_and_fails_under_strict(bad_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pack", "--root", str(bad_root), "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{len(EXPECTED_REJECTIONS)} input files rejected" in err and "warning" in err
    assert main(["pack", "--root", str(bad_root), "--out", str(out), "--workers", "1", "--strict"]) == 1
    err = capsys.readouterr().err
    for name in EXPECTED_REJECTIONS:
        assert name in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


def test_strict_passes_clean_input(coco_sample, tmp_path):
    # images without labels are not rejections: the real sample has two
    assert (
        main(["pack", "--root", str(coco_sample), "--out", str(tmp_path), "--strict", "--workers", "1"]) == 0
    )


def test_cli_names_what_it_looked_for(tmp_path, capsys):
    assert main(["pack", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = "".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert (
        "nowhere" in err and "images/train-resized/train-resized" in err and "flatlayoutimages/train," in err
    )
    assert main(["pack", "--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = "".join(capsys.readouterr().err.split())
    assert f"lookedfor{tmp_path}/images/train-resized/train-resizedor{tmp_path}/images/train" in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are found


# ----------------------------------------------------------------------------------- K folds


def test_folds_hold_every_labelled_image_once_with_classes_spread_evenly(sample_folds_jpeg, coco_sample):
    manifest = json.loads((sample_folds_jpeg / "manifest.json").read_text())
    assert manifest["folds"] == 3 and "val_fraction" not in manifest
    assert list(manifest["splits"]) == ["fold0", "fold1", "fold2", "test"]
    folds = {split: read_split(sample_folds_jpeg, split) for split in ("fold0", "fold1", "fold2")}
    check_manifest(sample_folds_jpeg, {**folds, "test": read_split(sample_folds_jpeg, "test")})
    _, labels, _ = challenge_folders(coco_sample)
    keys = [key for samples in folds.values() for key in samples]
    assert sorted(keys) == sorted(p.stem for p in labels.glob("*.cls"))  # each once, none left out
    for samples in folds.values():
        for key, sample in samples.items():
            assert np.array_equal(npy(sample["labels.npy"]), read_cls(labels / f"{key}.cls")), key
    assert [len(samples) for samples in folds.values()] == [42, 42, 42]
    counts = np.array([manifest["splits"][split]["class_counts"] for split in folds])
    # 126 real photos, 80 classes, ~3 labels each: 74 classes within one image across the folds,
    # six at two, where no single image can move without spreading another class it carries
    spread = counts.max(axis=0) - counts.min(axis=0)
    assert (spread <= 2).all() and (spread <= 1).sum() == 74
    for split in folds:
        order = list(folds[split])
        assert order != sorted(order)  # shuffled: a fold is a training split too
        assert manifest["splits"][split]["shards"][0]["name"] == f"{split}-000000.tar"


def test_folds_are_seeded_and_repeatable(sample_folds_jpeg, tmp_path, pack_dir, coco_sample):
    again = pack_dir(coco_sample, tmp_path / "again", folds=3, shard_samples=16)
    assert _shard_bytes(again) == _shard_bytes(sample_folds_jpeg) | {
        "manifest.json": (again / "manifest.json").read_bytes()  # (it names its own output folder)
    }
    other = pack_dir(coco_sample, tmp_path / "other", folds=3, shard_samples=16, seed=1)
    assert set(read_split(other, "fold0")) != set(read_split(sample_folds_jpeg, "fold0"))


def test_more_folds_than_labelled_images_are_refused(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    for key in ("a1", "a2"):
        Image.new("RGB", (8, 8)).save(root / f"images/train/{key}.jpg")
        (root / f"labels/train/{key}.cls").write_text("3\n")
    code = main(["pack", "--root", str(root), "--out", str(tmp_path / "shards"), "--folds", "3"])
    assert code == 2
    assert "--folds 3 needs at least 3 labelled images" in " ".join(capsys.readouterr().err.split())
    assert main(["pack", "--root", str(root), "--out", str(tmp_path / "shards"), "--folds", "1"]) == 2
