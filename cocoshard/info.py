"""`cocoshard info`: versions, which PIL is active (pillow-simd or stock Pillow), and devices."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def pil_flavour() -> str:
    """'pillow-simd X' or 'Pillow X' or 'none': which distribution provides `PIL` here."""
    for dist in ("pillow-simd", "pillow"):
        try:
            return f"{md.distribution(dist).metadata['Name']} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "none"


def version_line() -> str:
    """One line for `cocoshard --version`."""
    import torch

    from cocoshard import __version__

    return f"cocoshard {__version__} (torch {torch.__version__}, PIL: {pil_flavour()}, python {platform.python_version()})"


def describe() -> dict[str, str]:
    """Everything `info` prints, as strings."""
    import torch
    import torchvision

    out = {
        "cocoshard": version_line().split(" (")[0].split()[-1],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "PIL": pil_flavour(),
        "cpu cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
    }
    try:
        out["webdataset"] = md.version("webdataset")
    except md.PackageNotFoundError:
        out["webdataset"] = "missing"
    return out


def run(cfg: object) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in describe().items():
        table.add_row(f"[cyan]{key}[/]", value)
    Console().print(table)
    return 0
