// Building blocks shared by the kernels: vectors of elements that load and store in one
// instruction, conversions of whole vectors, and the sum over the threads of a row.
#pragma once

#include "portability.h"

namespace eurocore {

// The widest access: 16 bytes (LDG.128 / global_load_dwordx4).
constexpr int kVectorBytes = 16;

// V elements of T, aligned so that a vector of up to 16 bytes is one memory instruction and
// a wider one (fp32 weights beside 8 bf16 activations) is whole 16-byte instructions.
template <typename T, int V>
struct alignas(sizeof(T) * V < kVectorBytes ? sizeof(T) * V : kVectorBytes) Vector {
  T element[V];
};

// `pointer` must be aligned to the vector: the launchers check before choosing V > 1, and
// the emulator checks every access.
template <int V, typename T>
EUROCORE_DEVICE Vector<T, V> load_vector(const T* pointer) {
#if defined(EUROCORE_HOST_EMULATION)
  emulation::check_aligned(pointer, alignof(Vector<T, V>));
#endif
  return *reinterpret_cast<const Vector<T, V>*>(pointer);
}

template <int V, typename T>
EUROCORE_DEVICE void store_vector(T* pointer, const Vector<T, V>& v) {
#if defined(EUROCORE_HOST_EMULATION)
  emulation::check_aligned(pointer, alignof(Vector<T, V>));
#endif
  *reinterpret_cast<Vector<T, V>*>(pointer) = v;
}

template <int V, typename T>
EUROCORE_DEVICE void load_floats(const T* pointer, float (&out)[V]) {
  const Vector<T, V> v = load_vector<V>(pointer);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = to_float(v.element[e]);
}

template <int V, typename T>
EUROCORE_DEVICE void store_floats(T* pointer, const float (&values)[V]) {
  Vector<T, V> v;
#pragma unroll
  for (int e = 0; e < V; ++e) v.element[e] = from_float<T>(values[e]);
  store_vector<V>(pointer, v);
}

// Rounds through T and back: what storing in T and reloading gives.
template <typename T>
EUROCORE_DEVICE float round_to(float value) {
  return to_float(from_float<T>(value));
}

template <typename T>
EUROCORE_DEVICE bool is_aligned(const T* pointer, int bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % uintptr_t(bytes) == 0;
}

// Sum over the warp, the same in every lane, in a fixed (butterfly) order.
EUROCORE_DEVICE float warp_sum(float value) {
#pragma unroll
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask /= 2) {
    value += shuffle_xor(value, lane_mask);
  }
  return value;
}

// Sum of `value` over the blockDim.x threads that share this thread's threadIdx.y (one row
// of the block's 2-D layout), returned to all of them, in a fixed order.
// blockDim.x must be a power of two: up to a warp, several rows share a warp and the sum
// stays in it (shuffles only); beyond, a multiple of the warp width, the warps of a row meet
// in shared memory. Every thread of the block must call this, the same number of times (it
// synchronises the block).
EUROCORE_DEVICE float row_sum(float value) {
  if (int(blockDim.x) <= kWarpSize) {
    // The row's lanes are an aligned power-of-two group of the warp: a butterfly over the
    // lane bits below blockDim.x never leaves it.
    for (int lane_mask = int(blockDim.x) / 2; lane_mask > 0; lane_mask /= 2) {
      value += shuffle_xor(value, lane_mask);
    }
    return value;
  }
  __shared__ float warp_totals[kMaxBlockThreads / 32];
  const int warps_per_row = int(blockDim.x) / kWarpSize;
  const int first = int(threadIdx.y) * warps_per_row;
  value = warp_sum(value);
  if (threadIdx.x % kWarpSize == 0) warp_totals[first + int(threadIdx.x) / kWarpSize] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps_per_row; ++w) total += warp_totals[first + w];
  __syncthreads();  // the next call may overwrite warp_totals
  return total;
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace eurocore
