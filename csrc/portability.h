// One source for NVIDIA and AMD: every vendor-specific name the kernels use, spelled once.
//
// Compiled by nvcc (EUROCORE_CUDA), by hipcc/clang (EUROCORE_HIP), or by a plain C++
// compiler for the CPU emulator the tests run without a GPU (EUROCORE_HOST_EMULATION,
// host_emulation.h). No hipify step; the kernels below this header are vendor-neutral.
//
// What differs between the vendors and is settled here:
//   - the runtime API (cuda* / hip*) and the stream type;
//   - the warp width: 32 on NVIDIA, 64 on AMD CDNA (gfx90a MI250X, gfx942 MI300X);
//     device code gets it as the compile-time constant kWarpSize, host code asks the device;
//   - warp shuffles (__shfl_xor_sync on CUDA, __shfl_xor on HIP);
//   - half-precision conversions. fp16 and bf16 are stored as 16-bit structs of our own
//     (half_t, bfloat16_t), so no vendor class with its own operators leaks into kernels.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(EUROCORE_HIP)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define EUROCORE_BACKEND_NAME "hip"
using gpuError_t = hipError_t;
using gpuStream_t = hipStream_t;
constexpr gpuError_t gpuSuccess = hipSuccess;
#define gpuGetDevice hipGetDevice
#define gpuSetDevice hipSetDevice
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuRuntimeGetVersion hipRuntimeGetVersion
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define gpuDeviceGetAttribute hipDeviceGetAttribute
#define gpuDevAttrWarpSize hipDeviceAttributeWarpSize
#define gpuDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#elif defined(EUROCORE_CUDA)
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define EUROCORE_BACKEND_NAME "cuda"
using gpuError_t = cudaError_t;
using gpuStream_t = cudaStream_t;
constexpr gpuError_t gpuSuccess = cudaSuccess;
#define gpuGetDevice cudaGetDevice
#define gpuSetDevice cudaSetDevice
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuRuntimeGetVersion cudaRuntimeGetVersion
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuDeviceGetAttribute cudaDeviceGetAttribute
#define gpuDevAttrWarpSize cudaDevAttrWarpSize
#define gpuDevAttrMultiProcessorCount cudaDevAttrMultiProcessorCount
#elif defined(EUROCORE_HOST_EMULATION)
#include "host_emulation.h"
#define EUROCORE_BACKEND_NAME "emulation"
#else
#error "define EUROCORE_CUDA, EUROCORE_HIP or EUROCORE_HOST_EMULATION (CMakeLists.txt does)"
#endif

#ifndef EUROCORE_ARCHS
#define EUROCORE_ARCHS "unknown"
#endif

#define EUROCORE_DEVICE __device__ __forceinline__

namespace eurocore {

// ---- Warp width -----------------------------------------------------------------------------
// Device code: a compile-time constant per target. AMD's GFX8/GFX9 families (including CDNA:
// gfx90a, gfx942, gfx950) run 64-wide wavefronts; RDNA runs 32-wide ones by default. Each
// offload target is compiled separately, so a fat binary carries the right width for each.
// The host pass of a HIP compile never uses the value; host code asks the device instead.
#if defined(EUROCORE_HOST_EMULATION)
#define kWarpSize (::eurocore::emulation::warp_size)
#elif defined(EUROCORE_HIP) && (defined(__GFX8__) || defined(__GFX9__))
constexpr int kWarpSize = 64;
#else
constexpr int kWarpSize = 32;
#endif

// Launch limits every GPU eurocore targets accepts (NVIDIA's z limit is the tighter).
constexpr int kMaxBlockThreads = 1024;
constexpr int64_t kMaxBlockZ = 64;
constexpr int64_t kMaxGridX = 2147483647;

// ---- Warp shuffles --------------------------------------------------------------------------
// Every lane of the warp must call these (the kernels only call them in converged code).
EUROCORE_DEVICE float shuffle_xor(float value, int lane_mask) {
#if defined(EUROCORE_CUDA)
  return __shfl_xor_sync(0xffffffffu, value, lane_mask, kWarpSize);
#elif defined(EUROCORE_HIP)
  return __shfl_xor(value, lane_mask, kWarpSize);
#else
  return emulation::shuffle_xor(value, lane_mask);
#endif
}

// ---- 16-bit floating-point storage ----------------------------------------------------------
// Plain 16-bit structs: trivially copyable, so they pack into vectors of any width and load
// with one 16-byte instruction, identically on every compiler.
struct alignas(2) half_t {
  uint16_t bits;
};
struct alignas(2) bfloat16_t {
  uint16_t bits;
};

EUROCORE_DEVICE float bits_to_float(uint32_t bits) {
#if defined(EUROCORE_HOST_EMULATION)
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#else
  return __uint_as_float(bits);
#endif
}

EUROCORE_DEVICE uint32_t float_to_bits(float value) {
#if defined(EUROCORE_HOST_EMULATION)
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#else
  return __float_as_uint(value);
#endif
}

EUROCORE_DEVICE float to_float(float value) { return value; }

EUROCORE_DEVICE float to_float(bfloat16_t value) { return bits_to_float(uint32_t(value.bits) << 16); }

EUROCORE_DEVICE float to_float(half_t value) {
#if defined(EUROCORE_HOST_EMULATION)
  return emulation::half_bits_to_float(value.bits);
#else
  return __half2float(__ushort_as_half(value.bits));
#endif
}

template <typename T>
EUROCORE_DEVICE T from_float(float value);

template <>
EUROCORE_DEVICE float from_float<float>(float value) {
  return value;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a (quiet) NaN.
template <>
EUROCORE_DEVICE bfloat16_t from_float<bfloat16_t>(float value) {
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((bits >> 16) | 0x40u)};
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return bfloat16_t{uint16_t((bits + rounding) >> 16)};
}

template <>
EUROCORE_DEVICE half_t from_float<half_t>(float value) {
#if defined(EUROCORE_HOST_EMULATION)
  return half_t{emulation::float_to_half_bits(value)};
#else
  return half_t{__half_as_ushort(__float2half_rn(value))};
#endif
}

}  // namespace eurocore
