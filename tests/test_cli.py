"""The command line as a user meets it: entry points, from wherever they are started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cocoshard import __version__

REPO = Path(__file__).resolve().parents[1]


def test_python_m_cocoshard_works_from_the_folder_holding_a_clone_named_cocoshard(tmp_path) -> None:
    """`git clone` names the folder cocoshard; started beside it, `python -m cocoshard` (and what
    torchrun runs) must still find the package, not the clone as an empty namespace package."""
    (tmp_path / "cocoshard").symlink_to(REPO, target_is_directory=True)
    commands = {
        "python -m cocoshard": [sys.executable, "-m", "cocoshard", "--version"],
        "torchrun -m cocoshard": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "cocoshard",
            "--version",
        ],
    }
    for name, command in commands.items():
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
        assert f"cocoshard {__version__}" in done.stdout, name
