// Kernels that break the GPU's rules on purpose, built only into the CPU emulator module
// (eurocore._C_emulated), so the tests can show that the emulator catches what it claims to:
// a missing __syncthreads (a race that warps drifting apart expose), threads leaving a
// barrier early, misaligned vector accesses, launches beyond the GPUs' limits.
#if !defined(EUROCORE_HOST_EMULATION)
#error "host_emulation_checks.cpp belongs to the emulator build only"
#endif

#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_utils.h"
#include "launch.h"

namespace eurocore {
namespace {

constexpr int kSteps = 8;

// row_sum without its second barrier: a warp that finishes early overwrites its slot of
// warp_totals for the next step while another warp still reads this step's.
EUROCORE_DEVICE float row_sum_missing_barrier(float value) {
  __shared__ float warp_totals[kMaxBlockThreads / 32];
  const int warps = int(blockDim.x) / kWarpSize;
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += warp_totals[w];
  return total;
}

// Each step, every thread adds (step + 1) · (its warp + 1); writes the sums it saw.
__global__ void sum_steps(float* out, bool with_barrier) {
  const int warp = int(threadIdx.x) / kWarpSize;
  for (int step = 0; step < kSteps; ++step) {
    const float value = float((step + 1) * (warp + 1));
    const float total = with_barrier ? row_sum(value) : row_sum_missing_barrier(value);
    out[step * blockDim.x + threadIdx.x] = total;
  }
}

__global__ void leave_before_barrier() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void misaligned_load(const float* data, float* out) {
  float values[4];
  load_floats<4>(data + 1, values);  // 4 bytes past a 16-byte boundary
  out[threadIdx.x] = values[0];
}

__global__ void do_nothing() {}

}  // namespace

// Runs one check; returns how many step sums were wrong (sum_steps), else 0. Rule breaks the
// emulator detects raise RuntimeError from the launch.
int emulator_check(const std::string& name) {
  const int threads = 4 * kWarpSize;
  if (name == "row_sum" || name == "row_sum_missing_barrier") {
    std::vector<float> out(size_t(kSteps) * threads);
    launch("sum_steps", sum_steps, dim3(1), dim3(threads), 0, out.data(), name == "row_sum");
    int wrong = 0;
    const int warps = threads / kWarpSize;
    for (int step = 0; step < kSteps; ++step) {
      // Σ over warps w of kWarpSize · (step + 1) · (w + 1)
      const float expected = float(kWarpSize * (step + 1) * warps * (warps + 1) / 2);
      for (int t = 0; t < threads; ++t) wrong += out[size_t(step) * threads + t] != expected;
    }
    return wrong;
  }
  if (name == "leave_before_barrier") {
    launch("leave_before_barrier", leave_before_barrier, dim3(1), dim3(threads), 0);
  } else if (name == "misaligned_load") {
    alignas(16) float data[8] = {};
    float out[1] = {};
    launch("misaligned_load", misaligned_load, dim3(1), dim3(1), 0, data, out);
  } else if (name == "block_z_above_64") {
    launch("do_nothing", do_nothing, dim3(1), dim3(1, 1, 128), 0);
  } else {
    bad_argument("name", "no emulator check named '" + name + "'");
  }
  return 0;
}

}  // namespace eurocore
