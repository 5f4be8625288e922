"""Reliability, round three: each fault as a user meets it, and the rule that now holds.

Settings checked before anything is read, created or removed (NaN and infinity included); no write
through a link or over an input, and an output path that cannot be written named in one line;
images converted as a person sees them, and one list of image names for pack, predict and
evaluate; a diverging run stopped with what to change, never kept as best; `--max-steps` honoured
on resume; a replaced shard named as such; scores, config and thresholds files checked for their
structure. The numbers are those of `docs/reliability.md`'s round-three rows. Subprocesses carry a
timeout, so a hang fails the test instead of stalling CI; runs that train are marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cocoshard import CLASSES, NUM_CLASSES, config, config_scoring
from cocoshard.atomic import WriteFailed, atomic_write_text
from cocoshard.errors import ConfigError, UserError
from cocoshard.folder_lock import LOCK_FILE, folder_lock
from cocoshard.loading.image_files import list_images
from cocoshard.loading.tario import read_samples
from cocoshard.prepare import pack
from cocoshard.prepare.manifest import MANIFEST, read_manifest
from cocoshard.prepare.sources import _images_by_key
from cocoshard.pure import metrics, threshold_tuning
from cocoshard.scoring.ground_truth import image_keys, load_labels
from cocoshard.scoring.scores import Scores, read_scores, save_scores
from cocoshard.scoring.submission import serialise
from cocoshard.scoring.threshold_files import read_thresholds_file
from cocoshard.settings import read_config_file, resolve, to_dict
from cocoshard.training.checkpoint import save_checkpoint
from cocoshard.training.model import build_model
from cocoshard.training.runlog import METRICS_LOG, RunLog
from conftest import FROM_SCRATCH, TINY, Done, cocoshard, ok, records, refused

LABELS = Path("labels/train/train")
TRAIN_IMAGES = Path("images/train-resized/train-resized")
TEST_IMAGES = Path("images/test-resized/test-resized")


def one_error_line(done: Done, *expected: str) -> None:
    """Refused with exit 2, one `error:` line holding every `expected` part, no traceback."""
    refused(done, *expected)
    assert done.code == 2, done.text[-2000:]
    assert done.text.count("error:") == 1, done.text[-2000:]


def in_process(capsys: pytest.CaptureFixture, *args: object) -> Done:
    """`cocoshard ARGS` through the CLI in this process (torch is loaded once for all): for checks
    that refuse before any work, where a subprocess would spend its time importing torch."""
    from cocoshard.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Done(code, " ".join((captured.out + captured.err).split()))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links as their target's name) with its bytes: a folder 'as it was'."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


# ============================================================================ 1. settings checked first


TRAIN = config.TrainConfig
REFUSED_SETTINGS = [
    (TRAIN, "lr", float("nan")),
    (TRAIN, "lr", float("inf")),
    (TRAIN, "warmup_epochs", float("inf")),
    (TRAIN, "weight_decay", float("nan")),
    (TRAIN, "asl_gamma_neg", float("inf")),
    (TRAIN, "asl_gamma_pos", float("nan")),
    (TRAIN, "asl_clip", float("inf")),
    (TRAIN, "seed", -1),
    (TRAIN, "seed", 2**64),
    (TRAIN, "size", 70000),
    (TRAIN, "batch_size", 10**12),
    (TRAIN, "threads", 10**9),
    (TRAIN, "workers", 10**6),
    (TRAIN, "max_steps", 10**30),
    (config.PackConfig, "seed", -1),
    (config.PackConfig, "size", 70000),
    (config.PackConfig, "shard_samples", 10**12),
    (config.PackConfig, "workers", 10**6),
    (config.SynthConfig, "tail", float("nan")),
    (config.SynthConfig, "clutter", float("inf")),
    (config.SynthConfig, "seed", -1),
    (config.SynthConfig, "size", 100000),
    (config_scoring.PredictConfig, "batch_size", 10**12),
    (config.InspectConfig, "workers", 10**6),
    (config_scoring.ThresholdsConfig, "min_positives", 10**30),
    (config.DemoConfig, "image_size", 8),
    (config.DemoConfig, "lr", float("nan")),
]


@pytest.mark.parametrize(
    "cls, name, value", REFUSED_SETTINGS, ids=[f"{c.__name__}-{n}={v}" for c, n, v in REFUSED_SETTINGS]
)
def test_1_a_setting_no_reader_accepts_is_refused_by_its_flag(cls, name, value):
    """NaN and infinity pass `<= 0` checks; ranges are those the readers accept (the manifest's
    size, NumPy's seeds, the loaders' canvases)."""
    extra = {"images": "x"} if cls is config_scoring.PredictConfig else {}
    with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
        resolve(cls, {name: value, **extra})


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".toml", "lr = nan\n"),
        (".toml", "warmup-epochs = inf\n"),
        (".json", '{"lr": NaN}'),
        (".json", '{"seed": -1}'),
    ],
)
def test_1_a_config_file_is_checked_like_the_flags_before_the_run_folder_exists(
    suffix, text, sample_shards_jpeg, tmp_path
):
    settings = tmp_path / f"train{suffix}"
    settings.write_text(text)
    run = tmp_path / "run"
    done = cocoshard(
        "train", "--config", settings, "--shards", sample_shards_jpeg, "--out", run, *TINY, timeout=120
    )
    one_error_line(done, "--lr" if "lr" in text else "--warmup-epochs" if "warmup" in text else "--seed")
    assert not run.exists()


@pytest.mark.parametrize("flags", [("--lr", "nan"), ("--seed", "-1"), ("--warmup-epochs", "inf")])
def test_1_train_refuses_before_writing_its_run_folder(flags, sample_shards_jpeg, tmp_path):
    run = tmp_path / "run"
    done = cocoshard("train", "--shards", sample_shards_jpeg, "--out", run, *TINY, *flags, timeout=120)
    one_error_line(done, flags[0])
    assert not run.exists()


@pytest.mark.parametrize("flags", [("--seed", "-1"), ("--size", "70000"), ("--shard-samples", "0")])
def test_1_pack_refused_leaves_the_earlier_pack_as_it_was(flags, sample_shards_jpeg, coco_sample, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards_jpeg, shards)
    before = tree(shards)
    one_error_line(cocoshard("pack", "--root", coco_sample, "--out", shards, *flags, timeout=120), flags[0])
    assert tree(shards) == before
    assert cocoshard("inspect", "--shards", shards, timeout=120).code == 0


def test_1_pack_plans_the_split_before_it_removes_the_manifest(
    sample_shards_jpeg, coco_sample, tmp_path, monkeypatch
):
    """Whatever fails in planning (here a stand-in error) fails before the good manifest goes."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards_jpeg, shards)
    before = tree(shards)

    def failing(*args, **kwargs):
        raise ValueError("planning failed")

    monkeypatch.setattr(pack, "plan_splits", failing)
    cfg = resolve(config.PackConfig, {"root": str(coco_sample), "out": str(shards), "workers": 0})
    with pytest.raises(ValueError, match="planning failed"):
        pack.pack_folder(cfg)
    assert tree(shards) == before


def test_1_demo_refuses_an_image_size_synth_would_refuse_before_its_folder_exists(tmp_path):
    out = tmp_path / "demo"
    one_error_line(cocoshard("demo", "--out", out, "--image-size", "8", timeout=60), "--image-size")
    assert not out.exists()


# ============================================================================ 2. links and outputs


def test_2_the_folder_lock_never_writes_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"), folder_lock(out, "cocoshard pack"):
        pass
    assert victim.read_text() == "precious\n"
    (out / LOCK_FILE).unlink()
    (out / LOCK_FILE).symlink_to(tmp_path / "created-outside")  # a link to nothing: never created
    with pytest.raises(UserError, match="symbolic link"), folder_lock(out, "cocoshard pack"):
        pass
    assert not (tmp_path / "created-outside").exists()


def test_2_pack_refuses_a_linked_lock_file_and_touches_nothing(coco_sample, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "shards"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    one_error_line(cocoshard("pack", "--root", coco_sample, "--out", out, timeout=120), LOCK_FILE, "link")
    assert victim.read_text() == "precious\n" and not (out / MANIFEST).exists()


def test_2_atomic_writes_refuse_a_final_name_that_is_a_link(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("{}\n")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(WriteFailed, match="symbolic link"):
        atomic_write_text(link, "overwritten\n")
    assert victim.read_text() == "{}\n" and link.is_symlink()


def test_2_the_run_log_never_appends_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_LOG).symlink_to(victim)
    record = {"epoch": 1, "epochs": 1, "images_per_s": 1.0, "time_s": 1.0, "train": {}, "val": {}}
    with pytest.raises(WriteFailed, match="symbolic link"):
        RunLog(run, enabled=True).record_epoch({**record, "selected": "raw"}, [])
    assert victim.read_text() == "precious\n"


def test_2_synth_never_writes_through_a_planted_temporary(tmp_path):
    from cocoshard.prepare.synth import _write_whole

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / ".tmp-000000000001.jpg").symlink_to(victim)
    _write_whole(tmp_path / "000000000001.jpg", b"image bytes")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "000000000001.jpg").read_bytes() == b"image bytes"


@pytest.fixture(scope="module")
def scored(coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A submission over coco-sample's labelled images, the scores that made it, and the labels."""
    folder = tmp_path_factory.mktemp("scored")
    keys = sorted(p.stem for p in (coco_sample / LABELS).glob("*.cls"))
    rng = np.random.default_rng(0)
    found = Scores(keys, rng.random((len(keys), NUM_CLASSES)).astype(np.float32), np.full(NUM_CLASSES, 0.5))
    save_scores(folder / "scores.npz", found)
    (folder / "predictions.json").write_text(serialise(found.submission()))
    return {"scores": folder / "scores.npz", "predictions": folder / "predictions.json"}


def copies(scored: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {name: Path(shutil.copy(path, tmp_path / path.name)) for name, path in scored.items()}


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("target", ["predictions", "scores"])
def test_2_evaluate_out_naming_an_input_is_refused(how, target, scored, coco_sample, tmp_path, capsys):
    files = copies(scored, tmp_path)
    out = files[target]
    if how == "symlink":
        out = tmp_path / "link.json"
        out.symlink_to(files[target])
    elif how == "hard link":
        out = tmp_path / "hard.json"
        os.link(files[target], out)
    before = files[target].read_bytes()
    done = in_process(
        capsys,
        "evaluate",
        "--predictions",
        files["predictions"],
        "--labels",
        coco_sample / LABELS,
        "--scores",
        files["scores"],
        "--out",
        out,
    )
    one_error_line(done, "--out")
    assert files[target].read_bytes() == before


def test_2_thresholds_out_naming_its_scores_is_refused(scored, coco_sample, tmp_path, capsys):
    files = copies(scored, tmp_path)
    before = files["scores"].read_bytes()
    done = in_process(
        capsys,
        "thresholds",
        "--scores",
        files["scores"],
        "--labels",
        coco_sample / LABELS,
        "--out",
        files["scores"],
    )
    one_error_line(done, "--out", "--scores")
    assert files["scores"].read_bytes() == before


@pytest.mark.parametrize("command", ["evaluate", "thresholds"])
def test_2_an_output_over_a_file_the_labels_are_read_from_is_refused(
    command, scored, coco_sample, sample_shards_jpeg, tmp_path, capsys
):
    files = copies(scored, tmp_path)
    if command == "evaluate":  # over a .cls file of a labels folder
        labels = Path(shutil.copytree(coco_sample / LABELS, tmp_path / "labels"))
        victim = next(labels.glob("*.cls"))
        args = ["--predictions", files["predictions"], "--labels", labels, "--out", victim]
    else:  # over the manifest of a shards folder, with scores of its val split (tuning would succeed)
        labels = Path(shutil.copytree(sample_shards_jpeg, tmp_path / "shards"))
        victim = labels / MANIFEST
        keys = sorted(load_labels(labels))
        rng = np.random.default_rng(1)
        scores = rng.random((len(keys), NUM_CLASSES)).astype(np.float32)
        save_scores(tmp_path / "val.npz", Scores(keys, scores, np.full(NUM_CLASSES, 0.5)))
        args = ["--scores", tmp_path / "val.npz", "--labels", labels, "--out", victim]
    before = tree(labels)
    one_error_line(in_process(capsys, command, *args), "--out", "--labels")
    assert tree(labels) == before


@pytest.mark.parametrize(
    "command",
    [
        "pack --out FILE",
        "pack --out FILE/sub",
        "train --out FILE",
        "synth --out FILE/sub",
        "evaluate --report FILE",
        "evaluate --out DIR",
        "thresholds --out DIR",
    ],
)
def test_2_an_output_path_that_cannot_be_written_is_one_line(
    command, coco_sample, sample_shards_jpeg, scored, tmp_path, capsys
):
    file = tmp_path / "a-file"
    file.write_text("kept\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    target = {"FILE": file, "FILE/sub": file / "sub", "DIR": folder}[command.split()[-1]]
    name, flag = command.split()[:2]
    files = copies(scored, tmp_path)
    args = {
        "pack": ["--root", coco_sample],
        "train": ["--shards", sample_shards_jpeg, *TINY, *FROM_SCRATCH],
        "synth": ["--train", "4", "--test", "1"],
        "evaluate": ["--predictions", files["predictions"], "--labels", coco_sample / LABELS],
        "thresholds": ["--scores", files["scores"], "--labels", coco_sample / LABELS],
    }[name]
    one_error_line(in_process(capsys, name, *args, flag, target), flag)
    assert file.read_text() == "kept\n" and list(folder.iterdir()) == []


# ============================================================================ 3. images as a person sees them
# (mode by mode: tests/prepare/test_images.py)


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _named_images(folder: Path, photo: bytes) -> None:
    folder.mkdir(parents=True)
    for name in ("000000000001.jpg", "000000000002.jfif", "000000000003.JPEG", "000000000004.webp"):
        (folder / name).write_bytes(photo)
    (folder / "000000000005").write_bytes(photo)  # no extension
    (folder / "notes.txt").write_text("not an image\n")


def test_3_pack_predict_and_evaluate_accept_the_same_image_files(coco_sample, tmp_path):
    photo = next((coco_sample / TEST_IMAGES).glob("*.jpg")).read_bytes()
    folder = tmp_path / "test"
    _named_images(folder, photo)
    rejected: list[dict[str, str]] = []
    packed = set(_images_by_key(folder, rejected))  # what pack takes as test images
    predicted = {p.stem for p in list_images(folder)}  # what predict --images predicts
    expected = set(image_keys(folder))  # what evaluate --images requires
    assert packed == predicted == expected == {"000000000001", "000000000002", "000000000003", "000000000004"}
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected}
    assert set(reasons) == {"000000000005", "notes.txt"} and "no extension" in reasons["000000000005"]


def _tiny_checkpoint(path: Path) -> Path:
    """A checkpoint as train writes it, of an untrained cocoshard_tiny at 64 px (no training needed)."""
    torch.manual_seed(0)
    model = build_model("cocoshard_tiny", weights="none")
    cfg = resolve(config.TrainConfig, {"model": "cocoshard_tiny", "size": 64, "weights": "none"})
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "ema": None,
            "epoch": 1,
            "step": 1,
            "config": to_dict(cfg),
            "classes": list(CLASSES),
            "thresholds": [0.5] * NUM_CLASSES,
            "metrics": {},
        },
    )
    return path


@pytest.mark.slow
def test_3_predict_names_what_it_leaves_out_and_evaluate_expects_every_image(coco_sample, tmp_path):
    photo = next((coco_sample / TEST_IMAGES).glob("*.jpg")).read_bytes()
    folder = tmp_path / "test"
    _named_images(folder, photo)
    (folder / "000000000004.webp").write_bytes(_saved(Image.new("RGB", (32, 32), "red"), "PNG"))
    checkpoint = _tiny_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "predictions.json"
    done = cocoshard(
        "predict",
        "--checkpoint",
        checkpoint,
        "--images",
        folder,
        "--out",
        out,
        "--device",
        "cpu",
        timeout=180,
    )
    text = ok(done)
    assert "2 file(s)" in text and "000000000005" in text and "notes.txt" in text
    predictions = json.loads(out.read_text())
    assert set(predictions) == {"000000000001", "000000000002", "000000000003", "000000000004"}
    del predictions["000000000002"]  # a .jfif image left out: evaluate must miss it
    out.write_text(json.dumps(predictions))
    refused(cocoshard("evaluate", "--predictions", out, "--images", folder, timeout=60), "000000000002")


# ============================================================================ 4. non-finite losses and scores


@pytest.mark.parametrize(
    "function",
    [
        lambda s, y: threshold_tuning.tune_thresholds(s, y),
        lambda s, y: threshold_tuning.holdout_threshold_gain(s, y),
        lambda s, y: metrics.metrics_from_scores(s, y),
        lambda s, y: metrics.average_precision(s, y),
        lambda s, y: metrics.predictions_from_scores(s),
        lambda s, y: metrics.predictions_from_scores(np.nan_to_num(s), np.full(NUM_CLASSES, np.nan)),
    ],
    ids=["tune", "holdout", "metrics", "ap", "predictions", "nan-thresholds"],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_4_tuning_and_metrics_refuse_non_finite_scores_by_name(function, bad):
    rng = np.random.default_rng(0)
    scores, labels = rng.random((60, NUM_CLASSES)), rng.random((60, NUM_CLASSES)) < 0.3
    scores[:, :] = np.where(labels, scores, scores / 2)
    scores[7, 3] = bad
    with pytest.raises(ValueError, match="(scores|thresholds) hold .* NaN or infinite"):
        function(scores, labels)


def _cpu_trainer(shards: Path, out: Path):
    from cocoshard.training.runtime import setup
    from cocoshard.training.trainer import build_trainer, enter_phase

    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(shards),
            "out": str(out),
            "model": "cocoshard_tiny",
            "weights": "none",
            "device": "cpu",
            "size": 64,
            "batch_size": 8,
            "workers": 0,
            "threads": 1,
            "amp": False,
            "ema": True,
        },
    )
    tr = build_trainer(cfg, setup("cpu", amp=False), RunLog(out, enabled=False))
    enter_phase(tr, 0)
    return tr


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the scaler skipped the step
def test_4_a_non_finite_step_under_a_grad_scaler_is_skipped_counted_then_stops(sample_shards_jpeg, tmp_path):
    """fp16's GradScaler skips a step whose loss is NaN: the weights stay, the step is counted, and a
    run whose every step is skipped stops. Without a scaler the first one stops the run."""
    from cocoshard.training.divergence import Diverged, check_losses, check_weights
    from cocoshard.training.train import OnlineMetrics, train_step

    tr = _cpu_trainer(sample_shards_jpeg, tmp_path / "run")
    try:
        tr.scaler = torch.amp.GradScaler("cpu", enabled=True)
        batch = next(iter(tr.train_loader))
        # NaN labels: a NaN loss and NaN gradients from finite activations (BatchNorm statistics stay finite)
        poisoned = dataclasses.replace(batch, labels=torch.full_like(batch.labels, float("nan")))
        before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
        meter = OnlineMetrics(torch.device("cpu"))
        train_step(tr, poisoned, meter)
        assert all(torch.equal(before[k], v) for k, v in tr.model.named_parameters())  # the step was skipped
        assert meter.nonfinite_steps() == 1 and np.isfinite(meter.mean_loss())
        check_losses(tr, 0, 1, 1, 2)  # one of two skipped: counted, the run goes on
        check_weights(tr, 0)
        with pytest.raises(Diverged, match="all of the last 2 steps"):
            check_losses(tr, 0, 2, 2, 2)
        tr.scaler = torch.amp.GradScaler("cpu", enabled=False)
        with pytest.raises(Diverged, match="--lr"):
            check_losses(tr, 0, 1, 1, 2)
        with torch.no_grad():
            weight = next(tr.model.parameters())
            weight[(0,) * weight.ndim] = float("nan")
        with pytest.raises(Diverged, match="weights hold NaN"):
            check_weights(tr, 0)
    finally:
        tr.train_loader.close()
        tr.val_loader.close()


@pytest.mark.slow
def test_4_a_diverging_run_stops_with_what_to_change_and_keeps_no_best(sample_shards_jpeg, tmp_path):
    run = tmp_path / "run"
    done = cocoshard(
        "train",
        "--shards",
        sample_shards_jpeg,
        "--out",
        run,
        "--epochs",
        "2",
        "--lr",
        "1e9",
        *TINY,
        *FROM_SCRATCH,
    )
    one_error_line(done, "diverged", "NaN", "--lr")
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()


# ============================================================================ 5. --max-steps on resume


@pytest.mark.slow
def test_5_max_steps_reached_trains_nothing_more_on_resume(sample_shards_jpeg, tmp_path):
    run = tmp_path / "run"
    first = [*TINY, *FROM_SCRATCH, "--threads", "1", "--epochs", "3", "--max-steps", "3"]
    ok(cocoshard("train", "--shards", sample_shards_jpeg, "--out", run, *first))
    assert [(r["epoch"], r["step"]) for r in records(run)] == [(1, 3)]
    trained = ("last.pt", "best.pt", "thresholds.json", METRICS_LOG)  # (config.json says what was asked)
    kept = {name: (run / name).read_bytes() for name in trained}
    for steps in ("3", "2"):
        text = ok(cocoshard("train", "--resume", run / "last.pt", "--max-steps", steps))
        assert "nothing to do" in text and "--max-steps" in text
        assert {name: (run / name).read_bytes() for name in trained} == kept  # nothing logged or saved
    text = ok(cocoshard("train", "--resume", run / "last.pt", "--max-steps", "7"))
    assert [(r["epoch"], r["step"]) for r in records(run)] == [(1, 3), (2, 7)]
    assert "-" not in text.split("epoch 2/3")[1].split("loss")[0]  # the bar counts 0/4 ... 4/4, never "0/-5"


# ============================================================================ 6. shard identity before keys


def _rename_first_key(path: Path, new_key: str) -> None:
    """Rewrite a shard with its first sample under another key of the same length: same size."""
    out = io.BytesIO()
    with (
        tarfile.open(path) as tar_in,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar_out,
    ):
        members = tar_in.getmembers()
        first = members[0].name.split(".", 1)[0]
        for member in members:
            payload = tar_in.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            info = tarfile.TarInfo(f"{new_key if key == first else key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            tar_out.addfile(info, io.BytesIO(payload))
    assert len(out.getvalue()) == path.stat().st_size
    path.write_bytes(out.getvalue())


@pytest.mark.parametrize("how", ["another pack's shard", "same size, other bytes"])
def test_6_a_replaced_train_shard_is_named_as_replaced_not_as_an_overlap(
    how, sample_shards_jpeg, coco_sample, pack_dir, tmp_path, capsys
):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards_jpeg, shards)
    manifest = read_manifest(shards)
    train = shards / manifest["splits"]["train"]["shards"][0]["name"]
    if how == "another pack's shard":  # another split: some of its train images are val images here
        other = pack_dir(coco_sample, tmp_path / "other", seed=3, shard_samples=16, workers=0)
        shutil.copy(other / train.name, train)
    else:
        val_key = read_samples(str(shards / manifest["splits"]["val"]["shards"][0]["name"]))[0].key
        _rename_first_key(train, val_key)
    assert (
        hashlib.sha256(train.read_bytes()).hexdigest() != manifest["splits"]["train"]["shards"][0]["sha256"]
    )
    done = in_process(capsys, "train", "--shards", shards, "--out", tmp_path / "run", *TINY, *FROM_SCRATCH)
    one_error_line(done, train.name, "not the one its manifest lists")
    assert "in both the train and the val split" not in done.text


# ======================================================================== 7. scores, config, thresholds files


def _scores_file(path: Path, **arrays) -> Path:
    keys = [f"{i:012d}" for i in range(1, 6)]
    base = {
        "keys": np.asarray(keys, dtype=str),
        "scores": np.full((5, NUM_CLASSES), 0.25, np.float32),
        "thresholds": np.full(NUM_CLASSES, 0.5),
        "classes": np.asarray(CLASSES, dtype=str),
        "min_labels": np.asarray(1),
        "unreadable": np.asarray([], dtype=str),
    }
    np.savez(path, **{**base, **arrays})
    return path


BAD_SCORES = {
    "no image": ({"keys": np.asarray([], dtype=str), "scores": np.zeros((0, NUM_CLASSES))}, "no image"),
    "a key twice": ({"keys": np.asarray(["000000000001"] * 2 + ["000000000003"] * 3)}, "more than once"),
    "a key that is a path": ({"keys": np.asarray(["../x", "b", "c", "d", "e"])}, "not an image key"),
    "keys as numbers": ({"keys": np.arange(5)}, "'keys'"),
    "scores above 1": ({"scores": np.full((5, NUM_CLASSES), 3.0)}, "probabilities"),
    "NaN thresholds": ({"thresholds": np.full(NUM_CLASSES, np.nan)}, "'thresholds'"),
    "79 thresholds": ({"thresholds": np.full(79, 0.5)}, "shape"),
    "min_labels 500": ({"min_labels": np.asarray(500)}, "'min_labels'"),
    "unreadable not scored": ({"unreadable": np.asarray(["000000000099"])}, "'unreadable'"),
    "a pickled object": ({"classes": np.asarray([{"a": 1}], dtype=object)}, "not a scores file"),
}


@pytest.mark.parametrize("case", list(BAD_SCORES))
def test_7_a_scores_file_is_checked_field_by_field(case, tmp_path):
    arrays, reason = BAD_SCORES[case]
    path = _scores_file(tmp_path / "scores.npz", **arrays)
    with pytest.raises(UserError, match=re.escape(reason)):
        read_scores(path)


def test_7_a_pipe_named_as_scores_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "scores.npz")

    def hung(signum, frame):
        raise TimeoutError("reading a pipe as a scores file hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)  # a read that waits for a writer would stall the suite: fail instead
    try:
        with pytest.raises(UserError, match="not a regular file"):
            read_scores(tmp_path / "scores.npz")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", ["no image", "a key twice"])
def test_7_thresholds_and_evaluate_refuse_such_scores_by_name(case, coco_sample, tmp_path, capsys):
    keys = sorted(p.stem for p in (coco_sample / LABELS).glob("*.cls"))[:5]
    arrays = (
        {"keys": np.asarray(keys[:2] + keys[:3], dtype=str)} if case == "a key twice" else BAD_SCORES[case][0]
    )
    scores = _scores_file(tmp_path / "scores.npz", **arrays)
    out = tmp_path / "thresholds.json"
    done = in_process(
        capsys, "thresholds", "--scores", scores, "--labels", coco_sample / LABELS, "--out", out
    )
    one_error_line(done, str(scores), BAD_SCORES[case][1])
    assert not out.exists()
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({key: [0] for key in keys}))
    done = in_process(
        capsys,
        "evaluate",
        "--predictions",
        predictions,
        "--labels",
        coco_sample / LABELS,
        "--subset",
        "--scores",
        scores,
    )
    one_error_line(done, str(scores))


DEEP = 100_000


@pytest.mark.parametrize(
    "name, text",
    [
        ("deep.json", "[" * DEEP + "]" * DEEP),
        ("deep.json", '{"lr": ' + "[" * DEEP + "]" * DEEP + "}"),
        ("deep.toml", "lr = " + "[" * DEEP + "]" * DEEP),
        ("deep.toml", "lr" + ".a" * 3000 + " = 1"),
        ("deep.toml", "[lr" + ".a" * 3000 + "]"),
        ("twice.json", '{"epochs": 1, "epochs": 50}'),
        ("twice.json", '{"batch-size": 8, "batch_size": 16}'),
        ("list.toml", "lr = [0.1, 0.2]"),
    ],
)
def test_7_a_config_file_deep_repeated_or_nested_is_refused_by_name(name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        resolve(config.TrainConfig, {}, str(path))


def test_7_a_deep_config_is_one_line_through_the_cli(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("lr = " + "[" * DEEP + "]" * DEEP)
    one_error_line(
        cocoshard("train", "--config", path, "--out", tmp_path / "run", timeout=120), str(path), "nested"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, reason",
    [
        ('{"thresholds": ' + "[" * DEEP + "]" * DEEP + "}", "nested"),
        ('{"thresholds": [0.5], "thresholds": ' + json.dumps([0.5] * NUM_CLASSES) + "}", "twice"),
    ],
    ids=["deep", "twice"],
)
def test_7_a_thresholds_file_deep_or_repeated_is_refused_by_name(text, reason, tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(text)
    with pytest.raises(UserError, match=reason):
        read_thresholds_file(path)


def test_7_the_parsers_bound_nesting_and_keep_what_is_legal():
    from cocoshard.input_files import parse_json, parse_toml

    assert parse_json('{"a": "[[[[", "b": [[1], {"c": 2}]}') == {"a": "[[[[", "b": [[1], {"c": 2}]}
    assert parse_toml('a = """ [[ " [[ """\nb = [[1]]  # [[[[\nc.d = 1.5\n') == {
        "a": ' [[ " [[ ',
        "b": [[1]],
        "c": {"d": 1.5},
    }
    assert read_config_file  # the config reader is these parsers (test_7_a_config_file_...)
