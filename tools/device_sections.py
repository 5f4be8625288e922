"""The sections of the device check, in the order they run; each writes its figures into `found`.

cuda-tests  `pytest -m cuda -v`: passed/failed per test, its log streamed to the output folder
decode      JPEG decoding on the real photos: each backend on the host, the batched decode on the device
ceiling     cocoshard's training step on a batch already on the device (images/s, host syncs per step)
data        a generated set sized to the budget (a calibration run measures how fast it is made)
epochs      one timed `cocoshard train --amp` epoch per loader mode, GPU utilisation sampled
predict     a test submission (format check) and the val split's F1
bench       `pytest bench/ --benchmark` on this device, sized to what is left

Every section gets a `Clock` (its share of the budget, `device_check.Budget`): subprocesses are
given what is left of it as their timeout, and an item that would not fit is skipped with the
reason. The calls into cocoshard's own code are few and kept in `trainer_for_ceiling`,
`ceiling_step` and `decode_batch`, so that a change of those seams touches one place here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "tests" / "data" / "coco-sample"
MODES = (  # (name, --loader, --decode, pixel format), in the order they run: most telling first
    ("resident", "resident", "host", "raw"),
    ("stream-raw", "stream", "host", "raw"),
    ("stream-jpeg", "stream", "host", "jpeg"),
    ("resident-jpeg-device", "resident", "device", "jpeg"),
    ("stream-jpeg-device", "stream", "device", "jpeg"),
)
CEILING_PLAN = (  # (model, torch.compile), most telling first
    ("resnet50", False),
    ("resnet18", False),
    ("maxvit_t", False),
    ("resnet50", True),
    ("resnet18", True),
    ("maxvit_t", True),
)
EPOCH_MODEL = "resnet18"
FULL_TRAIN = 52_000  # the challenge's train split (65k labelled images less a 20% validation share)
# Assumptions where nothing was measured yet (stated in the output when used)
ASSUMED_STEP_RATE = {"cuda": 2_000.0, "cpu": 150.0}  # images/s of an epoch when the ceiling is unknown
STARTUP_S = {"cuda": 20.0, "cpu": 8.0}  # one `cocoshard train` run beside its epoch: imports, val, tuning
ITEM_S = {"eager": {"cuda": 12.0, "cpu": 4.0}, "compiled": {"cuda": 70.0, "cpu": 40.0}}


class SectionCut(Exception):
    """A command ran past its section's share of the budget and was stopped."""


@dataclass
class Clock:
    """A section's share of the budget, as a deadline on the monotonic clock."""

    deadline: float

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass
class Run:
    """What the sections share: the settings, where to work, and what earlier sections found."""

    args: argparse.Namespace
    device: str  # "cuda", or "cpu" for the rehearsal
    work: Path
    out: Path
    projected: Callable[[str], float]  # a later section's share, if the ones before it use exactly theirs
    shards: dict[str, Path] = field(default_factory=dict)
    small_shards: Path | None = None
    step_rate: float | None = None  # resnet18's eager ceiling, images/s
    checkpoint: Path | None = None
    checkpoint_shards: Path | None = None  # the shards that checkpoint's run trained on

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def size(self) -> int:
        return 64 if self.cpu else 224


# ----------------------------------------------------------------------------------- commands


def command(args: list[str], clock: Clock, log: Path | None = None, echo: bool = False) -> str:
    """Run `args` in the repository with what is left of the clock as its timeout; its output.

    Streamed line by line into `log` (and this process's stdout with `echo`) as it comes, so that a
    run cut off at any moment keeps what was said. RuntimeError with the last lines when it fails,
    SectionCut when it runs out of time (its output so far is in the log)."""
    process = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )  # fmt: skip
    fired = threading.Event()
    timer = threading.Timer(max(clock.left(), 1.0), lambda: _stop(process, fired))
    timer.start()
    lines: list[str] = []
    with open(log, "a") if log else contextlib.nullcontext() as sink:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if sink:
                sink.write(line)
                sink.flush()
            if echo:
                print(line, end="", flush=True)
    code = process.wait()
    timer.cancel()
    shown = " ".join(["python", *args[1:5]]) + " ..."
    if fired.is_set():
        raise SectionCut(f"`{shown}` stopped at the end of the section's share of the budget")
    if code != 0:
        raise RuntimeError(f"`{shown}` exited with {code}:\n" + "".join(lines[-10:]).rstrip())
    return "".join(lines)


def _stop(process: subprocess.Popen, fired: threading.Event) -> None:
    fired.set()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)


def cocoshard(*args: str, clock: Clock) -> str:
    return command([sys.executable, "-m", "cocoshard", *args], clock)


# ----------------------------------------------------------------------------------- cuda-tests

_RESULT = re.compile(r"^(?P<test>\S+::\S+) (?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_FAILURE = re.compile(r"^(?:FAILED|ERROR) (?P<test>\S+::\S+)(?: - (?P<why>.*))?$")


def cuda_tests(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """`pytest -m cuda -v`, each test's outcome recorded (a cut run keeps those that finished)."""
    log = run.out / "cuda-tests.log"
    log.unlink(missing_ok=True)
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-v",
        "-rfE",
        "--tb=short",
        "-p",
        "no:cacheprovider",
    ]
    found["command"] = "pytest -m cuda -v -rfE --tb=short"
    error: Exception | None = None
    try:
        command(args, clock, log=log, echo=True)
    except (RuntimeError, SectionCut) as exc:
        error = exc
    tests: dict[str, str] = {}
    failures: dict[str, str] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        if (result := _RESULT.match(line)) is not None:
            tests[result["test"]] = result["outcome"].lower()
        elif (failure := _FAILURE.match(line)) is not None:
            failures[failure["test"]] = (failure["why"] or "")[:300]
    counts = {outcome: list(tests.values()).count(outcome) for outcome in sorted(set(tests.values()))}
    found.update(tests=tests, counts=counts, failures=failures, log=log.name)
    if isinstance(error, SectionCut):
        raise SectionCut(f"pytest stopped after its share of the budget; {len(tests)} tests had finished")
    if not tests:
        raise RuntimeError(f"no test marked cuda ran: {error}" if error else "no test marked cuda ran")
    bad = [name for name, outcome in tests.items() if outcome in ("failed", "error")]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(tests)} cuda tests failed: {', '.join(bad[:5])}")


# ----------------------------------------------------------------------------------- decode


def decode_batch(encoded: list[Any], device: Any) -> Any:
    """cocoshard's batched decode where the batch goes (the loaders' `--decode device`)."""
    from cocoshard.loading.device_decode import KIND_JPEG, decode_on_device

    keys = [str(i) for i in range(len(encoded))]
    images, _, _ = decode_on_device(encoded, [KIND_JPEG] * len(encoded), keys, canvas_size=256, device=device)
    return images


def decode_speed(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """µs per image of each backend's host decode, and images/s of the batched decode on the device,
    on the repository's real photos (COCO, long side 224 px, as the challenge has them)."""
    import torch

    from cocoshard.loading.image_backend import BACKEND, _torchcodec_or_why, load_backend

    paths = sorted(PHOTOS.glob("images/**/*.jpg"))
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    found.update(photos=len(encoded), backend=BACKEND.describe(), rows=[])
    codec = _torchcodec_or_why()
    for backend in [load_backend("torchvision"), codec]:
        if isinstance(backend, str):
            found["rows"].append({"what": "host decode, torchcodec", "skipped": backend})
            continue
        seconds = _best_of(lambda b=backend: [b.decode_jpeg(e) for e in encoded], clock, budget_s=0.1)
        found["rows"].append(
            {
                "what": f"host decode, {backend.describe()}",
                "us_per_image": round(seconds / len(encoded) * 1e6, 1),
            }
        )
    device = torch.device(run.device)
    batch = (encoded * (256 // len(encoded) + 1))[:256]
    seconds = _best_of(lambda: _synchronized(decode_batch(batch, device), device), clock, budget_s=0.4)
    found["rows"].append(
        {
            "what": f"decode_on_device, batch 256, {device.type}",
            "images_per_s": round(len(batch) / seconds, 1),
        }
    )


def _synchronized(result: Any, device: Any) -> Any:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def _best_of(work: Callable[[], object], clock: Clock, budget_s: float) -> float:
    """The fastest of a few timed calls (a warm-up first), within `budget_s` of the clock's share."""
    work()
    times: list[float] = []
    stop = time.monotonic() + max(1.0, clock.left() * budget_s)
    while len(times) < 5 and (not times or time.monotonic() < stop):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


# ----------------------------------------------------------------------------------- ceiling


def trainer_for_ceiling(run: Run, shards: Path, model: str, compiled: bool) -> tuple[Any, Any]:
    """cocoshard's trainer for `model` (its loaders closed: the batch is made on the device)."""
    from cocoshard import config
    from cocoshard.settings import resolve
    from cocoshard.training.runlog import RunLog
    from cocoshard.training.runtime import setup
    from cocoshard.training.trainer import build_trainer, enter_phase

    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(shards), "out": str(run.work / f"ceiling-{model}"), "model": model,
            "weights": "none", "device": run.device, "size": run.size, "batch_size": run.args.batch_size,
            "workers": 0, "amp": True, "channels_last": True, "compile": compiled, "epochs": 1,
        },
    )  # fmt: skip
    runtime = setup(run.device, amp=True)
    quiet = io.StringIO()  # its printed settings: the same for every model
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        trainer = build_trainer(cfg, runtime, RunLog(cfg.out, enabled=False))
    enter_phase(trainer, 0)
    trainer.train_loader.close()
    trainer.val_loader.close()
    return trainer, runtime


def ceiling_step(trainer: Any, runtime: Any, size: int, batch_size: int) -> Callable[[], None]:
    """One training step of `trainer` on a fixed random batch already on the device."""
    import torch

    from cocoshard.loading.batch import Batch
    from cocoshard.training.train import OnlineMetrics, train_step

    device = runtime.device
    inputs = torch.randn(batch_size, 3, size, size, device=device).to(runtime.amp_dtype or torch.float32)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(batch_size, 80, device=device) < 0.04).float()
    batch = Batch(None, None, labels, [str(i) for i in range(batch_size)], inputs=inputs)
    meter = OnlineMetrics(device)
    return lambda: train_step(trainer, batch, meter)


def step_ceiling(run: Run, shards: Path, model: str, compiled: bool) -> dict[str, Any]:
    """images/s and host synchronisations per step of one model's training step."""
    trainer, runtime = trainer_for_ceiling(run, shards, model, compiled)
    n = run.args.batch_size
    step = ceiling_step(trainer, runtime, run.size, n)
    warmup, steps = (2, 3) if run.cpu else (15 if compiled else 8, 30)
    for _ in range(warmup):
        step()
    _synchronized(None, runtime.device)
    syncs = count_host_syncs(step, runtime.device, steps=5)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronized(None, runtime.device)
    seconds = time.perf_counter() - started
    return {
        "model": model, "compile": compiled, "batch_size": n, "size": run.size,
        "images_per_s": round(steps * n / seconds, 1), "host_syncs_per_step": syncs,
        "amp_dtype": str(runtime.amp_dtype).split(".")[-1],
    }  # fmt: skip


def count_host_syncs(step: Callable[[], None], device: Any, steps: int) -> float | None:
    """Host synchronisations per call of `step`, as CUDA's sync debug mode reports them (None on a CPU)."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _synchronized(None, device)
    return sum("synchroniz" in str(w.message) for w in seen) / steps


def ceilings(run: Run, found: dict[str, Any], clock: Clock) -> None:
    """The step ceilings in CEILING_PLAN's order, each started only when it fits what is left."""
    shards = _small_shards(run, clock)
    rows = found.setdefault("rows", [])
    plan = [("cocoshard_tiny", False)] if run.cpu else CEILING_PLAN
    for model, compiled in plan:
        if compiled and not run.args.compile:
            continue
        needs = ITEM_S["compiled" if compiled else "eager"][run.device]
        if clock.left() < needs:
            rows.append({"model": model, "compile": compiled, "skipped": f"needs ~{needs:.0f} s, "
                         f"{clock.left():.0f} s left of the section's share"})  # fmt: skip
            continue
        try:
            rows.append(step_ceiling(run, shards, model, compiled))
        except Exception as exc:  # one model failing (maxvit_t under compile, say) leaves the others
            rows.append({"model": model, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"[:600]})
        print(f"   {rows[-1]}", flush=True)
    rates = [
        r["images_per_s"]
        for r in rows
        if r["model"] in (EPOCH_MODEL, "cocoshard_tiny") and not r["compile"] and "images_per_s" in r
    ]
    run.step_rate = max(rates) if rates else None


def _small_shards(run: Run, clock: Clock) -> Path:
    """A small generated set packed once (jpeg), what a trainer is built from when only its step is
    measured: two batches of train images, since a trainer refuses a batch larger than its split."""
    if run.small_shards is None:
        root, out = run.work / "small-synth", run.work / "small-jpeg"
        train = str(2 * run.args.batch_size)
        cocoshard(
            "synth",
            "--out",
            str(root),
            "--train",
            train,
            "--test",
            "16",
            "--size",
            str(run.size),
            clock=clock,
        )
        cocoshard("pack", "--root", str(root), "--out", str(out), "--format", "jpeg", clock=clock)
        run.small_shards = out
    return run.small_shards
