"""`tools/device-check`: a clear refusal without CUDA, and every step rehearsed on a CPU.

GPU time is scarce, so the script must work the first time it meets a GPU: the rehearsal runs all
of its sections (data, bench, step ceiling, one epoch per loader mode, predict + evaluate) with tiny
sizes on the CPU and checks what it writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device-check"


def _module():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "tools" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_without_cuda_it_says_so_and_does_nothing(tmp_path):
    done = _run("--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 2
    assert "measures cocoshard on a CUDA GPU, and this machine has none" in done.stderr
    assert "--rehearse-on-cpu" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_markdown_reports_failed_sections_and_missing_figures():
    markdown = _module().markdown(
        {
            "started": "now",
            "machine": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "cpu_cores": 16},
            "sections": {
                "data": {"train_images": 52000, "seconds": 30.0},
                "bench": {"error": "RuntimeError: ffcv broke\nmore", "seconds": 3.0},
                "ceiling": {
                    "rows": [
                        {
                            "model": "resnet18",
                            "compile": False,
                            "batch_size": 256,
                            "images_per_s": 9000.0,
                            "host_syncs_per_step": 0.0,
                        },
                        {"model": "maxvit_t", "compile": True, "error": "BackendCompilerFailed: no\nmore"},
                    ]
                },
                "epochs": {
                    "rows": [
                        {
                            "mode": "resident",
                            "model": "resnet18",
                            "images_per_s": 8100.0,
                            "data_wait_share": 0.02,
                            "gpu_utilisation": {"mean_pct": 97.5},
                            "train_s": 6.4,
                        },
                        {"mode": "stream-jpeg", "model": "resnet18", "error": "RuntimeError: out of memory"},
                    ]
                },
            },
        }
    )
    assert "NVIDIA H200 (139.8 GiB), 16 CPU cores" in markdown
    assert "**bench failed** after 3.0 s: `RuntimeError: ffcv broke`" in markdown
    assert "| resnet18 | False | 256 | 9,000 | 0.0 |" in markdown
    assert "| maxvit_t | True | | failed: BackendCompilerFailed: no | |" in markdown
    assert "| resident | 8,100 | 90% | 2% | 98% | 6.4 |" in markdown  # 8,100 of a 9,000 ceiling
    assert "| stream-jpeg | failed: RuntimeError: out of memory |" in markdown


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_section(tmp_path):
    out = tmp_path / "out"
    done = _run(
        "--rehearse-on-cpu", "--no-peers", "--out", str(out), "--work", str(tmp_path / "work"), timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "device-check.json").read_text())
    sections = results["sections"]
    assert list(sections) == ["data", "bench", "ceiling", "epochs", "predict"]
    assert not [name for name, found in sections.items() if "error" in found]
    modes = [row["mode"] for row in sections["epochs"]["rows"]]
    assert modes == [name for name, *_ in _module().MODES]
    assert all(
        row["images_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1 for row in sections["epochs"]["rows"]
    )
    assert set(sections["bench"]["report"]["pipelines"]) >= {"folder", "stream-jpeg", "resident-jpeg-device"}
    assert sections["ceiling"]["rows"][0]["images_per_s"] > 0
    assert sections["predict"]["evaluate_test"]["format_ok"] is True
    assert 0 <= sections["predict"]["evaluate_val"]["server_f1"] <= 1
    markdown = (out / "device-check.md").read_text()
    for heading in (
        "## Loaders",
        "## Training-step ceiling",
        "## One `cocoshard train --amp` epoch",
        "## Predict and evaluate",
    ):
        assert heading in markdown
    assert "waiting for data" in markdown
