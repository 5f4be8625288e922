"""What the device check needs beyond the machine's own Python: wheels installed offline, imports named.

    found = install_wheels(Path(".device/wheels"), Path("/tmp/site"))   # pip install --no-index
    missing = missing_modules()                                          # ["webdataset", ...]

A GPU machine of a cluster or a cloud image has its own PyTorch and no network. `bash
tools/device-wheels` (where PyPI is reachable) writes the few wheels cocoshard needs beyond such an
image into one folder; here the ones that fit this interpreter (by their file names' tags) are
installed with `pip install --no-index --no-deps --target PRIVATE`: nothing is fetched, nothing is
written into the machine's environment, and the private folder goes first on the path of this
process and of everything it starts (PYTHONPATH).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

# (module, distribution) the check, cocoshard and its test suite import
NEEDED = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("rich", "rich"),
    ("tqdm", "tqdm"),
    ("matplotlib", "matplotlib"),
    ("pytest", "pytest"),
    ("pytest_timeout", "pytest-timeout"),
    ("webdataset", "webdataset"),
    ("braceexpand", "braceexpand"),
    ("yaml", "pyyaml"),
) + ((("tomli", "tomli"),) if sys.version_info < (3, 11) else ())

_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def missing_modules() -> list[str]:
    """The distributions whose modules do not import here (by spec, without importing them)."""
    return [dist for module, dist in NEEDED if importlib.util.find_spec(module) is None]


def _glibc() -> tuple[int, int]:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return (0, 0)
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _platform_fits(tag: str, machine: str, glibc: tuple[int, int]) -> bool:
    if tag == "any":
        return True
    for legacy, version in _LEGACY.items():
        if tag == f"{legacy}_{machine}":
            return glibc >= version
    found = _MANYLINUX.match(tag)
    return bool(found) and found.group(3) == machine and glibc >= (int(found.group(1)), int(found.group(2)))


def wheel_fits(
    filename: str,
    python: tuple[int, int] = sys.version_info[:2],
    machine: str = platform.machine(),
    glibc: tuple[int, int] | None = None,
) -> bool:
    """Whether pip would install this wheel file here: a CPython tag of this version (or a pure
    py3 wheel), an ABI of this CPython (or none/abi3), and `any` or a manylinux tag of this machine
    whose glibc this one meets."""
    found = _WHEEL.match(filename)
    if not found:
        return False
    glibc = _glibc() if glibc is None else glibc
    cp = f"cp{python[0]}{python[1]}"
    pythons, abis, platforms = (found.group(part).split(".") for part in ("py", "abi", "plat"))
    python_ok = any(tag in (cp, "py3", f"py{python[0]}{python[1]}") for tag in pythons) or any(
        tag.startswith("cp3") and int(tag[3:]) <= python[1] for tag in pythons if "abi3" in abis
    )
    abi_ok = any(tag in ("none", cp, "abi3") for tag in abis)
    return python_ok and abi_ok and any(_platform_fits(tag, machine, glibc) for tag in platforms)


def _project(filename: str) -> str:
    return filename.split("-", 1)[0].lower().replace("_", "-")


def install_wheels(folder: Path, target: Path) -> dict[str, object]:
    """Install the wheels of `folder` that fit this interpreter into `target` with pip, offline;
    put `target` first on this process's path and on PYTHONPATH. RuntimeError when pip fails."""
    wheels = sorted(p.name for p in folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"--wheels {folder}: no .whl files there (bash tools/device-wheels writes them)")
    chosen: dict[str, str] = {}
    for name in wheels:
        if wheel_fits(name):
            chosen.setdefault(_project(name), name)  # one version of each project: the first by name
    # --isolated: no pip configuration or PIP_* variable can add an index or a find-links URL
    command = [
        sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install", "--no-index",
        "--no-deps", "--no-compile", "--quiet", "--target", str(target),
        *(str(folder / name) for name in chosen.values()),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise RuntimeError(f"pip install --no-index from {folder} failed:\n{tail}")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(target), os.environ.get("PYTHONPATH"))))
    return {
        "folder": str(folder),
        "target": str(target),
        "installed": sorted(chosen.values()),
        "not_for_this_python": sorted({_project(n) for n in wheels} - set(chosen)),
    }
