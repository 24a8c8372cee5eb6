#!/usr/bin/env bash
# Installs Debian's hipcc (HIP 5.2 with clang 15; builds for gfx90a, not gfx942) where no hipcc
# is on PATH, so that CI compiles the csrc/ kernels for AMD as well as with nvcc
# (tests/packaging/test_gpu_compile.py). A no-op when hipcc is already there. Needs apt-get and
# root (or sudo); about 20 s and 350 MB (32 packages) on a clean Debian 12 machine.
set -euo pipefail

if command -v hipcc >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_hipcc.sh: no hipcc and no apt-get; install HIP (ROCm) yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi

# Quiet unless it fails: then the whole apt output explains why.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $sudo apt-get update -q \
       && $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends hipcc; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install_hipcc.sh: installing hipcc failed" >&2
  exit 1
fi
# HIP_PLATFORM=amd: with nvcc also installed, hipcc would report (and use) nvcc.
echo "installed $(HIP_PLATFORM=amd hipcc --version 2>/dev/null | head -n 1)"
