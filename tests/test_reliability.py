"""Faults that cross modules: kill -9 of pack and train at chosen calls, shards damaged after packing,
untrusted checkpoints and tar members, and property tests of the parsers user files go through.

A kill is deterministic: the command runs under `KILLER`, a wrapper that replaces one function
(`os.replace`, `torch.save`, `cocoshard.prepare.pack.add_member`, ...) and SIGKILLs the whole process group,
forked workers included, at its Nth call. Production code has no hook for it. docs/reliability.md
lists every fault tried here and in the module tests, what the tool does, and the test that proves it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cocoshard import cli
from cocoshard.atomic import TMP_PREFIX
from cocoshard.errors import UserError
from cocoshard.loading.loader import build_loader
from cocoshard.loading.spec import LoaderSpec
from cocoshard.prepare.manifest import MANIFEST
from cocoshard.pure.format import FORMAT_VERSION, encode_labels, is_shard_file, npy_layout
from cocoshard.pure.labels import LabelError, parse_cls
from cocoshard.scoring.submission import parse_submission_text, validate_submission
from cocoshard.training.checkpoint import BEST, LAST, load_checkpoint
from cocoshard.training.runlog import METRICS_LOG, THRESHOLDS_FILE

REPO = Path(__file__).resolve().parents[1]
KILLER = '''"""killer.py TARGET N WHEN MATCH -- ARGS: `python -m cocoshard ARGS`, SIGKILLed at the Nth call of
TARGET (module.function) whose str/path arguments contain MATCH: before it, after it, or "midway"
(torch.save only: half of the bytes reach the file)."""
import importlib, io, os, runpy, signal, sys

target, call, when, match = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
module_name, _, name = target.rpartition(".")
module = importlib.import_module(module_name)
real, seen = getattr(module, name), 0


def die():
    os.killpg(os.getpgrp(), signal.SIGKILL)


def patched(*args, **kwargs):
    global seen
    if match and not any(isinstance(a, (str, os.PathLike)) and match in os.fspath(a) for a in args):
        return real(*args, **kwargs)
    seen += 1
    if seen != call:
        return real(*args, **kwargs)
    if when == "midway":
        whole = io.BytesIO()
        real(args[0], whole, **kwargs)
        args[1].write(whole.getvalue()[: len(whole.getvalue()) // 2])
        args[1].flush()
        os.fsync(args[1].fileno())
    elif when == "after":
        real(*args, **kwargs)
    die()


setattr(module, name, patched)
sys.argv = ["cocoshard", *sys.argv[sys.argv.index("--") + 1:]]
runpy.run_module("cocoshard", run_name="__main__", alter_sys=True)
'''
QUIET_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "200",
}  # one thread: fast on a busy CPU, same numbers


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich wraps at 80 columns off a terminal, even inside a path: give messages one line."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def killer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("killer") / "killer.py"
    path.write_text(KILLER)
    return path


def run_killed(killer: Path, target: str, call: int, when: str, match: str, *args: str) -> None:
    """Run `cocoshard ARGS` until the chosen call kills it; fail if it ends any other way."""
    process = subprocess.Popen(
        [sys.executable, str(killer), target, str(call), when, match, "--", *args],
        env=QUIET_ENV,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, (
        f"ended with {process.returncode} before {target} call {call}: {err.decode()[-2000:]}"
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a name pack writes (temporaries excluded)."""
    return {p.name: sha256(p) for p in folder.iterdir() if is_shard_file(p.name)}


# ----------------------------------------------------------------------------------- kill -9 during pack

PACK = {"shard_samples": 16, "workers": 2}
PACK_FLAGS = ["--shard-samples", "16", "--workers", "2"]


@pytest.fixture(scope="module")
def pack_runs(synth_root: Path, pack_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an earlier run with other settings, left in the folder the killed run writes to; the
    reference run)."""
    earlier = pack_dir(synth_root, tmp_path_factory.mktemp("earlier"), seed=1, shard_samples=12)
    return earlier, pack_dir(synth_root, tmp_path_factory.mktemp("reference"), **PACK)


def assert_manifest_describes_whole_shards(folder: Path) -> bool:
    """False when there is no manifest; else every shard it lists has the listed size and sha256."""
    if not (folder / MANIFEST).exists():
        return False
    manifest = json.loads((folder / MANIFEST).read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            shard = folder / entry["name"]
            assert shard.is_file(), f"the manifest lists {entry['name']}, which is missing"
            assert (shard.stat().st_size, sha256(shard)) == (entry["bytes"], entry["sha256"]), entry["name"]
    return True


@pytest.mark.parametrize(
    "target, call, when, match, manifest_after",
    [
        (
            "cocoshard.prepare.pack.map_in_workers",
            1,
            "before",
            "",
            False,
        ),  # early: old manifest gone, nothing written yet (the split is planned before it goes)
        (
            "cocoshard.prepare.pack.add_member",
            70,
            "before",
            "",
            False,
        ),  # mid-shard, in a worker's second shard
        ("os.replace", 2, "before", ".tar", False),  # a whole shard not yet under its final name
        (
            "cocoshard.prepare.pack._remove_unlisted",
            1,
            "before",
            "",
            False,
        ),  # every shard written, old ones still there
        ("os.replace", 1, "before", MANIFEST, False),  # manifest complete under its temporary name
        ("os.replace", 1, "after", MANIFEST, True),  # manifest renamed, its folder not yet fsync'ed
    ],
    ids=["early", "mid-shard", "shard-unrenamed", "before-cleanup", "manifest-unrenamed", "manifest-renamed"],
)
def test_pack_killed_anywhere_leaves_no_lying_manifest_and_reruns_identically(
    tmp_path, killer, synth_root, pack_dir, pack_runs, target, call, when, match, manifest_after
) -> None:
    earlier, reference = pack_runs
    out = Path(shutil.copytree(earlier, tmp_path / "shards"))
    old, new = shard_digests(earlier), shard_digests(reference)
    run_killed(
        killer, target, call, when, match, "pack", "--root", str(synth_root), "--out", str(out), *PACK_FLAGS
    )
    assert assert_manifest_describes_whole_shards(out) == manifest_after
    for name, digest in shard_digests(out).items():  # under a final name: a whole shard, old or new
        assert digest in (old.get(name), new.get(name)), (
            f"{name} is neither the earlier run's nor the new one's"
        )
    pack_dir(synth_root, out, **PACK)
    assert shard_digests(out) == new
    assert assert_manifest_describes_whole_shards(out)
    assert not list(out.glob(TMP_PREFIX + "*"))


# ----------------------------------------------------------------------------------- kill -9 during training

TRAIN = [
    "--model",
    "cocoshard_tiny",
    "--device",
    "cpu",
    "--size",
    "32",
    "--batch-size",
    "16",
    "--workers",
    "0",
    "--weights",
    "none",
    "--epochs",
    "2",
    "--log-every",
    "1",
    "--seed",
    "3",
    "--no-amp",
    # one thread whatever else the machine runs: a thread count chosen from a busy machine would
    # change the order of float sums, and the resumed run must equal the uninterrupted one exactly
    "--threads",
    "1",
]
STEPS_PER_EPOCH = 5  # 88 train images of coco-sample in batches of 16
TIMING = {"time_s", "images_per_s", "val_time_s", "data_wait_s"}


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards), "--out", str(run), *TRAIN, *extra]


def train_subprocess(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cocoshard", *args], env=QUIET_ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / METRICS_LOG).read_text().splitlines()]


def outcome(run: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every epoch's figures (timings aside) and the final weights."""
    figures = [{k: v for k, v in r.items() if k not in TIMING} for r in records(run)]
    return figures, load_checkpoint(run / LAST)["model"]


def assert_same_outcome(run: Path, reference: tuple) -> None:
    """The figures and weights of the uninterrupted run; best.pt and thresholds.json of the epoch
    the log calls best."""
    figures, weights = outcome(run)
    assert figures == reference[0]
    assert weights.keys() == reference[1].keys() and all(
        torch.equal(weights[k], reference[1][k]) for k in weights
    )
    best_epoch = figures[-1]["best_epoch"]
    assert (run / BEST).is_file(), f"the log names epoch {best_epoch} best, and there is no {BEST}"
    assert load_checkpoint(run / BEST)["epoch"] == best_epoch
    assert json.loads((run / THRESHOLDS_FILE).read_text())["epoch"] == best_epoch
    assert not list(run.glob(TMP_PREFIX + "*"))


@pytest.fixture(scope="module")
def uninterrupted(sample_shards_jpeg: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_subprocess(*train_args(sample_shards_jpeg, run))
    return outcome(run)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, call, when, match, saved_epoch",
    [
        ("cocoshard.training.train.train_step", STEPS_PER_EPOCH + 2, "before", "", 1),  # mid-epoch 2
        (
            "torch.save",
            3,
            "midway",
            "",
            1,
        ),  # half of epoch 2's last.pt written (1: last.pt, 2: best.pt of epoch 1)
        (
            "os.replace",
            1,
            "after",
            LAST,
            1,
        ),  # epoch 1's last.pt in place, its best.pt (epoch 1 always improves) not yet
    ],
    ids=["mid-epoch", "during-last.pt-write", "between-last.pt-and-best.pt"],
)
def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(
    tmp_path, killer, sample_shards_jpeg, uninterrupted, target, call, when, match, saved_epoch
) -> None:
    run = tmp_path / "run"
    run_killed(killer, target, call, when, match, *train_args(sample_shards_jpeg, run))
    assert load_checkpoint(run / LAST)["epoch"] == saved_epoch
    if when == "midway":
        assert [p.name.startswith(TMP_PREFIX + LAST) for p in run.glob(TMP_PREFIX + "*")] == [True]
    train_subprocess(*train_args(sample_shards_jpeg, run, "--resume"))
    assert_same_outcome(run, uninterrupted)


@pytest.mark.slow
def test_a_kill_during_the_first_checkpoint_loses_only_that_epoch(
    tmp_path, killer, sample_shards_jpeg, uninterrupted, capsys
) -> None:
    run = tmp_path / "run"
    run_killed(killer, "torch.save", 1, "midway", "", *train_args(sample_shards_jpeg, run))
    assert not (run / LAST).exists()
    assert cli.main(train_args(sample_shards_jpeg, run, "--resume")) == 2
    assert f"no {run / LAST} to continue" in " ".join(capsys.readouterr().err.split())
    train_subprocess(*train_args(sample_shards_jpeg, run))  # the same command without --resume starts again
    assert_same_outcome(run, uninterrupted)


# ----------------------------------------------------------------------------------- damaged shards

VICTIM = "val-000001.tar"  # 16 of the 38 val images of coco-sample


def member_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(shard) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar}


def damage(folder: Path, kind: str, victim: str = VICTIM) -> None:
    """One kind of damage to a shard after packing; the manifest is left as pack wrote it."""
    shard = folder / victim
    data = bytearray(shard.read_bytes())
    offsets = member_offsets(shard)
    if kind == "labels-byte":  # one more class: still a valid multi-hot row, a silent wrong label if trusted
        start, size = offsets[next(n for n in sorted(offsets) if n.endswith(".labels.npy"))]
        start += npy_layout(bytes(data[start : start + size])).offset
        data[start + int(np.argmin(data[start : start + 80]))] ^= 1
    elif kind == "pixel-byte":
        start, size = offsets[next(n for n in sorted(offsets) if n.endswith(".jpg"))]
        data[start + size // 2] ^= 0xFF
    elif kind == "truncated":
        data = data[: len(data) // 2]
    if kind == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(bytes(data))


DAMAGE = ["labels-byte", "pixel-byte", "truncated", "deleted"]


@pytest.fixture
def one_thread():
    """Train in-process on one thread (a busy 2-core CPU runs tiny models 10x slower on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_shard_is_named_by_verify_and_by_train(
    kind, tmp_path, sample_shards_jpeg, capsys, one_thread
) -> None:
    shards = Path(shutil.copytree(sample_shards_jpeg, tmp_path / "shards"))
    damage(shards, kind)
    assert cli.main(["inspect", "--shards", str(shards), "--verify", "--workers", "1"]) == 1
    assert f"{VICTIM}:" in "".join(capsys.readouterr().out.split())
    quick = ["--epochs", "1", "--max-steps", "1"]
    assert cli.main(train_args(shards, tmp_path / "stop", *quick)) == 2
    assert VICTIM in " ".join(capsys.readouterr().err.split())
    code = cli.main(train_args(shards, tmp_path / "skip", *quick, "--skip-bad-samples"))
    if kind == "deleted" and code == 2:  # a shard the manifest lists is missing: stopping by name is enough
        assert VICTIM in " ".join(capsys.readouterr().err.split())
        return
    assert code == 0
    (record,) = records(tmp_path / "skip")
    val, lost = shard_keys(sample_shards_jpeg, "val"), shard_keys(sample_shards_jpeg, "val", VICTIM)
    assert record["val"]["model"]["images"] == len(val) - len(lost)
    assert record["skipped_samples"] == len(lost), "every sample of the damaged shard is counted in the log"


def shard_keys(folder: Path, split: str, *names: str) -> dict[str, bytes]:
    """key -> labels member of the samples in the named shards of a split (all of them by default)."""
    entries = json.loads((folder / MANIFEST).read_text())["splits"][split]["shards"]
    labels = {}
    for entry in entries:
        if names and entry["name"] not in names:
            continue
        with tarfile.open(folder / entry["name"]) as tar:
            labels.update(
                {
                    m.name.split(".")[0]: np.load(
                        io.BytesIO(tar.extractfile(m).read()), allow_pickle=False
                    ).tobytes()
                    for m in tar
                    if m.name.endswith(".labels.npy")
                }
            )
    return labels


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_skipping_never_yields_a_wrong_label(split, mode, tmp_path, sample_shards_jpeg) -> None:
    truth, victim = shard_keys(sample_shards_jpeg, split), f"{split}-000001.tar"
    lost = shard_keys(sample_shards_jpeg, split, victim)
    shards = Path(shutil.copytree(sample_shards_jpeg, tmp_path / "shards"))
    damage(shards, "labels-byte", victim)
    spec = LoaderSpec(
        batch_size=8,
        device="cpu",
        mode=mode,
        train=split == "train",
        workers=2 if mode == "stream" else 0,
        skip_bad_samples=True,
    )
    loader = build_loader(shards, split, spec)
    try:
        seen = [
            (key, row)
            for batch in loader
            for key, row in zip(batch.keys, batch.labels.to(torch.uint8).numpy())
        ]
    finally:
        loader.close()
    assert seen and all(row.tobytes() == truth[key] for key, row in seen)
    assert not lost.keys() & {key for key, _ in seen}
    assert loader.skipped_samples == len(lost)
    if split == "val":  # evaluation reads every other sample once
        assert sorted(key for key, _ in seen) == sorted(truth.keys() - lost.keys())


# ----------------------------------------------------------------------------------- untrusted files


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_by_every_command(
    tmp_path, coco_sample, sample_shards_jpeg, capsys
) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    names = ["model", "ema", "optimizer", "epoch", "step", "config", "classes", "thresholds"]
    torch.save({name: RunsCode(marker) for name in names}, evil)
    images = coco_sample / "images/test-resized/test-resized"
    commands = [
        ["predict", "--checkpoint", str(evil), "--images", str(images), "--out", str(tmp_path / "p.json")],
        train_args(sample_shards_jpeg, tmp_path / "run", "--weights", str(evil)),
    ]
    for command in commands:
        assert cli.main(command) == 2, command[0]
        err = " ".join(capsys.readouterr().err.split())
        assert str(evil) in err and "weights_only=True" in err, err
    assert not marker.exists() and not (tmp_path / "p.json").exists()


def test_the_package_never_unpickles_or_extracts() -> None:
    """Every torch.load and hub download passes weights_only=True; no pickle.load, np.load with
    pickles, or extract."""
    problems = []
    for path in sorted((REPO / "cocoshard").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name, keywords = ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.name}:{node.lineno} {name}"
            if (
                name.endswith(("torch.load", "load_state_dict_from_url"))
                and keywords.get("weights_only") != "True"
            ):
                problems.append(f"{where} without weights_only=True")
            if name.startswith("pickle.") or name.endswith((".extract", ".extractall")):
                problems.append(where)
            if name.endswith("np.load") and keywords.get("allow_pickle", "False") != "False":
                problems.append(f"{where} with allow_pickle")
    assert not problems


def _jpeg(width: int = 20, height: int = 10) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def hostile_shards(folder: Path, kind: str, outside: Path) -> Path:
    """One val shard: two good samples around one whose image member is hostile: a `..` path, an absolute
    path into `outside`, or a symlink to a file there. Sizes and sha256 in the manifest match, as a
    forger would make them."""
    hostile = {"parent": "../../escaped", "absolute": str(outside / "escaped"), "symlink": "000000000003"}[
        kind
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("000000000001", hostile, "000000000002"):
            for field, payload in (
                ("jpg", _jpeg()),
                ("labels.npy", encode_labels(np.eye(80, dtype=np.uint8)[3])),
            ):
                info = tarfile.TarInfo(f"{key}.{field}")
                if kind == "symlink" and key == hostile and field == "jpg":
                    info.type, info.linkname = tarfile.SYMTYPE, str(outside / "escaped.jpg")
                    tar.addfile(info)
                    continue
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    folder.mkdir(parents=True)
    (folder / "val-000000.tar").write_bytes(data)
    entry = {
        "name": "val-000000.tar",
        "samples": 3,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    splits = {
        "train": {"samples": 0, "shards": [], "class_counts": [0] * 80},
        "test": {"samples": 0, "shards": []},
        "val": {"samples": 3, "shards": [entry], "class_counts": [0] * 80},
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "a forger",
        "pixel_format": "jpeg",
        "size": 32,
        "seed": 0,
        "val_fraction": 0.2,
        "split_method": "none",
        "splits": splits,
        "rejected": [],
        "classes": [f"class {i}" for i in range(80)],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


HOSTILE = ["parent", "absolute", "symlink"]


@pytest.mark.parametrize("mode", ["stream", "resident"])
@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_members_are_refused_or_skipped_by_the_loader(kind, mode, tmp_path, monkeypatch) -> None:
    outside, work = tmp_path / "outside", tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a relative escape would land under tmp_path
    shards = hostile_shards(tmp_path / "shards", kind, outside)
    settings = dict(batch_size=4, device="cpu", mode=mode, train=False, seed=0)
    with pytest.raises(UserError, match="val-000000.tar"):
        list(build_loader(shards, "val", LoaderSpec(**settings)))
    loader = build_loader(shards, "val", LoaderSpec(skip_bad_samples=True, **settings))
    assert [key for batch in loader for key in batch.keys] == ["000000000001", "000000000002"]
    assert loader.skipped_samples == 1
    assert not outside.exists() and not list(tmp_path.rglob("*escaped*"))


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_members_fail_verification(kind, tmp_path, monkeypatch, capsys) -> None:
    outside, work = tmp_path / "outside", tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    shards = hostile_shards(tmp_path / "shards", kind, outside)
    assert cli.main(["inspect", "--shards", str(shards), "--verify", "--workers", "1"]) == 1
    assert "val-000000.tar:" in "".join(capsys.readouterr().out.split())
    assert not outside.exists() and not list(tmp_path.rglob("*escaped*"))


# ----------------------------------------------------------------------------------- properties of parsers

# What the statement's Dataset reads: one integer per line. Around it: blank lines, spaces, CRLF.
cls_lines = st.one_of(
    st.integers(0, 120).map(str), st.integers(0, 79).map(lambda i: f" {i}\t"), st.sampled_from(["", "  "])
)
cls_texts = st.tuples(st.lists(cls_lines, max_size=20), st.sampled_from(["\n", "\r\n"])).map(
    lambda t: t[1].join(t[0])
)
HUGE_ID = "9" * 5000  # more digits than int() converts


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), cls_texts))
@example(HUGE_ID)
@example("3\n" + "0" * 4400 + "7\n")
def test_cls_parser_answers_any_input_with_ids_or_a_label_error(content) -> None:
    try:
        ids, duplicates = parse_cls(content)
    except LabelError:
        return
    assert list(ids) == sorted(set(ids)) and all(0 <= i < 80 for i in ids) and duplicates >= 0


@settings(max_examples=200, deadline=None)
@given(cls_texts)
def test_cls_parser_agrees_with_the_statements_reader(text: str) -> None:
    wanted = [int(line) for line in text.splitlines() if line.strip()]  # the statement's int() per line
    if any(i >= 80 for i in wanted):
        with pytest.raises(LabelError):
            parse_cls(text)
    else:
        assert parse_cls(text).ids == tuple(sorted(set(wanted)))


def test_pack_rejects_a_cls_file_it_cannot_convert_instead_of_crashing(
    tmp_path, coco_sample, pack_dir
) -> None:
    root = Path(shutil.copytree(coco_sample, tmp_path / "ms-coco"))
    huge = sorted((root / "labels/train/train").glob("*.cls"))[0]
    huge.write_text(HUGE_ID + "\n")
    manifest = json.loads((pack_dir(root, tmp_path / "shards") / MANIFEST).read_text())
    assert [item["path"] for item in manifest["rejected"] if item["path"] == str(huge)] == [str(huge)]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
DEEP = "[" * 100_000 + "]" * 100_000


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values.map(json.dumps), st.text()))
@example(DEEP)
@example('{"000000000001": ' * 50_000 + "[]" + "}" * 50_000)
def test_submission_reader_answers_any_text_with_a_submission_or_a_user_error(text: str) -> None:
    try:
        checked = validate_submission(parse_submission_text(text))
    except UserError:
        return
    assert all(
        isinstance(k, str) and v == sorted(set(v)) and all(0 <= i < 80 for i in v) for k, v in checked.items()
    )


def test_evaluate_names_a_submission_nested_too_deep(tmp_path, capsys) -> None:
    predictions = tmp_path / "deep.json"
    predictions.write_text(DEEP)
    assert cli.main(["evaluate", "--predictions", str(predictions)]) == 2
    assert str(predictions) in " ".join(capsys.readouterr().err.split())
