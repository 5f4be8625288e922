#!/usr/bin/env bash
# Install the loaders the benchmark compares cocoshard with, into the environment tools/install.sh made.
#
#   $ bash tools/install-peers.sh && .venv/bin/python -m pytest bench/ --benchmark --peers
#
# What it does:
# 1. the system libraries FFCV compiles against (Debian/Ubuntu: libturbojpeg0-dev, libopencv-dev,
#    pkg-config), through apt-get when they are missing (it asks for sudo when not root);
# 2. `pip install -e '.[test,peers,dali-cudaNN]'` into .venv: FFCV, NVIDIA DALI, LitData, Mosaic
#    Streaming (and what they need: numba, OpenCV, transformers), resolved together with the test
#    tools so that pip leaves no conflict (it may choose older releases of some shared dependencies).
#    DALI is built per CUDA major version: the build matching the installed torch's CUDA
#    (torch.version.cuda; a CPU-only torch gets the CUDA 13 build, whose CPU pipeline runs anywhere).
# A peer that still cannot be installed or run is reported by the benchmark as skipped, with the
# reason; it never fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh >/dev/null
PY=.venv/bin/python

missing=()
for package in libturbojpeg0-dev libopencv-dev pkg-config; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "== installing system libraries for FFCV: ${missing[*]}"
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "WARNING: no apt-get here: install ${missing[*]} (or their equivalents) for FFCV yourself" >&2
    fi
fi

cuda=$("$PY" -c "import torch; print((torch.version.cuda or '13').split('.')[0])")
case "$cuda" in
    12) dali=dali-cuda12 ;;
    *) dali=dali-cuda13 ;;
esac
echo "== installing the peers: FFCV, DALI ($dali, for torch's CUDA $cuda), LitData, Mosaic Streaming"
"$PY" -m pip --disable-pip-version-check install -e ".[test,peers,$dali]" --config-settings editable_mode=compat
"$PY" -m pip --disable-pip-version-check check
"$PY" -m cocoshard info --brief
