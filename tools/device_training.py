"""The device check's sections that train and predict on generated data, and the loader bench.

data     a generated set at the challenge's resolution, packed as jpeg and raw shards, its size
         chosen from the budget: a calibration set measures how fast this machine makes data, the
         step ceiling says how fast an epoch can go, and the set is the largest that both the data
         section's and the epochs section's shares allow (at most the challenge's 52,000)
epochs   one timed `cocoshard train --amp` epoch per loader mode, GPU utilisation sampled
predict  a test submission (format check) and the val split's F1 from the first epoch's run
bench    the loader and decode benches (bench/) on this device, their images sized to what is left
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from device_sections import (
    ASSUMED_STEP_RATE,
    EPOCH_MODEL,
    FULL_TRAIN,
    MODES,
    STARTUP_S,
    Clock,
    Run,
    SectionCut,
    cocoshard,
    command,
)

CALIBRATION = {"cuda": 600, "cpu": 48}  # train images of the calibration set
REHEARSAL_TRAIN = 96  # the most a CPU rehearsal generates
VAL_SHARE = 0.2  # pack's validation share: an epoch also validates this much


# ----------------------------------------------------------------------------------- data


def _generate(run: Run, name: str, train: int, clock: Clock) -> tuple[dict[str, Path], float]:
    """synth + pack (jpeg and raw) of `train` images; the shards and the seconds it took."""
    root, started = run.work / name, time.perf_counter()
    test = max(16, min(5_000, train // 10))
    cocoshard("synth", "--out", str(root / "synth"), "--train", str(train), "--test", str(test),
              "--size", str(run.size), clock=clock)  # fmt: skip
    shards = {fmt: root / f"shards-{fmt}" for fmt in ("jpeg", "raw")}
    for fmt, out in shards.items():
        cocoshard("pack", "--root", str(root / "synth"), "--out", str(out), "--format", fmt, clock=clock)
    return shards, time.perf_counter() - started


def choose_train_images(
    images_per_s: float, data_left_s: float, epochs_share_s: float, step_rate: float, device: str, cap: int
) -> tuple[int, str]:
    """How many train images to generate, and why: the most that fits the data section's time left
    (at the measured rate, 15% spare) and one epoch per loader mode within the epochs section's share
    (each run's startup, then train + validation at 70% of the step's ceiling)."""
    by_data = int(images_per_s * data_left_s * 0.85)
    per_mode = epochs_share_s / len(MODES) - STARTUP_S[device]
    by_epochs = int(max(per_mode, 0) * step_rate * 0.7 / (1 + VAL_SHARE))
    chosen = max(0, min(cap, by_data, by_epochs))
    limit = {
        cap: f"the cap of {cap:,}",
        by_data: "the data section's share",
        by_epochs: "the epochs section's share",
    }
    why = (
        f"{chosen:,} images: data is made at {images_per_s:,.0f} images/s here and the data section has "
        f"{data_left_s:.0f} s left (room for {by_data:,}); the epochs section's share is "
        f"{epochs_share_s:.0f} s for {len(MODES)} loader modes at ~{step_rate:,.0f} images/s "
        f"(room for {by_epochs:,}); bound by "
        f"{limit[chosen] if chosen in limit else 'the smallest'}"
    )
    return chosen, why


def make_data(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """A calibration set, then the set the budget allows (or the calibration set when that is all)."""
    started = time.perf_counter()
    cocoshard("info", "--brief", clock=clock)
    startup = time.perf_counter() - started  # what each of the 3 commands of a generation costs anyway
    calibration = CALIBRATION[run.device]
    shards, seconds = _generate(run, "calibration", calibration, clock)
    rate = calibration * 1.1 / max(seconds - 3 * startup, seconds * 0.2)  # train + test, synth + 2 packs
    step_rate = run.step_rate or ASSUMED_STEP_RATE[run.device]
    found.update(
        calibration={
            "train_images": calibration,
            "seconds": round(seconds, 1),
            "command_startup_s": round(startup, 1),
            "images_per_s": round(rate, 1),
        }
    )
    if run.step_rate is None:
        found["assumed_step_rate"] = step_rate
    cap = REHEARSAL_TRAIN if run.cpu else min(FULL_TRAIN, run.args.max_train)
    data_left = clock.left() - 3 * startup
    chosen, why = choose_train_images(rate, data_left, run.projected("epochs"), step_rate, run.device, cap)
    found.update(chosen=chosen, why=why)
    print(f"   data: {why}", flush=True)
    if chosen > calibration * 1.25:
        shards, seconds = _generate(run, "data", chosen, clock)
        found["generate_s"] = round(seconds, 1)
    else:
        chosen = calibration
        found["why"] += f"; no larger than the calibration set, which is used ({calibration:,} images)"
    found.update(train_images=chosen, size=run.size)
    run.shards = shards


# ----------------------------------------------------------------------------------- epochs


class UtilisationSampler:
    """GPU utilisation (%) sampled every `every` seconds while the block runs (NVML, else nvidia-smi)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        import torch

        with contextlib.suppress(Exception):
            return float(torch.cuda.utilization(0))
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True, text=True, timeout=5,
            ).stdout  # fmt: skip
            return float(out.strip().splitlines()[0])
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Mean and median while the GPU was in use (between its first and last busy sample)."""
        busy = [i for i, value in enumerate(self.samples) if value > 0]
        if not busy:
            return {"samples": len(self.samples)}
        window = self.samples[busy[0] : busy[-1] + 1]
        return {"samples": len(window), "mean_pct": round(statistics.fmean(window), 1),
                "median_pct": round(statistics.median(window), 1)}  # fmt: skip


def _epoch(run: Run, name: str, loader: str, decode: str, pixel_format: str, clock: Clock) -> dict[str, Any]:
    out = run.work / "runs" / name
    model = "cocoshard_tiny" if run.cpu else EPOCH_MODEL
    row: dict[str, Any] = {"mode": name, "model": model}
    with UtilisationSampler() if not run.cpu else contextlib.nullcontext() as sampler:
        started = time.perf_counter()
        cocoshard(
            "train", "--shards", str(run.shards[pixel_format]), "--out", str(out), "--model", model,
            "--weights", "none", "--amp", "--epochs", "1", "--batch-size", str(run.args.batch_size),
            "--loader", loader, "--decode", decode, "--device", run.device, "--size", str(run.size),
            clock=clock,
        )  # fmt: skip
        row["wall_s"] = round(time.perf_counter() - started, 1)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    row.update(
        images_per_s=round(record["images_per_s"], 1),
        train_s=round(record["time_s"], 1),
        data_wait_share=round(record["data_wait_s"] / max(record["time_s"], 1e-9), 3),
        gpu_utilisation=sampler.summary() if sampler is not None else {},
        val_f1=round(record["val"][record["selected"]]["server_f1"], 4),
    )
    if run.checkpoint is None:
        run.checkpoint, run.checkpoint_shards = out / "best.pt", run.shards[pixel_format]
    return row


def epochs(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """One `cocoshard train --amp` epoch per loader mode, each started only while time is left."""
    rows = found.setdefault("rows", [])
    for name, loader, decode, pixel_format in MODES:
        if clock.left() < STARTUP_S[run.device]:
            rows.append({"mode": name, "skipped": f"{clock.left():.0f} s left of the section's share"})
            continue
        try:
            rows.append(_epoch(run, name, loader, decode, pixel_format, clock))
        except SectionCut as exc:
            rows.append({"mode": name, "skipped": str(exc)})
        except Exception as exc:
            rows.append({"mode": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
        print(f"   {rows[-1]}", flush=True)


# ----------------------------------------------------------------------------------- predict


def predict_and_evaluate(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """A test submission (checked for format) and the val split's leaderboard F1, from one run."""
    if run.checkpoint is None or not run.checkpoint.exists():
        raise RuntimeError("no checkpoint: no epoch finished")
    shards = run.checkpoint_shards or run.shards["jpeg"]  # predict refuses shards it was not trained on
    for split in ("test", "val"):
        out = run.work / f"{split}.json"
        started = time.perf_counter()
        cocoshard("predict", "--checkpoint", str(run.checkpoint), "--shards", str(shards), "--split", split,
                  "--out", str(out), "--device", run.device, clock=clock)  # fmt: skip
        found[f"predict_{split}_s"] = round(time.perf_counter() - started, 1)
        source = ["--images", str(shards)] if split == "test" else ["--labels", str(shards)]
        text = cocoshard("evaluate", "--predictions", str(out), *source, "--json", clock=clock)
        found[f"evaluate_{split}"] = json.loads(text.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- bench


def bench(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """The loader bench (`pytest bench/test_loaders.py bench/test_decode.py --benchmark`) on this device,
    its size chosen from the time left; the training-step bench is the ceiling section's."""
    latest = run.work / "bench.json"
    if run.cpu:
        images, rounds, batch = 64, 1, 16
    elif clock.left() >= 240:
        images, rounds, batch = 2_000, 3, 128
    else:
        images, rounds, batch = (1_000, 2, 128) if clock.left() >= 90 else (512, 1, 128)
    args = ["bench/test_loaders.py", "bench/test_decode.py", "--benchmark", "--bench-out", str(latest)]
    args += ["--bench-images", str(images), "--bench-rounds", str(rounds), "--bench-batch-size", str(batch)]
    args += ["--peers"] if run.args.peers else []
    found["command"] = "pytest -q " + " ".join(a for a in args if a != str(latest))
    command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], clock)
    found["report"] = json.loads(Path(latest).read_text())
