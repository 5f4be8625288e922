#!/usr/bin/env bash
# Install the loaders the benchmark compares cocoshard with, into the environment tools/install.sh made.
#
#   $ bash tools/install-peers.sh && .venv/bin/python -m pytest bench/ --benchmark --peers
#
# What it does:
# 1. the system libraries FFCV compiles against (Debian/Ubuntu: libturbojpeg0-dev, libopencv-dev,
#    pkg-config), through apt-get when they are missing (it asks for sudo when not root);
# 2. `pip install -e '.[peers,dali-cudaNN]'` into .venv: FFCV, NVIDIA DALI, LitData, Mosaic
#    Streaming (and what they need: numba, OpenCV, transformers), with the installed torch, torchvision
#    and NumPy held where they are (a constraints file): the figures are of the torch the bench
#    reports, and pip never backtracks through 800 MB torch wheels looking for another resolution.
#    Some peers pin shared libraries older than the test tools' (transformers wants huggingface-hub
#    < 1.0, the `datasets` interop test a newer one); `pip check` names such conflicts and the
#    script goes on: the bench does not use them.
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
held="$(mktemp)"
trap 'rm -f "$held"' EXIT
"$PY" -m pip --disable-pip-version-check freeze | grep -E '^(torch|torchvision|numpy)==' >"$held" || true
"$PY" -m pip --disable-pip-version-check install -c "$held" -e ".[peers,$dali]" \
    --config-settings editable_mode=compat
"$PY" -m pip --disable-pip-version-check check ||
    echo "WARNING: the conflicts above are between the peers and other installed tools; the bench does not use them" >&2
"$PY" -m cocoshard info --brief
