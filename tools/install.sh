#!/usr/bin/env bash
# Set up cocoshard in a virtual environment, never in the system's Python.
#
#   $ bash tools/install.sh                 # idempotent: a second run checks and returns in seconds
#   $ bash tools/install.sh --cpu           # PyTorch's CPU build: no CUDA libraries (~3 GB less)
#   $ PYTHON=python3.12 bash tools/install.sh
#
# Where: the active virtual environment ($VIRTUAL_ENV) when there is one, else .venv in the clone,
# created here. Either way .venv/bin/ then holds the environment's `python` and `cocoshard`
# (with an active environment, .venv is a link to it).
#
# Torch (tools/install-torch.sh): a torch already in the environment is kept, never replaced. Else
# --cpu installs PyTorch's CPU build first; without it, a machine with no NVIDIA GPU is told that
# the default wheel brings ~3 GB of CUDA libraries and how to get the CPU build instead.
#
# What: cocoshard (editable, with the test tools and TensorBoard), then pillow-simd in place of
# Pillow. pillow-simd resizes ~15x faster on AVX2 machines; it ships only as source, so it is
# built here (cached under ~/.cache/cocoshard/wheels) and installed under the distribution name
# `pillow`, version X+simd: pip then sees Pillow's requirement met by it and a later
# `pip install` of a package that needs Pillow leaves it in place. What replaces it:
# `pip install -U pillow`, or a package that needs a newer Pillow than pillow-simd's; run this
# script again to put it back. When the build fails (no compiler, no JPEG/zlib headers), stock
# Pillow stays and a warning says so: cocoshard works, resizes are slower.
# `cocoshard info` reports the PIL that is actually imported, probed, not read from metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
SIMD_VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
TORCH_BUILD=${COCOSHARD_TORCH:-auto}
case "${1:-}" in
    --cpu) TORCH_BUILD=cpu ;;
    "") ;;
    *) echo "usage: bash tools/install.sh [--cpu]   (--cpu: PyTorch's CPU build)" >&2; exit 2 ;;
esac
# shellcheck source=tools/install-torch.sh
source tools/install-torch.sh

# ----------------------------------------------------------------------------- the environment
if [ -n "${VIRTUAL_ENV:-}" ]; then
    if [ -e .venv ] && [ ! -L .venv ] && [ "$(cd .venv && pwd -P)" != "$(cd "$VIRTUAL_ENV" && pwd -P)" ]; then
        echo "error: .venv is another environment than the active one ($VIRTUAL_ENV):" >&2
        echo "       deactivate it to use .venv, or remove .venv to install into $VIRTUAL_ENV" >&2
        exit 2
    fi
    [ -L .venv ] || [ ! -e .venv ] && ln -sfn "$VIRTUAL_ENV" .venv
    echo "== using the active virtual environment $VIRTUAL_ENV (.venv links to it)"
elif [ ! -x .venv/bin/python ]; then
    base=${PYTHON:-python3}
    echo "== creating the virtual environment .venv with $base"
    if ! "$base" -m venv .venv; then
        echo "error: '$base -m venv' failed; on Debian/Ubuntu install python3-venv first" >&2
        exit 2
    fi
fi
PY=.venv/bin/python
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP=.venv/.cocoshard-install
wanted="$(cat pyproject.toml tools/install.sh tools/install-torch.sh | sha256sum | cut -c1-16)"

simd_active() {  # the PIL that Python imports has pillow-simd's resize kernels
    "$PY" -c "from cocoshard.info import pil_build; raise SystemExit(0 if pil_build().simd else 1)" 2>/dev/null
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && simd_active; then
    "$PY" -m cocoshard info --brief
    exit 0
fi

# ----------------------------------------------------------------------------- torch
torch_step "$TORCH_BUILD"

# ----------------------------------------------------------------------------- cocoshard
echo "== installing cocoshard (editable) and its dependencies"
# compat: the clone's folder goes on sys.path, so `python -m cocoshard` works even from the
# folder that holds a clone named cocoshard (which would otherwise shadow the package).
"${PIP[@]}" install -e ".[test]" --config-settings editable_mode=compat

# ----------------------------------------------------------------------------- pillow-simd
if ! simd_active; then
    flags="-msse4.2"
    label="simd"
    if grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo 'int main(void){return 0;}' | cc -mavx2 -x c -o /dev/null - 2>/dev/null; then
        flags="-msse4.2 -mavx2"
        label="simd.avx2"
    fi
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/cocoshard/wheels"
    tag="$("$PY" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}")')"
    wheel=$(ls "$cache"/pillow-"$SIMD_VERSION+$label"-*"${tag%%-*}"*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "== building pillow-simd $SIMD_VERSION ($flags) as the distribution pillow $SIMD_VERSION+$label"
        work=$(mktemp -d)
        trap 'rm -rf "$work"' EXIT
        if "${PIP[@]}" download -q --no-deps --no-binary :all: "pillow-simd==$SIMD_VERSION" -d "$work" \
            && tar -xzf "$work"/pillow_simd-*.tar.gz -C "$work" \
            && src=$(ls -d "$work"/pillow_simd-*/) \
            && sed -i 's/^name = "pillow-simd"$/name = "pillow"/' "$src/pyproject.toml" \
            && sed -i "s/^__version__ = \"$SIMD_VERSION\"$/__version__ = \"$SIMD_VERSION+$label\"/" "$src/src/PIL/_version.py" \
            && grep -q "^name = \"pillow\"$" "$src/pyproject.toml" \
            && CC="cc $flags" "${PIP[@]}" wheel -q --no-deps -w "$work/wheel" "$src"; then
            mkdir -p "$cache"
            cp "$work"/wheel/*.whl "$cache"/
            wheel=$(ls "$cache"/pillow-"$SIMD_VERSION+$label"-*.whl | head -n 1)
        fi
    fi
    if [ -n "$wheel" ] && "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel" && simd_active; then
        echo "pillow-simd installed: $(basename "$wheel")"
    else
        echo "WARNING: pillow-simd could not be built or installed (compiler or JPEG/zlib headers missing?);" >&2
        echo "WARNING: stock Pillow stays: cocoshard works, image resizes are ~15x slower." >&2
        "${PIP[@]}" install -q "pillow" >/dev/null
    fi
fi
"${PIP[@]}" check
echo "$wanted" > "$STAMP"
"$PY" -m cocoshard info --brief
