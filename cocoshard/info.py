"""`cocoshard info`: versions, the PIL that is actually imported, and the devices this machine offers.

    $ cocoshard info
    $ cocoshard info --brief          # one line, as `cocoshard --version` prints it

The PIL is probed, not looked up in package metadata: its `__version__`, the file it was loaded
from, and whether that extension holds pillow-simd's SIMD resize kernels. Metadata can claim
pillow-simd while a later `pip install` has put stock Pillow's files back.
"""

from __future__ import annotations

import ctypes
import importlib.metadata as md
import platform
from dataclasses import dataclass

from cocoshard.config import InfoConfig
from cocoshard.machine import usable_cores

# A function only pillow-simd's `_imaging` extension defines (its 4-line SIMD resampling pass).
SIMD_RESIZE_SYMBOL = "ImagingResampleHorizontalConvolution8u4x"


@dataclass(frozen=True)
class PilBuild:
    """What `import PIL` gives in this process."""

    version: str  # PIL.__version__ ("12.1.1.post0+simd.avx2" for cocoshard's pillow-simd build)
    simd: bool  # the loaded extension has pillow-simd's resize kernels
    path: str  # the extension module that was loaded

    def describe(self) -> str:
        kind = "pillow-simd, SIMD resize" if self.simd else "stock Pillow, no SIMD resize"
        return f"{self.version} ({kind})"


def pil_build() -> PilBuild:
    """Probe the imported PIL: its version and whether its C extension holds SIMD resize kernels."""
    try:
        import PIL
        from PIL import _imaging
    except ImportError:
        return PilBuild("missing", False, "")
    try:
        simd = hasattr(ctypes.CDLL(_imaging.__file__), SIMD_RESIZE_SYMBOL)
    except OSError:
        simd = False
    return PilBuild(PIL.__version__, simd, _imaging.__file__)


def version_line() -> str:
    """One line for `cocoshard --version` and `cocoshard info --brief`."""
    import torch

    from cocoshard import __version__

    return (
        f"cocoshard {__version__} (torch {torch.__version__}, PIL {pil_build().describe()}, "
        f"python {platform.python_version()})"
    )


def image_decoding() -> str:
    """Which library decodes the images (torchcodec where it loads, else torchvision) and why."""
    from cocoshard.loading.image_backend import BACKEND

    return BACKEND.describe()


def describe() -> dict[str, str]:
    """Everything `info` prints, as strings."""
    import torch
    import torchvision

    from cocoshard import __version__

    pil = pil_build()
    out = {
        "cocoshard": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "PIL": pil.describe(),
        "PIL loaded from": pil.path or "-",
        "cpu cores usable": str(usable_cores()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "image decoding": image_decoding(),
    }
    for package in ("webdataset", "tensorboard"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def run(cfg: InfoConfig) -> int:
    """`cocoshard info`: print the table (or, with --brief, the version line)."""
    if cfg.brief:
        print(version_line())
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in describe().items():
        table.add_row(key, value, style=None)
    Console().print(table, highlight=False)
    return 0
