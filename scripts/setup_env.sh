#!/usr/bin/env bash
# Creates (or updates) the virtual environment used by `make test` and `make bench`.
#   VENV=path            where to put it (default .venv)
#   TORCH_SPEC=...       the torch to install when the venv has none (default torch==2.13.0;
#                        use your cluster's CUDA/ROCm wheel spec there)
#   EUROCORE_GPU_BACKEND=AUTO|CUDA|HIP|NONE   the C++ extension build (CMakeLists.txt)
#   EUROCORE_CPU_EMULATION=ON|OFF   also build eurocore._C_emulated, the C++ kernels on a CPU
#                        emulator, so the tests run them without a GPU (default ON here)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
"$py" -m pip install --quiet --upgrade pip
# torch first and by exact version: a bare `torch` requirement would let pip fetch a
# several-GB CUDA build where the CPU build is what this machine has.
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
EUROCORE_CPU_EMULATION=${EUROCORE_CPU_EMULATION:-ON} "$py" -m pip install --quiet -e ".[dev]"
"$VENV/bin/eurocore" backends
