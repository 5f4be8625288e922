#!/usr/bin/env bash
# Install cocoshard and its stack into the current Python, then swap Pillow for pillow-simd.
#
#   $ bash tools/install.sh            # idempotent: a second run only checks and returns
#   $ PYTHON=python3.12 bash tools/install.sh
#
# pillow-simd resizes ~15x faster than stock Pillow on AVX2 machines and replaces its `PIL`
# package. It ships only as source, so it is built here; when the build fails, stock Pillow is
# put back and a warning says so (cocoshard still works, resizes are just slower).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)

installed() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, cocoshard, torch, torchvision, webdataset, rich, tqdm, pytest, hypothesis
from PIL import Image  # noqa: F401
md.version("cocoshard")
PYEOF
}

pil_dist() {  # which distribution provides PIL now: pillow-simd, pillow or none
    "$PY" - <<'PYEOF'
import importlib.metadata as md
for name in ("pillow-simd", "pillow"):
    try:
        md.distribution(name)
        print(name)
        break
    except md.PackageNotFoundError:
        pass
else:
    print("none")
PYEOF
}

if installed && [ "$(pil_dist)" = "pillow-simd" ]; then
    echo "cocoshard is installed (pillow-simd active)"
    exit 0
fi

echo "== installing cocoshard and its dependencies"
"${PIP[@]}" install -e ".[test]"

if [ "$(pil_dist)" != "pillow-simd" ]; then
    echo "== building pillow-simd (replaces Pillow's PIL)"
    cflags=""
    if grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo 'int main(void){return 0;}' | cc -mavx2 -x c -o /dev/null - 2>/dev/null; then
        cflags="-mavx2"
    fi
    "${PIP[@]}" install -q pybind11 wheel setuptools
    "${PIP[@]}" uninstall -y -q pillow
    if CC="cc ${cflags}" "${PIP[@]}" install --no-cache-dir --no-build-isolation "pillow-simd>=9"; then
        echo "pillow-simd built${cflags:+ with AVX2}"
    else
        echo "WARNING: pillow-simd failed to build (compiler or JPEG/zlib headers missing?);" >&2
        echo "WARNING: reinstalling stock Pillow: cocoshard works, resizes are ~15x slower." >&2
        "${PIP[@]}" install -q pillow
    fi
fi
"$PY" -m cocoshard info
