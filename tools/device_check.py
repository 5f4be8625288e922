"""The GPU check: what cocoshard does on one CUDA device, measured in one command (`tools/device-check`).

    $ tools/device-check                       # sized for < 8 minutes on one H100/H200
    $ tools/device-check --out bench/results/device --no-peers
    $ tools/device-check --rehearse-on-cpu     # every step, tiny, on a CPU: proves the script runs

It measures, and writes as one JSON and one markdown table (`device-check.json`, `device-check.md`
in --out) that the README's GPU section quotes as they are:
1. bench: `pytest bench/ --benchmark [--peers]` on the GPU: every loader mode delivering
   training-ready batches on the device, beside the peers that install there (DALI's GPU pipeline
   among them) and the folder baseline.
2. ceiling: images/s of cocoshard's own training step (ASL loss, fused AdamW, EMA) on batches
   already on the device, for resnet18, resnet50 and maxvit_t at 224, AMP + channels_last, eager
   and torch.compile; and the host synchronisations per steady-state step, counted by
   `torch.cuda.set_sync_debug_mode("warn")`.
3. epochs: one timed `cocoshard train --amp` epoch per loader mode on a generated 52,000-image set
   at the challenge's resolution: images/s, the share of the epoch spent waiting for data, the
   GPU utilisation sampled while it ran, and how far each is from the step's ceiling.
4. predict + evaluate: a submission for the test split (format check) and the val split's F1.

Without a CUDA device it says so and exits with status 2 before doing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_CUDA = 2
MODES = (  # (name, --loader, --decode, pixel format of the shards it reads)
    ("stream-jpeg", "stream", "host", "jpeg"),
    ("stream-raw", "stream", "host", "raw"),
    ("resident", "resident", "host", "raw"),
    ("stream-jpeg-device", "stream", "device", "jpeg"),
    ("resident-jpeg-device", "resident", "device", "jpeg"),
)
CEILING_MODELS = ("resnet18", "resnet50", "maxvit_t")
EPOCH_MODEL = "resnet18"


# ------------------------------------------------------------------------------------ settings


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/device-check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=str(REPO / "bench" / "results" / "device"),
        help="folder for device-check.json and device-check.md (default: %(default)s)",
    )
    parser.add_argument(
        "--work", default=None, help="folder for the generated data and runs (default: a temporary one)"
    )
    parser.add_argument(
        "--train", type=int, default=52_000, help="generated train images (default: %(default)s)"
    )
    parser.add_argument(
        "--test", type=int, default=5_000, help="generated test images (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bench the peers that are installed (default: %(default)s)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the ceiling with torch.compile (default: %(default)s)",
    )
    parser.add_argument(
        "--rehearse-on-cpu",
        action="store_true",
        help="run every step on a CPU with tiny sizes, to prove the script before GPU time is spent",
    )
    args = parser.parse_args(argv)
    if args.rehearse_on_cpu:
        args.train, args.test, args.batch_size, args.compile = (
            min(args.train, 160),
            min(args.test, 24),
            16,
            False,
        )
    return args


class Check:
    """What one run of the check found, section by section; a failed section is recorded, not fatal."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
        self.cpu = device == "cpu"

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        found: dict[str, Any] = {}
        self.results["sections"][name] = found
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield found
        except Exception as exc:  # recorded: one broken section must not hide the others' figures
            found["error"] = f"{type(exc).__name__}: {exc}"
            print(f"   {name} failed: {found['error']}", flush=True)
        found["seconds"] = round(time.perf_counter() - started, 1)


def cocoshard(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m cocoshard ARGS`; raise with its last lines when it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "cocoshard", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"cocoshard {args[0]} exited with {done.returncode}:\n{tail}")
    return done


# ------------------------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    import torch

    from cocoshard.info import pil_build
    from cocoshard.machine import usable_cores

    found: dict[str, Any] = {
        "cpu_cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "pil": pil_build().describe(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
        )
    return found


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
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
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
        return {
            "samples": len(window),
            "mean_pct": round(statistics.fmean(window), 1),
            "median_pct": round(statistics.median(window), 1),
        }


# ------------------------------------------------------------------------------------ sections


def make_data(check: Check, work: Path, found: dict[str, Any]) -> dict[str, Path]:
    """A generated set at the challenge's resolution, packed as jpeg and as raw shards."""
    root, shards = work / "synth", {"jpeg": work / "shards-jpeg", "raw": work / "shards-raw"}
    started = time.perf_counter()
    cocoshard(
        "synth",
        "--out",
        str(root),
        "--train",
        str(check.args.train),
        "--test",
        str(check.args.test),
        "--size",
        "64" if check.cpu else "224",
        timeout=900,
    )
    found["synth_s"] = round(time.perf_counter() - started, 1)
    for pixel_format, out in shards.items():
        started = time.perf_counter()
        cocoshard("pack", "--root", str(root), "--out", str(out), "--format", pixel_format, timeout=900)
        found[f"pack_{pixel_format}_s"] = round(time.perf_counter() - started, 1)
    found.update(train_images=check.args.train, test_images=check.args.test)
    return shards


def bench(check: Check, work: Path, found: dict[str, Any]) -> None:
    """`pytest bench/ --benchmark` on this device; the table it writes, kept whole."""
    latest = work / "bench.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "bench/",
        "--benchmark",
        "--bench-out",
        str(latest),
    ]
    if check.args.peers:
        command.append("--peers")
    if check.cpu:
        command += ["--bench-images", "300", "--bench-rounds", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    found["command"] = " ".join(["pytest", *command[6:8], *command[10:]])
    found["exit_status"] = done.returncode
    if done.returncode != 0:
        raise RuntimeError("\n".join((done.stdout + done.stderr).strip().splitlines()[-12:]))
    found["report"] = json.loads(latest.read_text())


def step_ceiling(check: Check, shards: Path, work: Path, model: str, compiled: bool) -> dict[str, Any]:
    """cocoshard's training step on a fixed batch already on the device: images/s and host syncs."""
    import torch

    from cocoshard import config
    from cocoshard.loading.batch import Batch
    from cocoshard.settings import resolve
    from cocoshard.training.runlog import RunLog
    from cocoshard.training.runtime import setup
    from cocoshard.training.train import OnlineMetrics, train_step
    from cocoshard.training.trainer import build_trainer, enter_phase

    size = 64 if check.cpu else 224
    name = "cocoshard_tiny" if check.cpu else model
    cfg = resolve(
        config.TrainConfig,
        {
            "shards": str(shards),
            "out": str(work / f"ceiling-{model}"),
            "model": name,
            "weights": "none",
            "device": check.device,
            "size": size,
            "batch_size": check.args.batch_size,
            "workers": 0,
            "amp": True,
            "channels_last": True,
            "compile": compiled,
            "epochs": 1,
        },
    )
    runtime = setup(check.device, amp=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its printed settings: the same for every model
        tr = build_trainer(cfg, runtime, RunLog(cfg.out, enabled=False))
    enter_phase(tr, 0)
    tr.train_loader.close()
    tr.val_loader.close()
    device, n = runtime.device, check.args.batch_size
    inputs = torch.randn(n, 3, size, size, device=device).to(runtime.amp_dtype or torch.float32)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(n, 80, device=device) < 0.04).float()
    batch = Batch(None, None, labels, [str(i) for i in range(n)], inputs=inputs)
    meter = OnlineMetrics(device)
    warmup, steps = (2, 3) if check.cpu else (15 if compiled else 8, 30)
    for _ in range(warmup):
        train_step(tr, batch, meter)
    synchronize(device)
    syncs = count_host_syncs(lambda: train_step(tr, batch, meter), device, steps=5)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(tr, batch, meter)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "model": name,
        "compile": compiled,
        "batch_size": n,
        "size": size,
        "images_per_s": round(steps * n / seconds, 1),
        "host_syncs_per_step": syncs,
        "amp_dtype": str(runtime.amp_dtype).split(".")[-1],
    }


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_host_syncs(step: Any, device: Any, steps: int) -> float | None:
    """Host synchronisations per call of `step`, as CUDA's sync debug mode reports them (None on a CPU)."""
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
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in seen) / steps


def ceilings(check: Check, shards: Path, work: Path, found: dict[str, Any]) -> None:
    rows = found.setdefault("rows", [])
    for model in CEILING_MODELS[:1] if check.cpu else CEILING_MODELS:
        for compiled in (False, True) if check.args.compile else (False,):
            try:
                rows.append(step_ceiling(check, shards, work, model, compiled))
            except Exception as exc:  # one model failing (maxvit_t under compile, say) leaves the others
                rows.append({"model": model, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"})
            print(f"   {rows[-1]}", flush=True)


def epochs(check: Check, shards: dict[str, Path], work: Path, found: dict[str, Any]) -> None:
    """One `cocoshard train --amp` epoch per loader mode, timed, its GPU utilisation sampled."""
    rows = found.setdefault("rows", [])
    model = "cocoshard_tiny" if check.cpu else EPOCH_MODEL
    for name, loader, decode, pixel_format in MODES:
        out = work / "runs" / name
        args = [
            "train",
            "--shards",
            str(shards[pixel_format]),
            "--out",
            str(out),
            "--model",
            model,
            "--weights",
            "none",
            "--amp",
            "--epochs",
            "1",
            "--batch-size",
            str(check.args.batch_size),
            "--loader",
            loader,
            "--decode",
            decode,
            "--device",
            check.device,
            "--size",
            "64" if check.cpu else "224",
        ]
        row: dict[str, Any] = {"mode": name, "model": model}
        try:
            with UtilisationSampler() as sampler:
                started = time.perf_counter()
                cocoshard(*args, timeout=900)
                row["wall_s"] = round(time.perf_counter() - started, 1)
            record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            row.update(
                images_per_s=round(record["images_per_s"], 1),
                train_s=round(record["time_s"], 1),
                data_wait_share=round(record["data_wait_s"] / max(record["time_s"], 1e-9), 3),
                gpu_utilisation=sampler.summary(),
                val_f1=round(record["val"][record["selected"]]["server_f1"], 4),
            )
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(f"   {row}", flush=True)


def predict_and_evaluate(check: Check, shards: Path, work: Path, found: dict[str, Any]) -> None:
    """A test submission (checked for format) and the val split's leaderboard F1, from one run."""
    checkpoint = work / "runs" / MODES[0][0] / "best.pt"
    for split in ("test", "val"):
        out = work / f"{split}.json"
        started = time.perf_counter()
        cocoshard(
            "predict",
            "--checkpoint",
            str(checkpoint),
            "--shards",
            str(shards),
            "--split",
            split,
            "--out",
            str(out),
            "--device",
            check.device,
            timeout=600,
        )
        found[f"predict_{split}_s"] = round(time.perf_counter() - started, 1)
        source = ["--images", str(shards)] if split == "test" else ["--labels", str(shards)]
        done = cocoshard("evaluate", "--predictions", str(out), *source, "--json", timeout=600)
        found[f"evaluate_{split}"] = json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report


def _cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """The tables the README's GPU section quotes, from the JSON this script writes."""
    m, sections = results.get("machine", {}), results.get("sections", {})
    lines = [
        f"# device check, {results.get('started', '')}",
        "",
        f"{m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', '-')} GiB), {m.get('cpu_cores', '-')} CPU "
        "cores; "
        f"torch {m.get('torch', '-')}, CUDA {m.get('cuda', '-')}; Pillow {m.get('pil', '-')}",
        "",
    ]
    for name, found in sections.items():
        if "error" in found:
            lines += [
                f"**{name} failed** after {found.get('seconds', '-')} s: `{found['error'].splitlines()[0]}`",
                "",
            ]
    report = sections.get("bench", {}).get("report")
    if report:
        lines += [
            "## Loaders: training-ready images/s on the device",
            "",
            "| pipeline | images/s | x folder | x best peer | CPU µs/image | output |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in report["pipelines"].items():
            version = f" {entry['version']}" if entry.get("version") else ""
            lines.append(
                f"| {name}{version} | {_cell(entry['images_per_s'])} | "
                f"{_cell(entry.get('ratio_to_folder'), 2)} "
                f"| {_cell(entry.get('ratio_to_best_peer'), 2)} | {_cell(entry.get('cpu_us_per_image'))} "
                f"| {entry.get('output', '')} |"
            )
        for name, why in report.get("skipped", {}).items():
            lines.append(f"| {name} | skipped: {why} | | | | |")
        lines.append("")
    ceiling = sections.get("ceiling", {}).get("rows", [])
    if ceiling:
        lines += [
            "## Training-step ceiling (batch on the device, AMP + channels_last)",
            "",
            "| model | compile | batch | images/s | host syncs / step |",
            "|---|---|---|---|---|",
        ]
        for row in ceiling:
            if "error" in row:
                lines.append(
                    f"| {row['model']} | {row['compile']} | | failed: {row['error'].splitlines()[0]} | |"
                )
            else:
                lines.append(
                    f"| {row['model']} | {row['compile']} | {row['batch_size']} | "
                    f"{_cell(row['images_per_s'])} "
                    f"| {_cell(row['host_syncs_per_step'], 1)} |"
                )
        lines.append("")
    rows = sections.get("epochs", {}).get("rows", [])
    if rows:
        eager = {r["model"]: r["images_per_s"] for r in ceiling if "images_per_s" in r and not r["compile"]}
        data = sections.get("data", {})
        lines += [
            f"## One `cocoshard train --amp` epoch per loader mode ({data.get('train_images', '-')} "
            "generated "
            "images)",
            "",
            "| loader | images/s | of the step's ceiling | waiting for data | GPU busy (mean) | epoch s |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['mode']} | failed: {row['error'].splitlines()[0]} | | | | |")
                continue
            top = eager.get(row["model"])
            share = f"{row['images_per_s'] / top:.0%}" if top else "-"
            utilisation = row["gpu_utilisation"].get("mean_pct")
            lines.append(
                f"| {row['mode']} | {_cell(row['images_per_s'])} | {share} | {row['data_wait_share']:.0%} "
                f"| {_cell(utilisation)}{'%' if utilisation is not None else ''} | "
                f"{_cell(row['train_s'], 1)} |"
            )
        lines.append("")
    scored = sections.get("predict", {})
    if "evaluate_val" in scored:
        val = scored["evaluate_val"]
        lines += [
            "## Predict and evaluate",
            "",
            f"test submission: {scored.get('evaluate_test', {}).get('images', '-')} images, format OK; "
            f"predict {scored.get('predict_test_s', '-')} s. val: server F1 "
            f"{_cell(val.get('server_f1'), 4)}, "
            f"predict {scored.get('predict_val_s', '-')} s.",
            "",
        ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    from cocoshard.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "device-check.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "device-check.md", markdown(results))


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        print(
            f"tools/device-check measures cocoshard on a CUDA GPU, and this machine has none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"torch.cuda.is_available() is False). Run it on a machine with one; "
            f"`tools/device-check --rehearse-on-cpu` runs every step tiny on this CPU.",
            file=sys.stderr,
        )
        return NO_CUDA
    check = Check(args, "cpu" if args.rehearse_on_cpu else "cuda")
    check.results["machine"] = machine()
    check.results["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cocoshard-device-check-"))
    try:
        shards: dict[str, Path] = {}
        with check.section("data") as found:
            shards = make_data(check, work, found)
        with check.section("bench") as found:
            bench(check, work, found)
        if shards:
            with check.section("ceiling") as found:
                ceilings(check, shards["jpeg"], work, found)
            with check.section("epochs") as found:
                epochs(check, shards, work, found)
            with check.section("predict") as found:
                predict_and_evaluate(check, shards["jpeg"], work, found)
    finally:
        check.results["total_s"] = round(time.perf_counter() - started, 1)
        write(check.results, Path(args.out))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, found in check.results["sections"].items() if "error" in found]
    print(
        f"written to {Path(args.out) / 'device-check.json'} and device-check.md in "
        f"{check.results['total_s']} s" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
