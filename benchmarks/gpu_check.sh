#!/usr/bin/env bash
# The GPU check: what a lent GPU machine (about 15 minutes in all, at most 10 per command)
# should return, the most valuable results first, within one overall deadline, in at most 8
# files. Needs no network: it installs with --no-build-isolation --no-deps into the current
# Python, which must already have torch, triton, pytest, scikit-build-core, pybind11, cmake
# and ninja.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Steps, in this order; each may take min(its cap, the time left before the deadline), and
# the steps before the collectives leave NCCL_CAP for them:
#   environment  versions, GPU, nvcc/hipcc, pytest-xdist                   environment.txt
#   install      pip install -e . with the C++ extension for this GPU only. Without nvcc
#                (hipcc on ROCm), or when its build fails: installed without it (Triton
#                only), said in environment.txt and the summary, and the exit status is 1.
#   train        python -m eurocore.benchmarks.train: llama-1b at seq 2048 and 4096 and
#                llama3-8b cut to fit, each recompute setting: tokens/s, MFU, memory
#                                                                          train.json
#   attention    python -m eurocore.benchmarks --ops attention --quick     attention.json
#                (the pinned tiles; MHA seq 4096 and Llama's GQA 32/8 at 4096 and 16384)
#   tune         only with TUNE_CAP > 0 (one more file): python -m eurocore.benchmarks tune
#                --ops attention, the forward, dk/dv and dq tiles swept around the pinned
#                ones (timed first, the reference output)                 tune.json
#   kernels      rms_norm rotary swiglu --quick, the backward then the forward
#                (device times and host times per call)                   kernels.json
#   host         python -m eurocore.benchmarks host: host time per eager call   host.json
#   collectives  one rank of NCCL: all_reduce, all_gather, broadcast, destroy
#   tests        pytest -n auto (serially without pytest-xdist) tests/ops tests/nn
#                -m "not fuzz", interrupted at the deadline (the report keeps what ran)
#                                                                          tests.xml
# Every step's output goes to gpu_check.log, its outcome to summary.json (rewritten after
# each step). The benchmarks write their JSON after every case or setting and stop starting
# new ones 10% before their step's limit, so a step cut short keeps what it measured.
#
# Environment: PYTHON (default python3); DEADLINE (seconds for the whole check, default 480);
# GPU_CHECK_DEVICE (cuda, the default; cpu checks this script on a CPU: no install, gloo for
# the collectives, the benchmarks' CPU shapes); caps in seconds, 0 skipping the step:
# INSTALL_CAP (150), ATTENTION_CAP (110), TUNE_CAP (0: not run), TRAIN_CAP (150),
# KERNELS_CAP (60), HOST_CAP (40), NCCL_CAP (30),
# TESTS_CAP (600: what is left); BENCH_ARGS (the kernel benchmarks' grid, default --quick;
# "" for the full grids); TRAIN_ARGS (more options of the training benchmark, e.g. --quick);
# KERNEL_OPS (default "rms_norm rotary swiglu"); KERNEL_VARIANTS (default "bwd fwd");
# HOST_ARGS (the host benchmark's options, default "--calls 100 --repeats 3"); TUNE_OPS
# (default attention);
# TEST_PATHS (default "tests/ops tests/nn"); TEST_WORKERS (pytest -n, default auto);
# PYTEST_ARGS (default -m "not fuzz").
#   DEADLINE=300 TRAIN_ARGS="--models llama-1b" benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dev=${GPU_CHECK_DEVICE:-cuda}
deadline=${DEADLINE:-480}
start=$(date +%s)
log="$out/gpu_check.log"
: >"$log"
work=$(mktemp -d)  # the steps' records: outside OUTDIR, which keeps to its 8 files
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1  # a killed step's last lines reach the log
GRACE=5     # seconds between a step's SIGTERM (SIGINT for pytest) and its SIGKILL
FINAL=3     # seconds kept for the summary at the end
MIN_STEP=10  # a step with less time than this is skipped (a benchmark needs 5 s to start)
[ "$dev" = cpu ] || unset TRITON_INTERPRET  # compiled kernels, not the interpreter
case $dev in
  cuda) devflag=(--device cuda) ;;
  cpu) devflag=(--device cpu) ;;
  *) echo "GPU_CHECK_DEVICE: cuda or cpu, got '$dev'" >&2; exit 2 ;;
esac

say() { echo "$*" | tee -a "$log"; }
elapsed() { echo $(( $(date +%s) - start )); }

# budget CAP [RESERVE]: sets $limit, the seconds a step may take: CAP, or less when the
# deadline (less RESERVE for later steps and the kill grace) comes sooner; 0: no time.
budget() {
  local cap=$1 reserve=${2:-0} left
  left=$(( deadline - $(elapsed) - reserve - GRACE - FINAL ))
  limit=$(( cap < left ? cap : left ))
  (( limit < MIN_STEP )) && limit=0
  return 0
}

# pydeadline: the --deadline of a benchmark in a step of $limit seconds: 10% (at least 5 s)
# earlier, so that it stops itself, writes its JSON and exits before the kill.
pydeadline() { local margin=$(( limit / 10 > 5 ? limit / 10 : 5 )); echo $(( limit - margin )); }

# record NAME STATUS RC SECONDS LIMIT [FILE]: one line of summary.json's steps
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/steps.tsv"; write_summary; }

# run_step NAME SIGNAL FILE CMD...: runs CMD under $limit (SIGNAL first, SIGKILL GRACE s
# later), its output appended to the log and shown; records how it ended.
run_step() {
  local name=$1 signal=$2 file=$3 t0 rc status
  shift 3
  if (( limit == 0 )); then
    say "== $name: skipped (under $MIN_STEP s: its cap, or the time left)"
    record "$name" "skipped: no time" "" 0 0 "$file"
    return 0
  fi
  say "== $name (at $(elapsed) s; at most $limit s)"
  t0=$(date +%s)
  timeout -s "$signal" -k "$GRACE" "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed" ;;
  esac
  say "== $name: $status (exit status $rc, $(( $(date +%s) - t0 )) s)"
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$file"
  return "$rc"
}

write_summary() {
  "$py" - "$out" "$work/steps.tsv" "$deadline" "$(elapsed)" "$dev" "$extension" \
    "${final_status:-}" <<'EOF'
import json, os, sys
out, steps_file, deadline, elapsed, device, extension, final = sys.argv[1:]
steps = []
for line in open(steps_file, encoding="utf-8").read().splitlines():
    name, status, rc, seconds, limit, file = line.split("\t")
    step = {"step": name, "status": status, "exit_status": int(rc) if rc else None,
            "seconds": int(seconds), "limit_s": int(limit), "file": file or None}
    if file.endswith(".json") and os.path.exists(os.path.join(out, file)):
        try:  # the benchmark's own word: complete, deadline (stopped itself) or running
            with open(os.path.join(out, file), encoding="utf-8") as f:
                step["result_status"] = json.load(f).get("status")
        except (OSError, ValueError):
            step["result_status"] = "unreadable"
    steps.append(step)
summary = {"deadline_s": int(deadline), "elapsed_s": int(elapsed), "device": device,
           "cpp_extension": extension, "steps": steps,
           "exit_status": int(final) if final else None}
tmp = os.path.join(out, ".summary.json.tmp")
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
os.replace(tmp, os.path.join(out, "summary.json"))
EOF
}

status=0
extension="not checked"
: >"$work/steps.tsv"

# --- environment ---------------------------------------------------------------------------
# One Python start for what the steps need to know (each torch import takes seconds)
"$py" - >"$work/python.txt" 2>&1 <<'EOF'
import torch
gpu = torch.cuda.is_available()
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, hip {torch.version.hip}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as err:  # reported, not fatal: the benchmarks say what it breaks
    print(f"triton: not importable ({err})")
try:
    import xdist  # noqa: F401
    print("pytest-xdist: yes")
except ImportError:
    print("pytest-xdist: no (the tests run serially)")
if gpu:
    print(f"gpu {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}"
          f", {torch.cuda.device_count()} visible")
    print(f"nccl {torch.cuda.nccl.version() if not torch.version.hip else '(rccl)'}")
    major, minor = torch.cuda.get_device_capability()
    arch = (torch.cuda.get_device_properties(0).gcnArchName.split(":")[0] if torch.version.hip
            else f"{major}{minor}" + ("a" if major == 9 else ""))
    print(f"@arch={arch}")
print(f"@hip={1 if torch.version.hip else 0}")
print(f"@gpu={1 if gpu else 0}")
EOF
value() { sed -n "s/^@$1=//p" "$work/python.txt"; }
hip=$(value hip)
arch=$(value arch)
if [ "$dev" = cuda ] && [ "$(value gpu)" != 1 ]; then
  grep -v "^@" "$work/python.txt" | tee -a "$log"
  say "GPU_CHECK_DEVICE=$dev, but torch sees no GPU; GPU_CHECK_DEVICE=cpu checks this script on a CPU"
  exit 1
fi
compiler=""
if [ "$dev" = cuda ]; then
  if [ "$hip" = 1 ]; then
    compiler=$(command -v hipcc || { [ -x /opt/rocm/bin/hipcc ] && echo /opt/rocm/bin/hipcc; } || true)
  else
    compiler=$(command -v nvcc || for c in "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
                 [ -x "$c" ] && { echo "$c"; break; }; done || true)
    # CMake looks for nvcc on PATH; one found elsewhere is named to it
    [ -n "$compiler" ] && ! command -v nvcc >/dev/null && export CUDACXX=$compiler
  fi
fi
xdist=no
grep -q "^pytest-xdist: yes" "$work/python.txt" && xdist=yes
{
  echo "gpu_check $(date -u +%FT%TZ): device $dev, deadline $deadline s"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no git)')"
  if [ "$dev" = cuda ]; then
    timeout 20 nvidia-smi 2>&1 || timeout 20 rocm-smi 2>&1 || echo "no nvidia-smi / rocm-smi"
  fi
  grep -v "^@" "$work/python.txt"
  if [ "$dev" = cuda ]; then
    if [ -n "$compiler" ]; then
      echo "C++ compiler: $compiler: $("$compiler" --version 2>&1 | tail -1)"
    else
      echo "C++ compiler: MISSING ($([ "$hip" = 1 ] && echo hipcc || echo nvcc) not found):" \
           "the cuda backend (C++ kernels) cannot be built; Triton only"
    fi
  fi
} >"$out/environment.txt" 2>&1
tee -a "$log" <"$out/environment.txt"
record environment ok 0 "$(elapsed)" 0 environment.txt

# --- install -------------------------------------------------------------------------------
if [ "$dev" = cpu ]; then
  extension="not built: GPU_CHECK_DEVICE=cpu (the installed eurocore is used)"
  record install "skipped: cpu" "" 0 0 ""
else
  # for the GPU in this machine only: faster, and what runs here is what gets tested
  if [ "$hip" = 1 ]; then
    archs=(-C "cmake.define.CMAKE_HIP_ARCHITECTURES=$arch"); backend=HIP
  else
    archs=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch"); backend=CUDA
  fi
  pip_install=("$py" -m pip install --no-build-isolation --no-deps -e .)
  built=no
  budget "${INSTALL_CAP:-150}" "${NCCL_CAP:-30}"
  if [ -n "$compiler" ]; then
    # CUDA or HIP, not AUTO: a build that cannot find its compiler fails instead of
    # installing nothing
    run_step "install (C++ extension for $arch)" TERM "" \
      env EUROCORE_GPU_BACKEND=$backend "${pip_install[@]}" "${archs[@]}" && built=yes
  fi
  if [ "$built" = yes ]; then
    if "$py" -c "from eurocore.ops import available_backends as a; raise SystemExit(not a()['cuda'].available)"; then
      extension="built for $arch ($compiler)"
    else
      extension="BUILT BUT UNAVAILABLE (environment.txt: eurocore backends says why); Triton only"
      status=1
    fi
  else
    compiler_name=$([ "$hip" = 1 ] && echo hipcc || echo nvcc)
    extension="NOT BUILT: $([ -n "$compiler" ] && echo "its build failed (gpu_check.log)" ||
                            echo "no $compiler_name on this machine"); Triton only"
    status=1
    budget 60 "${NCCL_CAP:-30}"
    run_step "install (no C++ extension)" TERM "" \
      env EUROCORE_GPU_BACKEND=NONE "${pip_install[@]}" || say "eurocore could not be installed"
  fi
  say "C++ extension: $extension"
  { echo "C++ extension: $extension"; "$py" -m eurocore backends 2>&1; } >>"$out/environment.txt"
fi

# --- benchmarks, most valuable first -------------------------------------------------------
bench=${BENCH_ARGS---quick}
# the model's MFU first (the figure users compare), then attention, then the rest
train_args=()
[ "$dev" = cpu ] && train_args=(--quick)
budget "${TRAIN_CAP:-150}" "${NCCL_CAP:-30}"
run_step train TERM train.json "$py" -m eurocore.benchmarks.train "${devflag[@]}" \
  "${train_args[@]}" ${TRAIN_ARGS:-} --json "$out/train.json" --deadline "$(pydeadline)" || status=1

budget "${ATTENTION_CAP:-110}" "${NCCL_CAP:-30}"
run_step attention TERM attention.json "$py" -m eurocore.benchmarks --ops attention $bench \
  "${devflag[@]}" --json "$out/attention.json" --deadline "$(pydeadline)" || status=1

# opt-in (TUNE_CAP): the sweep that re-decides the pinned tiles; its JSON after every row
budget "${TUNE_CAP:-0}" "${NCCL_CAP:-30}"
run_step tune TERM tune.json "$py" -m eurocore.benchmarks tune --ops ${TUNE_OPS:-attention} \
  --json "$out/tune.json" --deadline "$(pydeadline)" || status=1

budget "${KERNELS_CAP:-60}" "${NCCL_CAP:-30}"
run_step kernels TERM kernels.json "$py" -m eurocore.benchmarks \
  --ops ${KERNEL_OPS:-rms_norm rotary swiglu} --variants ${KERNEL_VARIANTS:-bwd fwd} $bench \
  "${devflag[@]}" --json "$out/kernels.json" --deadline "$(pydeadline)" || status=1

# host time per eager call (fast path, custom-op path, torch eager, torch.compile); its JSON
# is rewritten after each op
budget "${HOST_CAP:-40}" "${NCCL_CAP:-30}"
run_step host TERM host.json "$py" -m eurocore.benchmarks host "${devflag[@]}" \
  ${HOST_ARGS:---calls 100 --repeats 3} --json "$out/host.json" || status=1

# --- collectives: one rank; NCCL (RCCL on ROCm) on the GPU, gloo on the CPU ----------------
read -r -d '' COLLECTIVES <<'EOF'
import socket, sys, time
import torch
import torch.distributed as dist
gpu = sys.argv[1] == "cuda"
backend = "nccl" if gpu else "gloo"
device = torch.device("cuda", 0) if gpu else torch.device("cpu")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
t0 = time.perf_counter()
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                        **({"device_id": device} if gpu else {}))
x = torch.arange(1024, dtype=torch.float32, device=device)
dist.all_reduce(x)
parts = [torch.empty_like(x)]
dist.all_gather(parts, x)
gathered = torch.empty_like(x)
dist.all_gather_into_tensor(gathered, x)
dist.broadcast(x, src=0)
dist.barrier()
expected = torch.arange(1024, dtype=torch.float32, device=device)
assert all(torch.equal(t, expected) for t in (x, parts[0], gathered)), "wrong values"
dist.destroy_process_group()
version = torch.cuda.nccl.version() if gpu else ""
print(f"{backend} {version}: one rank, all_reduce, all_gather, all_gather_into_tensor, "
      f"broadcast, barrier, destroy: ok in {time.perf_counter() - t0:.2f} s")
EOF
budget "${NCCL_CAP:-30}"
run_step collectives TERM "" "$py" -c "$COLLECTIVES" "$dev" || status=1

# --- tests in the time left ----------------------------------------------------------------
workers=()
[ "$xdist" = yes ] && workers=(-n "${TEST_WORKERS:-auto}")
budget "${TESTS_CAP:-600}"
# SIGINT at the limit: pytest stops as on Ctrl-C and still writes tests.xml of what ran
run_step tests INT tests.xml "$py" -m pytest -q -rfE -p no:cacheprovider "${workers[@]}" \
  --junitxml="$out/tests.xml" ${PYTEST_ARGS:--m "not fuzz"} ${TEST_PATHS:-tests/ops tests/nn}
rc=$?
# 2: interrupted at the limit, the time left being spent by design; 1: a test failed
case $rc in 0|2|124|137) ;; *) status=1 ;; esac

find "$out" -maxdepth 1 -name '.*.tmp' -delete  # a writer killed mid-write leaves one
final_status=$status
write_summary
say "== summary ($(elapsed) s of $deadline s; exit status $status)"
"$py" - "$out/summary.json" <<'EOF' | tee -a "$log"
import json, sys
summary = json.load(open(sys.argv[1], encoding="utf-8"))
print(f"C++ extension: {summary['cpp_extension']}")
for s in summary["steps"]:
    result = f", result {s['result_status']}" if s.get("result_status") else ""
    print(f"  {s['step']:42} {s['status']:18} {s['seconds']:4d} s of {s['limit_s']:4d}"
          f"{result}{'  -> ' + s['file'] if s['file'] else ''}")
EOF
say "files in $out:"
ls -l "$out" | tee -a "$log"
exit $status
