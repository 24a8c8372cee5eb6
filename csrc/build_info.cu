// What the module was built for, and the device facts the launchers size their grids by.
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "build_info.h"
#include "kernels.h"
#include "portability.h"

namespace eurocore {

std::string gpu_backend() { return EUROCORE_BACKEND_NAME; }

std::string gpu_archs() { return EUROCORE_ARCHS; }

#if defined(EUROCORE_HOST_EMULATION)

int gpu_runtime_version() { return 0; }
int gpu_device_count() { return 1; }
int device_warp_size(int) { return emulation::warp_size; }
// Few "multiprocessors": the backward's weight-gradient partials still cover several rows.
int device_multiprocessors(int) { return 4; }

void set_emulated_warp_size(int width) {
  if (width != 32 && width != 64) {
    throw std::invalid_argument("width: expected 32 or 64, got " + std::to_string(width));
  }
  emulation::warp_size = width;
}

#else

int gpu_runtime_version() {
  int version = 0;
  return gpuRuntimeGetVersion(&version) == gpuSuccess ? version : -1;
}

int gpu_device_count() {
  int count = 0;
  if (gpuGetDeviceCount(&count) != gpuSuccess) {
    (void)gpuGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return count;
}

namespace {

// Device attributes are queried once per device: a query costs microseconds per launch.
int cached_attribute(int device, bool warp) {
  static std::mutex mutex;
  static std::vector<int> warp_sizes, multiprocessors;
  std::lock_guard<std::mutex> lock(mutex);
  if (device < 0) throw std::invalid_argument("device: expected >= 0, got " + std::to_string(device));
  if (size_t(device) >= warp_sizes.size()) {
    warp_sizes.resize(device + 1, 0);
    multiprocessors.resize(device + 1, 0);
  }
  if (warp_sizes[device] == 0) {
    int width = 0, count = 0;
    if (gpuDeviceGetAttribute(&width, gpuDevAttrWarpSize, device) != gpuSuccess ||
        gpuDeviceGetAttribute(&count, gpuDevAttrMultiProcessorCount, device) != gpuSuccess) {
      const std::string reason = gpuGetErrorString(gpuGetLastError());
      throw std::runtime_error("cannot query GPU " + std::to_string(device) + ": " + reason);
    }
    warp_sizes[device] = width;
    multiprocessors[device] = count;
  }
  return warp ? warp_sizes[device] : multiprocessors[device];
}

}  // namespace

int device_warp_size(int device) { return cached_attribute(device, true); }
int device_multiprocessors(int device) { return cached_attribute(device, false); }

#endif

}  // namespace eurocore
