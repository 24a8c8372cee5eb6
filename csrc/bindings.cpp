// The one binding module, eurocore._C. It takes raw data pointers, shapes, strides and
// streams from Python and never links libtorch. Kernels are added here as they land.
#include <pybind11/pybind11.h>

#include "build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "eurocore CUDA/HIP kernels (the `cuda` backend)";
  m.def("gpu_backend", &eurocore::gpu_backend, "\"cuda\" or \"hip\": the toolkit this module was built with");
  m.def("gpu_archs", &eurocore::gpu_archs, "GPU architectures compiled in, comma-separated");
  m.def("gpu_runtime_version", &eurocore::gpu_runtime_version, "CUDA/HIP runtime version linked in");
  m.def("gpu_device_count", &eurocore::gpu_device_count, "number of visible GPUs (0 without a driver)");
}
