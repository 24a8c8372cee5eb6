// Host-side helpers of the launchers: argument errors, the device guard, the element-type
// switch and the launch itself (a triple-chevron launch on a GPU, the emulator otherwise).
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernel_utils.h"
#include "kernels.h"
#include "portability.h"

namespace eurocore {

[[noreturn]] inline void bad_argument(const std::string& argument, const std::string& problem) {
  throw std::invalid_argument(argument + ": " + problem);
}

inline void require(bool ok, const std::string& argument, const std::string& problem) {
  if (!ok) bad_argument(argument, problem);
}

// Makes `device` current for the launch and restores the caller's device afterwards, so the
// kernel runs where its tensors live whatever device the Python thread has selected.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
#if !defined(EUROCORE_HOST_EMULATION)
    if (gpuGetDevice(&previous_) != gpuSuccess) throw std::runtime_error("no GPU device");
    if (previous_ != device && gpuSetDevice(device) != gpuSuccess) {
      throw std::runtime_error("cannot select GPU " + std::to_string(device));
    }
#endif
    (void)device;
  }
  ~DeviceGuard() {
#if !defined(EUROCORE_HOST_EMULATION)
    int current = previous_;
    if (gpuGetDevice(&current) == gpuSuccess && current != previous_) (void)gpuSetDevice(previous_);
#endif
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Whether a tensor at `pointer` with the given element strides allows accesses of `width`
// elements (16 bytes): the start 16-byte aligned, every stride a multiple of the width.
// An absent tensor (null) allows anything.
inline bool allows_vectors(const void* pointer, std::initializer_list<int64_t> strides,
                           int width) {
  if (pointer == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(pointer) % kVectorBytes != 0) return false;
  for (const int64_t stride : strides) {
    if (stride % width != 0) return false;
  }
  return true;
}

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
void dispatch_dtype(int dtype, const char* argument, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(half_t{});
    case DType::kBFloat16:
      return f(bfloat16_t{});
  }
  bad_argument(argument, "expected float32, float16 or bfloat16 (code 0, 1 or 2), got code " +
                             std::to_string(dtype));
}

// Calls f(T{}) when `code` is the activations' dtype `dtype` (or the tensor is absent), else
// f(float{}) for float32: weights and tables come in either.
template <typename T, typename F>
void dispatch_same_or_float(int code, int dtype, bool present, const char* argument, F&& f) {
  if (!present || code == dtype) return f(T{});
  require(static_cast<DType>(code) == DType::kFloat32, argument,
          "expected the activations' dtype or float32");
  f(float{});
}

// kernel<<<grid, block, 0, stream>>>(args...), with launch errors thrown.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, uintptr_t stream,
            Args... args) {
#if defined(EUROCORE_HOST_EMULATION)
  (void)name;
  (void)stream;
  emulation::launch(kernel, grid, block, args...);
#else
  kernel<<<grid, block, 0, reinterpret_cast<gpuStream_t>(stream)>>>(args...);
  const gpuError_t error = gpuGetLastError();
  if (error != gpuSuccess) {
    throw std::runtime_error(std::string(name) + ": launch failed: " + gpuGetErrorString(error));
  }
#endif
}

}  // namespace eurocore
