"""Reliability, round two: each fault as a user meets it, through the CLI in a subprocess.

Runs that cannot mix (one writer per folder, resume on the same shards), nothing silently wrong
(checked labels, checked thresholds, no validation on nothing, no train/val overlap, finished work
kept), no hang (dead workers, pipes, endless files, pixel bombs), and messages instead of
tracebacks (disk full, bad manifests, random checkpoints, markup in names, non-UTF-8 names, keys
that cannot be image stems). The numbers are those of `docs/reliability.md`'s round-two rows.
Every subprocess has a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cocoshard.folder_lock import LOCK_FILE
from cocoshard.loading.tario import shard_keys
from cocoshard.prepare.manifest import MANIFEST
from cocoshard.training.checkpoint import BadCheckpoint, load_checkpoint
from conftest import FROM_SCRATCH, TINY, Done, cocoshard, refused

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sample_copy(coco_sample: Path, dst: Path) -> dict[str, Path]:
    shutil.copytree(coco_sample, dst)
    return {
        "root": dst,
        "train": dst / "images" / "train-resized" / "train-resized",
        "labels": dst / "labels" / "train" / "train",
        "test": dst / "images" / "test-resized" / "test-resized",
    }


def rewrite_members(shards: Path, split: str, change, rehash: bool = True) -> None:
    """Rewrite every shard of `split`, each member's payload through change(name, payload)."""
    manifest = json.loads((shards / MANIFEST).read_text())
    for entry in manifest["splits"][split]["shards"]:
        path = shards / entry["name"]
        out = io.BytesIO()
        with (
            tarfile.open(path) as tar_in,
            tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar_out,
        ):
            for member in tar_in:
                payload = change(member.name, tar_in.extractfile(member).read())
                info = tarfile.TarInfo(member.name)
                info.size = len(payload)
                tar_out.addfile(info, io.BytesIO(payload))
        path.write_bytes(out.getvalue())
        if rehash:
            entry["sha256"], entry["bytes"] = hashlib.sha256(out.getvalue()).hexdigest(), len(out.getvalue())
    (shards / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def tiny_run(sample_shards_jpeg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run on coco-sample: its best.pt feeds predict and the checkpoint faults."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    done = cocoshard(
        "train",
        "--shards",
        sample_shards_jpeg,
        "--out",
        run,
        "--epochs",
        "1",
        "--max-steps",
        "2",
        *TINY,
        *FROM_SCRATCH,
    )
    assert done.code == 0, done.text[-2000:]
    return run


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another cocoshard command writing `folder`: a process holding its lock until killed."""
    code = (
        "import sys, time\nfrom cocoshard.folder_lock import folder_lock\n"
        "with folder_lock(sys.argv[1], 'cocoshard pack'):\n    print('held', flush=True)\n    "
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---------------------------------------------------------------------------- 1. one writer per folder


def test_1_a_second_train_into_a_running_run_folder_is_refused(sample_shards_jpeg, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cocoshard",
            "train",
            "--shards",
            str(sample_shards_jpeg),
            "--out",
            str(run),
            "--epochs",
            "50",
            *TINY,
            *FROM_SCRATCH,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():  # the first run holds the folder and has saved an epoch
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert (
            cocoshard(
                "train", "--shards", sample_shards_jpeg, "--out", run, "--epochs", "1", *TINY, *FROM_SCRATCH
            ).code
            != 0
        )
        # --resume passes the check for an existing run: the lock is what stops it
        second = cocoshard("train", "--resume", run / "last.pt")
        refused(
            second, f"{run} is being written by another cocoshard command (pid {first.pid}, cocoshard train"
        )
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.kill()
        first.wait()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, len((run / "metrics.jsonl").read_text().splitlines()) + 1)
    )


def test_1_a_second_pack_is_refused_and_a_killed_holder_leaves_no_stale_lock(coco_sample, tmp_path):
    out = tmp_path / "shards"
    holder = hold_lock(out)
    try:
        refused(
            cocoshard("pack", "--root", coco_sample, "--out", out),
            "is being written by another cocoshard command",
            f"pid {holder.pid}",
        )
        assert not (out / MANIFEST).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).exists()  # the file stays; the kernel dropped the lock with its holder
    assert cocoshard("pack", "--root", coco_sample, "--out", out).code == 0
    assert cocoshard("inspect", "--shards", out, "--verify").code == 0


@pytest.mark.parametrize("command", ["synth", "evaluate-report"])
def test_1_every_other_writer_takes_the_lock_too(command, tmp_path, tiny_run, sample_shards_jpeg):
    """Commands that write a folder lock it; predict and evaluate --out write one file, atomically."""
    target = tmp_path / "target"
    holder = hold_lock(target)
    try:
        if command == "synth":
            done = cocoshard("synth", "--out", target, "--train", "10", "--test", "2")
        else:
            predictions = tmp_path / "val.json"
            assert (
                cocoshard(
                    "predict",
                    "--checkpoint",
                    tiny_run / "best.pt",
                    "--shards",
                    sample_shards_jpeg,
                    "--split",
                    "val",
                    "--out",
                    predictions,
                    "--device",
                    "cpu",
                ).code
                == 0
            )
            done = cocoshard(
                "evaluate", "--predictions", predictions, "--labels", sample_shards_jpeg, "--report", target
            )
        refused(done, "is being written by another cocoshard command", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------- 2. resume on other shards


def test_2_resume_refuses_shards_repacked_since(coco_sample, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    assert cocoshard("pack", "--root", coco_sample, "--out", shards, "--shard-samples", "16").code == 0
    assert (
        cocoshard(
            "train",
            "--shards",
            shards,
            "--out",
            run,
            "--epochs",
            "2",
            "--max-steps",
            "3",
            *TINY,
            *FROM_SCRATCH,
        ).code
        == 0
    )
    assert (
        cocoshard("pack", "--root", coco_sample, "--out", shards, "--shard-samples", "16", "--seed", "1").code
        == 0
    )
    done = cocoshard("train", "--resume", run / "last.pt")
    refused(done, "last.pt was trained on other shards than the ones in", str(shards))
    assert cocoshard("train", "--resume", run / "last.pt", "--shards", shards).code != 0


# ------------------------------------------------------------------------ 3. evaluate reads checked shards


def test_3_evaluate_refuses_a_val_shard_whose_label_byte_was_flipped(sample_shards_jpeg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards_jpeg, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    val_shard = shards / manifest["splits"]["val"]["shards"][0]["name"]
    keys = [
        k for entry in manifest["splits"]["val"]["shards"] for k in shard_keys(str(shards / entry["name"]))
    ]
    predictions = tmp_path / "val.json"
    predictions.write_text(json.dumps({key: [0] for key in keys}))
    assert cocoshard("evaluate", "--predictions", predictions, "--labels", shards).code == 0
    data = bytearray(val_shard.read_bytes())
    with tarfile.open(val_shard) as tar:
        member = next(m for m in tar if m.name.endswith(".labels.npy"))
    data[member.offset_data + member.size - 1] ^= 1  # the last class of the first sample
    val_shard.write_bytes(bytes(data))
    refused(cocoshard("evaluate", "--predictions", predictions, "--labels", shards), val_shard.name, "sha256")


# ---------------------------------------------------------------------------- 4, 13. checkpoints checked


def _altered(tiny_run: Path, tmp_path: Path, change) -> Path:
    state = torch.load(tiny_run / "best.pt", weights_only=True)
    change(state)
    path = tmp_path / "altered.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "case, change, field",
    [
        ("NaN", lambda s: s.update(thresholds=[math.nan] * 80), "thresholds"),
        ("5.0", lambda s: s.update(thresholds=[5.0] * 80), "thresholds"),
        ("-1.0", lambda s: s.update(thresholds=[-1.0] * 80), "thresholds"),
        ("79 thresholds", lambda s: s.update(thresholds=[0.5] * 79), "thresholds"),
        ("strings", lambda s: s.update(thresholds=["0.5"] * 80), "thresholds"),
        ("size 0", lambda s: s["config"].update(size=0), "size"),
        ("size a string", lambda s: s["config"].update(size="224"), "size"),
    ],
)
def test_4_13_predict_refuses_a_checkpoint_with_bad_fields(
    case, change, field, tiny_run, sample_shards_jpeg, tmp_path
):
    path = _altered(tiny_run, tmp_path, change)
    out = tmp_path / "predictions.json"
    done = cocoshard(
        "predict", "--checkpoint", path, "--shards", sample_shards_jpeg, "--out", out, "--device", "cpu"
    )
    refused(done, str(path), field)
    assert not out.exists()


@pytest.mark.parametrize(
    "payload", [b"\x80\x02.", b"", b"PK\x03\x04" + bytes(60), b"not a checkpoint at all"]
)
def test_13_a_random_file_named_pt_is_a_one_line_error(payload, sample_shards_jpeg, tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(payload)
    done = cocoshard(
        "predict", "--checkpoint", path, "--shards", sample_shards_jpeg, "--out", tmp_path / "p.json"
    )
    refused(done, str(path))
    assert len([line for line in done.text.split("error:") if line.strip()]) <= 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600) | st.builds(lambda tail: b"\x80\x02" + tail, st.binary(max_size=80)))
def test_13_the_checkpoint_loader_answers_any_bytes_with_a_bad_checkpoint(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("pt") / "random.pt"
    path.write_bytes(data)
    with pytest.raises(BadCheckpoint, match="random.pt"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- 5. every val sample bad


def test_5_no_best_epoch_is_chosen_on_no_validation_images(sample_shards_jpeg, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards_jpeg, shards)
    rewrite_members(
        shards, "val", lambda name, data: data[: len(data) // 3] if name.endswith(".jpg") else data
    )
    done = cocoshard(
        "train",
        "--shards",
        shards,
        "--out",
        run,
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--skip-bad-samples",
        *TINY,
        *FROM_SCRATCH,
    )
    refused(done, "validation", "no")
    assert not (run / "best.pt").exists()


# ---------------------------------------------------------------------------- 6. train and val overlap


def test_6_a_val_shard_listed_under_train_too_is_refused_before_any_work(sample_shards_jpeg, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards_jpeg, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    val_entry = manifest["splits"]["val"]["shards"][0]
    manifest["splits"]["train"]["shards"].append(val_entry)
    manifest["splits"]["train"]["samples"] += val_entry["samples"]
    (shards / MANIFEST).write_text(json.dumps(manifest))
    refused(
        cocoshard("train", "--shards", shards, "--out", run, "--epochs", "1", *TINY, *FROM_SCRATCH),
        val_entry["name"],
    )
    assert not (run / "last.pt").exists()


def test_6_train_and_val_shards_sharing_keys_are_refused(sample_shards_jpeg, tmp_path):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(sample_shards_jpeg, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    copy = dict(manifest["splits"]["train"]["shards"][0], name="val-000099.tar")
    shutil.copy(shards / manifest["splits"]["train"]["shards"][0]["name"], shards / copy["name"])
    manifest["splits"]["val"]["shards"].append(copy)
    manifest["splits"]["val"]["samples"] += copy["samples"]
    (shards / MANIFEST).write_text(json.dumps(manifest))
    refused(
        cocoshard("train", "--shards", shards, "--out", run, "--epochs", "1", *TINY, *FROM_SCRATCH),
        "images are in both the train and the val split",
    )
    assert not (run / "last.pt").exists()


# ---------------------------------------------------------------------------- 7. finished work kept


def test_7_a_run_folder_with_best_pt_but_no_last_pt_is_not_overwritten(
    sample_shards_jpeg, tiny_run, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    shutil.copy(tiny_run / "metrics.jsonl", run / "metrics.jsonl")
    before = (run / "best.pt").read_bytes(), (run / "metrics.jsonl").read_bytes()
    refused(cocoshard("train", "--shards", sample_shards_jpeg, "--out", run, *TINY, *FROM_SCRATCH), "best.pt")
    assert ((run / "best.pt").read_bytes(), (run / "metrics.jsonl").read_bytes()) == before


def test_7_predict_refuses_to_write_over_its_checkpoint(sample_shards_jpeg, tiny_run, tmp_path):
    checkpoint = tmp_path / "best.pt"
    shutil.copy(tiny_run / "best.pt", checkpoint)
    before = checkpoint.read_bytes()
    refused(
        cocoshard("predict", "--checkpoint", checkpoint, "--shards", sample_shards_jpeg, "--out", checkpoint),
        str(checkpoint),
    )
    assert checkpoint.read_bytes() == before


# ---------------------------------------------------------------------------- 8. dead workers


KILL_WORKERS = textwrap.dedent("""
    import os, signal, sys
    import importlib
    module = importlib.import_module(sys.argv[1])
    owner = module
    for part in sys.argv[2].split(".")[:-1]:
        owner = getattr(owner, part)
    name = sys.argv[2].split(".")[-1]
    original = getattr(owner, name)
    PARENT = os.getpid()

    def dying(*args, **kwargs):
        if os.getpid() != PARENT:  # in a worker: what the OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, dying)
    # as in a terminal: a process started in the background (CI runners do this) inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from cocoshard.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize(
    "module, function, command",
    [
        (
            "cocoshard.prepare.pack",
            "write_shard",
            ["pack", "--root", "{sample}", "--out", "{tmp}/shards", "--workers", "2"],
        ),
        (
            "cocoshard.prepare.inspect",
            "verify_shard",
            ["inspect", "--shards", "{shards}", "--verify", "--workers", "2"],
        ),
        (
            "cocoshard.loading.stream",
            "ShardBatchSource.batches",
            [
                "train",
                "--shards",
                "{shards}",
                "--out",
                "{tmp}/run",
                *TINY[:8],
                "--workers",
                "2",
                "--weights",
                "none",
            ],
        ),
    ],
)
def test_8_a_killed_worker_stops_the_command_with_a_message_not_a_hang(
    module, function, command, coco_sample, sample_shards_jpeg, tmp_path
):
    script = tmp_path / "kill_workers.py"
    script.write_text(KILL_WORKERS)
    args = [a.format(sample=coco_sample, tmp=tmp_path, shards=sample_shards_jpeg) for a in command]
    done = cocoshard(module, function, *args, script=str(script), timeout=120)
    refused(done, "died")
    if command[0] == "pack":
        assert not (tmp_path / "shards" / MANIFEST).exists()


# ---------------------------------------------------------------------------- 9. non-regular inputs


def test_9_pipes_and_endless_files_are_rejected_not_read(coco_sample, tmp_path):
    paths = sample_copy(coco_sample, tmp_path / "root")
    os.mkfifo(paths["train"] / "fifo.jpg")
    shutil.copy(paths["labels"] / "000000000009.cls", paths["labels"] / "fifo.cls")
    (paths["train"] / "zero.jpg").symlink_to("/dev/zero")
    shutil.copy(paths["labels"] / "000000000009.cls", paths["labels"] / "zero.cls")
    victim = "000000000025"
    (paths["labels"] / f"{victim}.cls").unlink()
    os.mkfifo(paths["labels"] / f"{victim}.cls")
    os.mkfifo(paths["test"] / "fifo-test.jpg")
    out = tmp_path / "shards"
    done = cocoshard("pack", "--root", paths["root"], "--out", out, timeout=120)
    assert done.code == 0, done.text[-2000:]
    rejected = {
        Path(r["path"]).name: r["reason"] for r in json.loads((out / MANIFEST).read_text())["rejected"]
    }
    for name in ("fifo.jpg", "zero.jpg", f"{victim}.cls", "fifo-test.jpg"):
        assert "not a regular file" in rejected.get(name, ""), rejected


def test_9_evaluate_labels_with_a_pipe_for_a_cls_file_does_not_hang(coco_sample, tmp_path):
    paths = sample_copy(coco_sample, tmp_path / "root")
    victim = "000000000025"
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({p.stem: [0] for p in paths["labels"].glob("*.cls")}))
    (paths["labels"] / f"{victim}.cls").unlink()
    os.mkfifo(paths["labels"] / f"{victim}.cls")
    refused(
        cocoshard("evaluate", "--predictions", predictions, "--labels", paths["labels"], timeout=60),
        f"{victim}.cls",
        "not a regular file",
    )


# ---------------------------------------------------------------------------- 10. pixel bombs in predict


def _pixel_bomb(path: Path, width: int, height: int) -> None:
    """A small JPEG whose header declares width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "gray").save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


def test_10_predict_refuses_a_pixel_bomb_by_its_header(tiny_run, coco_sample, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(sample_copy(coco_sample, tmp_path / "root")["test"], images)
    _pixel_bomb(images / "bomb.jpg", 30000, 30000)
    assert (images / "bomb.jpg").stat().st_size < 1000
    out = tmp_path / "p.json"
    started = time.monotonic()
    done = cocoshard(
        "predict", "--checkpoint", tiny_run / "best.pt", "--images", images, "--out", out, "--device", "cpu"
    )
    refused(done, "bomb.jpg", "30000")
    assert time.monotonic() - started < 60 and not out.exists()
    done = cocoshard(
        "predict",
        "--checkpoint",
        tiny_run / "best.pt",
        "--images",
        images,
        "--out",
        out,
        "--device",
        "cpu",
        "--unreadable",
        "prior",
    )
    assert done.code == 0, done.text[-2000:]
    assert "bomb" in json.loads(out.read_text())


# ---------------------------------------------------------------------------- 11. disk full


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` and tmpfs mounts (root in a container)")
@pytest.mark.parametrize("command", ["pack", "train"])
def test_11_a_full_disk_is_named_without_a_traceback(command, coco_sample, sample_shards_jpeg, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if command == "pack":
        inner = f"{sys.executable} -m cocoshard pack --root {coco_sample} --out {full}/shards"
    else:  # the run's small files fit; the checkpoint does not
        inner = (
            f"{sys.executable} -m cocoshard train --shards {sample_shards_jpeg} --out {full}/run --epochs 1 "
            f"--max-steps 2 {' '.join(TINY[:8])} --workers 0 --weights none --model resnet18"
        )
    size = "300k" if command == "pack" else "2m"
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {full} && {inner}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "1000"},
    )
    result = Done(done.returncode, " ".join((done.stdout + done.stderr).split()))
    refused(result, "disk", "full")
    assert str(full) in result.text


# ---------------------------------------------------------------------------- 12. manifest schema


@pytest.mark.parametrize(
    "case, change, field",
    [
        ("size missing", lambda m: m.pop("size"), "size"),
        ("size a word", lambda m: m.update(size="big"), "size"),
        ("size negative", lambda m: m.update(size=-64), "size"),
        ("shards null", lambda m: m["splits"]["train"].update(shards=None), "shards"),
        ("format version 1", lambda m: m.update(format_version=1), "re-pack"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_12_a_manifest_with_a_bad_field_is_named(case, change, field, command, sample_shards_jpeg, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards_jpeg, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    change(manifest)
    (shards / MANIFEST).write_text(json.dumps(manifest))
    args = (
        ["inspect", "--shards", shards]
        if command == "inspect"
        else ["train", "--shards", shards, "--out", tmp_path / "run", *TINY, *FROM_SCRATCH]
    )
    refused(cocoshard(*args), str(shards / MANIFEST), field)


# ---------------------------------------------------------------------------- 14. names printed literally


def test_14_markup_in_file_names_and_paths_is_printed_as_it_is(tiny_run, coco_sample, tmp_path):
    images = tmp_path / "odd [" / "] folder"  # a path holding [/]
    images.mkdir(parents=True)
    (images / "bad[red]x.jpg").write_bytes(b"not a jpeg")
    shutil.copy(next(sample_copy(coco_sample, tmp_path / "root")["test"].glob("*.jpg")), images / "good.jpg")
    done = cocoshard(
        "predict",
        "--checkpoint",
        tiny_run / "best.pt",
        "--images",
        images,
        "--out",
        tmp_path / "p.json",
        "--device",
        "cpu",
    )
    refused(done, "bad[red]x.jpg")
    assert "MarkupError" not in done.text
    refused(
        cocoshard("pack", "--root", tmp_path / "missing [/] root [bold]", "--out", tmp_path / "s"),
        "missing [/] root [bold]",
    )


# ---------------------------------------------------------------------------- 15. names that are not UTF-8


def test_15_test_images_whose_names_are_not_utf8_are_rejected_with_a_reason(coco_sample, tmp_path):
    paths = sample_copy(coco_sample, tmp_path / "root")
    photo = next(paths["test"].glob("*.jpg")).read_bytes()
    for raw in (b"\xff1.jpg", b"\xfe1.jpg"):
        with open(os.path.join(os.fsencode(paths["test"]), raw), "wb") as f:
            f.write(photo)
    out = tmp_path / "shards"
    done = cocoshard("pack", "--root", paths["root"], "--out", out)
    assert done.code == 0, done.text[-2000:]
    manifest = json.loads((out / MANIFEST).read_text())
    reasons = [r["reason"] for r in manifest["rejected"]]
    assert sum("UTF-8" in reason for reason in reasons) == 2, reasons
    assert manifest["splits"]["test"]["samples"] == len(list(paths["test"].glob("*.jpg"))) - 2
    assert cocoshard("inspect", "--shards", out, "--verify").code == 0


# ---------------------------------------------------------------------------- 16. keys that are not stems


@pytest.mark.parametrize("key", ["000000000139.jpg", "", "a/b"])
def test_16_format_only_evaluate_refuses_keys_that_cannot_be_image_stems(key, tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({"000000000009": [1], key: [2]}))
    refused(cocoshard("evaluate", "--predictions", predictions), repr(key) if key else "empty")


def test_16_a_well_formed_submission_passes_the_format_only_check(tmp_path):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({"000000000009": [1, 5], "000000000025": []}))
    done = cocoshard("evaluate", "--predictions", predictions)
    assert done.code == 0 and "format OK" in done.text, done.text


SLOW_WORKERS = KILL_WORKERS.replace("os.kill(os.getpid(), signal.SIGKILL)", "__import__('time').sleep(60)")


def test_8_ctrl_c_during_pack_stops_its_workers_at_once(coco_sample, tmp_path):
    script = tmp_path / "slow_workers.py"
    script.write_text(SLOW_WORKERS)
    out = tmp_path / "shards"
    pack = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "cocoshard.prepare.pack",
            "write_shard",
            "pack",
            "--root",
            str(coco_sample),
            "--out",
            str(out),
            "--workers",
            "2",
        ],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while (
        not list(out.glob(LOCK_FILE)) or len(_children(pack.pid)) < 2
    ):  # workers started, sleeping in a task
        assert time.monotonic() < deadline and pack.poll() is None
        time.sleep(0.2)
    time.sleep(1)
    started = time.monotonic()
    os.killpg(pack.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = pack.communicate(timeout=30)
    assert time.monotonic() - started < 15  # not the 60 s the workers' tasks would take
    assert pack.returncode == 130 and "Traceback" not in stderr, stderr
    assert not (out / MANIFEST).exists() and not list(out.glob("*.tmp*"))


def _children(pid: int) -> list[str]:
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        found += listing.read_text().split()
    return found
