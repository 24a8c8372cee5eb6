#include "build_info.h"
#include "portability.h"

namespace eurocore {

std::string gpu_backend() { return EUROCORE_BACKEND_NAME; }

std::string gpu_archs() { return EUROCORE_ARCHS; }

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

}  // namespace eurocore
