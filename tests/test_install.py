"""tools/install.sh's torch step, driven with a fake nvidia-smi on PATH and a stub for pip: a CPU-only
machine is told about the CUDA libraries and the CPU build, --cpu installs it, a torch already in
the environment is kept (pinned, never replaced). Nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torch_step(tmp_path: Path, build: str, *, gpu: bool, torch: str | None) -> tuple[str, list[str]]:
    """Run `torch_step BUILD` with a fake nvidia-smi, a fake python whose torch is `torch` (None:
    no torch) and a pip that only logs; returns (what it printed, the pip calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n" + ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"\n' if gpu else "exit 9\n")
    )
    python = bin_dir / "fake-python"
    python.write_text("#!/bin/sh\n" + (f"echo {torch}\n" if torch else "exit 1\n"))
    pip_log = tmp_path / "pip.log"
    pip = bin_dir / "fake-pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> {pip_log}\n')
    for script in (smi, python, pip):
        script.chmod(0o755)
    (tmp_path / ".venv").mkdir(exist_ok=True)
    script = (
        f"source {REPO}/tools/install-torch.sh; PY={python}; PIP=({pip}); torch_step {build}; "
        'echo "pin=${PIP_CONSTRAINT:-}"'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    calls = pip_log.read_text().splitlines() if pip_log.exists() else []
    return done.stdout + done.stderr, calls


def test_a_machine_without_an_nvidia_gpu_is_told_about_the_cuda_libraries_and_the_cpu_build(tmp_path) -> None:
    said, calls = torch_step(tmp_path, "auto", gpu=False, torch=None)
    assert "~3 GB of CUDA" in said and "bash tools/install.sh --cpu" in said
    assert "--index-url https://download.pytorch.org/whl/cpu" in said and calls == []
    said, calls = (
        torch_step(tmp_path / "gpu", "auto", gpu=True, torch=None)
        if (tmp_path / "gpu").mkdir() is None
        else ("", [])
    )
    assert "CUDA" not in said and calls == []  # a GPU machine gets the default wheel, silently


def test_cpu_installs_the_cpu_build_first(tmp_path) -> None:
    said, calls = torch_step(tmp_path, "cpu", gpu=False, torch=None)
    assert calls == ["install torch torchvision --index-url https://download.pytorch.org/whl/cpu"]


@pytest.mark.parametrize("build", ["auto", "cpu"])
def test_a_torch_already_installed_is_kept_and_pinned(tmp_path, build) -> None:
    said, calls = torch_step(tmp_path, build, gpu=False, torch="2.5.1+cu121")
    assert calls == [] and "keeping the torch already installed: 2.5.1+cu121" in said and "CUDA" not in said
    pin = tmp_path / ".venv" / ".cocoshard-torch-pin"
    assert f"pin={pin}" in said and pin.read_text().strip() == "torch==2.5.1+cu121"


def test_install_sh_takes_cpu_and_decides_torch_before_installing_cocoshard(tmp_path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "tools" / "install.sh"), "--gpu"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "usage: bash tools/install.sh [--cpu]" in done.stderr
    text = (REPO / "tools" / "install.sh").read_text()
    assert "--cpu) TORCH_BUILD=cpu" in text
    assert text.index('torch_step "$TORCH_BUILD"') < text.index('install -e ".[test]"')
