# Which PyTorch tools/install.sh installs; sourced by it (and by tests/test_install.py, with a fake
# nvidia-smi on PATH and a stub for pip), never run on its own.
#
#   torch_step auto|cpu     uses $PY (the environment's python) and the array PIP (its pip)
#
# - A torch already in the environment is kept, never replaced: it is pinned (the constraints file
#   .venv/.cocoshard-torch-pin, as $PIP_CONSTRAINT) so that installing cocoshard's other requirements
#   cannot swap it for another.
# - cpu: PyTorch's CPU build (torch and torchvision from its CPU index) before anything else, so pip
#   then finds torch installed and never downloads the default wheel.
# - auto on a machine where nvidia-smi lists no GPU: a note that the default wheel brings ~3 GB of
#   CUDA libraries this machine cannot use, and how to install the CPU build instead; waits 10 s
#   for a Ctrl-C when run from a terminal. With a GPU: the default wheel, silently.

TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

nvidia_gpu_present() {  # nvidia-smi on PATH and listing at least one GPU
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

torch_version() {  # the version of the torch the environment imports, or nothing
    "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}

cpu_build_note() {
    cat >&2 <<EOF
note: no NVIDIA GPU here (nvidia-smi lists none). The default torch wheel brings ~3 GB of CUDA
      libraries this machine cannot use. For PyTorch's CPU build instead, stop now (Ctrl-C) and run
          bash tools/install.sh --cpu
      or install it into the environment first (a torch already installed is kept):
          pip install torch torchvision --index-url $TORCH_CPU_INDEX
EOF
}

torch_step() {  # $1: auto or cpu
    local have
    have="$(torch_version)"
    if [ -n "$have" ]; then
        echo "== keeping the torch already installed: $have"
        echo "torch==$have" > .venv/.cocoshard-torch-pin
        export PIP_CONSTRAINT="$PWD/.venv/.cocoshard-torch-pin"
        return 0
    fi
    if [ "$1" = "cpu" ]; then
        echo "== installing PyTorch's CPU build ($TORCH_CPU_INDEX)"
        "${PIP[@]}" install torch torchvision --index-url "$TORCH_CPU_INDEX"
        return 0
    fi
    if ! nvidia_gpu_present; then
        cpu_build_note
        if [ -t 0 ] && [ -t 2 ]; then
            echo "      (going on with the default wheel in 10 s)" >&2
            sleep 10
        fi
    fi
}
