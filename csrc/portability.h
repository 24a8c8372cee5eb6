// One source for NVIDIA and AMD: the vendor names the kernels need, spelled once.
// Compiled by nvcc (EUROCORE_CUDA) or by hipcc/clang (EUROCORE_HIP); no hipify step.
#pragma once

#if defined(EUROCORE_HIP)
#include <hip/hip_runtime.h>
#define EUROCORE_BACKEND_NAME "hip"
using gpuError_t = hipError_t;
using gpuStream_t = hipStream_t;
constexpr gpuError_t gpuSuccess = hipSuccess;
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuRuntimeGetVersion hipRuntimeGetVersion
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#elif defined(EUROCORE_CUDA)
#include <cuda_runtime.h>
#define EUROCORE_BACKEND_NAME "cuda"
using gpuError_t = cudaError_t;
using gpuStream_t = cudaStream_t;
constexpr gpuError_t gpuSuccess = cudaSuccess;
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuRuntimeGetVersion cudaRuntimeGetVersion
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#else
#error "define EUROCORE_CUDA or EUROCORE_HIP (CMakeLists.txt does)"
#endif

#ifndef EUROCORE_ARCHS
#define EUROCORE_ARCHS "unknown"
#endif
