"""JPEG decoding per image-decoding backend, on the bench's images: what one core decodes.

    $ pytest bench/test_decode.py --benchmark

cocoshard decodes with torchcodec where it is installed and loads, torchvision otherwise
(`cocoshard.loading.image_backend`); both wrap libjpeg-turbo on the CPU. Each backend decodes every
bench image (upright RGB, as the loaders do) once per round, the backends taking turns; the median
round is reported as images/s and µs per image on one thread, beside `decode_on_device` (the batched
decode of `--decode device`, nvJPEG on a GPU) on the bench's device. A backend that cannot run here
is reported as skipped, with the reason.
"""

from __future__ import annotations

import statistics
import time

import torch

from conftest import BenchData, BenchReport, bench_device


def _backends(report: BenchReport) -> list:
    from cocoshard.loading.image_backend import _torchcodec_or_why, load_backend

    found = [load_backend("torchvision")]
    codec = _torchcodec_or_why()
    if isinstance(codec, str):
        report.skipped["decode torchcodec"] = codec
    else:
        found.append(codec)
    return found


def _device_decode(encoded: list[torch.Tensor], batch: int, device: torch.device) -> None:
    from cocoshard.loading.device_decode import KIND_JPEG, decode_on_device

    for start in range(0, len(encoded), batch):
        part = encoded[start : start + batch]
        keys = [str(i) for i in range(len(part))]
        decode_on_device(part, [KIND_JPEG] * len(part), keys, canvas_size=256, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_decode_throughput(bench_data: BenchData, report: BenchReport, request) -> None:
    opts = request.config.option
    device = bench_device()
    paths = [bench_data.images / f"{key}.jpg" for key in bench_data.keys]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    work = {
        f"decode {b.describe()}": (lambda b=b: [b.decode_jpeg(e) for e in encoded]) for b in _backends(report)
    }
    work[f"decode_on_device {device.type}"] = lambda: _device_decode(encoded, opts.bench_batch_size, device)
    seconds: dict[str, list[float]] = {name: [] for name in work}
    for run in work.values():
        run()  # warm-up: libraries loaded, nvJPEG's state made
    for _ in range(max(opts.bench_rounds, 3)):
        for name, run in work.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    for name, times in seconds.items():
        median = statistics.median(times)
        report.decode[name] = {
            "images_per_s": round(len(encoded) / median, 1),
            "us_per_image": round(median / len(encoded) * 1e6, 1),
            "images": len(encoded),
            "threads": 1 if name.startswith("decode ") else None,
        }
        assert median > 0
