#!/usr/bin/env bash
# The GPU check: on a CUDA or ROCm machine, build eurocore (with its C++ extension for this
# GPU), run the whole test suite with compiled Triton kernels (no interpreter) and the C++
# kernels on the GPU (no emulator), then the kernel benchmark (triton and cuda rows). Logs and JSON land in OUTDIR. Needs no network: it installs with
# --no-build-isolation --no-deps into the current Python, which must already have torch,
# triton, pytest, scikit-build-core, pybind11, cmake and ninja.
#
#   benchmarks/gpu_check.sh OUTDIR     (tests: at most 7 minutes; then at most 200 s per op)
#
# Environment: PYTHON (default python3); PYTEST_ARGS (extra pytest arguments, paths too;
# default -m "not fuzz": the fuzzer compiles a kernel for most examples it draws, more than
# the time here allows; PYTEST_ARGS="-m fuzz" runs it alone);
# TEST_TIMEOUT (s, default 420; 0 skips the tests); CKPT_ARGS, CKPT_TIMEOUT (the checkpoint
# benchmark: default --quick, 90 s; 0 skips it); BENCH_OPS (ops to time, default all,
# "none" for none); BENCH_ARGS (e.g. --quick); BENCH_TIMEOUT (s per op, default 200).
#   PYTEST_ARGS="-n 8 tests/ops" BENCH_OPS="rms_norm rotary" benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
unset TRITON_INTERPRET
status=0

{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>/dev/null || rocm-smi 2>/dev/null || echo "no nvidia-smi / rocm-smi"
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hip', torch.version.hip); print('triton', triton.__version__); print(torch.cuda.get_device_name())"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

# Build for the GPU in this machine only: faster, and what runs here is what gets tested.
archs=()
if "$py" -c "import torch, sys; sys.exit(0 if torch.version.hip else 1)"; then
  arch=$("$py" -c "import torch; print(torch.cuda.get_device_properties(0).gcnArchName.split(':')[0])")
  archs=(-C "cmake.define.CMAKE_HIP_ARCHITECTURES=$arch")
else
  arch=$("$py" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
  archs=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch")
fi
echo "== install (extension for $arch)"
if ! "$py" -m pip install --no-build-isolation --no-deps -e . "${archs[@]}" >"$out/install.log" 2>&1; then
  echo "install failed; see $out/install.log"; tail -30 "$out/install.log"; exit 1
fi
"$py" -m eurocore backends | tee -a "$out/environment.txt"
# The C++ kernels must be there: the tests below run every op on the cuda backend too.
if ! "$py" -c "from eurocore.ops import available_backends as a; raise SystemExit(not a()['cuda'].available)"; then
  echo "the cuda backend is not available after the install; see $out/install.log"; status=1
fi

if [ "${TEST_TIMEOUT:-420}" != 0 ]; then
  echo "== tests (compiled Triton, no interpreter)"
  timeout "${TEST_TIMEOUT:-420}" "$py" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$out/tests.xml" ${PYTEST_ARGS:--m "not fuzz"} 2>&1 | tee "$out/tests.log" | tail -40 || status=1
fi

# Checkpoints on the GPU: pinned staging of async saves, CUDA generator states, DCP's gloo
# group beside NCCL; the tiny model unless CKPT_ARGS says otherwise ("--model 100m" times a
# real save). CKPT_TIMEOUT=0 skips it.
if [ "${CKPT_TIMEOUT:-90}" != 0 ]; then
  echo "== checkpoint benchmark"
  timeout "${CKPT_TIMEOUT:-90}" "$py" -m eurocore.benchmarks.checkpoint --out "$out/checkpoint" \
    ${CKPT_ARGS:---quick} 2>&1 | tee "$out/checkpoint.log" | tail -12 || status=1
fi

# One run per op, each under its own time limit and writing its own JSON (in OUTDIR/<op>/),
# so an op that runs long loses only its own results.
ops=${BENCH_OPS:-$("$py" -c "from eurocore.benchmarks.__main__ import OPS; print(' '.join(OPS))")}
[ "$ops" = none ] && ops=""
for op in $ops; do
  echo "== kernel benchmark: $op"
  timeout "${BENCH_TIMEOUT:-200}" "$py" -m eurocore.benchmarks --ops "$op" --out "$out/$op" ${BENCH_ARGS:-} 2>&1 \
    | tee "$out/bench-$op.log" | tail -40 || status=1
done

echo "== results in $out"
ls -l "$out"
exit $status
