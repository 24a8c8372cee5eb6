// The one binding module: eurocore._C (or eurocore._C_emulated, the same kernels built for
// the CPU emulator). It takes raw data pointers, element strides and stream handles from
// Python (eurocore/ops/cuda_launchers.py) and never links libtorch, so a torch upgrade
// never forces a rebuild. Argument errors raise ValueError naming the argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"
#include "kernels.h"

#ifndef EUROCORE_MODULE_NAME
#define EUROCORE_MODULE_NAME _C
#endif

namespace py = pybind11;
using py::arg;

PYBIND11_MODULE(EUROCORE_MODULE_NAME, m) {
  m.doc() = "eurocore CUDA/HIP kernels (the `cuda` backend)";
  m.def("gpu_backend", &eurocore::gpu_backend,
        "\"cuda\" or \"hip\" (\"emulation\": the CPU emulator): the toolkit of this build");
  m.def("gpu_archs", &eurocore::gpu_archs, "GPU architectures compiled in, comma-separated");
  m.def("gpu_runtime_version", &eurocore::gpu_runtime_version, "CUDA/HIP runtime version linked in");
  m.def("gpu_device_count", &eurocore::gpu_device_count, "number of visible GPUs (0 without a driver)");
  m.def("device_warp_size", &eurocore::device_warp_size, arg("device"));
  m.def("device_multiprocessors", &eurocore::device_multiprocessors, arg("device"));
#if defined(EUROCORE_HOST_EMULATION)
  m.def("set_emulated_warp_size", &eurocore::set_emulated_warp_size, arg("width"),
        "the warp width the emulator runs the kernels with: 32 (NVIDIA) or 64 (AMD CDNA)");
  m.def("emulator_check", &eurocore::emulator_check, arg("name"),
        "runs a kernel that breaks a GPU rule on purpose (csrc/host_emulation_checks.cpp)");
#endif

  m.def("rms_norm_forward", &eurocore::rms_norm_forward, arg("x"), arg("x_stride"),
        arg("residual"), arg("residual_stride"), arg("weight"), arg("y"), arg("y_stride"),
        arg("h"), arg("h_stride"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"),
        arg("zero_centered_weight"), arg("dtype"), arg("weight_dtype"), arg("device"),
        arg("stream"), "RMSNorm forward; returns the vector width used (csrc/kernels.h)");
  m.def("rms_norm_backward_partials", &eurocore::rms_norm_backward_partials, arg("rows"),
        arg("cols"), arg("dtype"), arg("device"),
        "rows of the fp32 weight-gradient partials rms_norm_backward writes");
  m.def("rms_norm_backward", &eurocore::rms_norm_backward, arg("dy"), arg("dy_stride"),
        arg("dh_in"), arg("dh_in_stride"), arg("h"), arg("h_stride"), arg("weight"),
        arg("rstd"), arg("dx"), arg("dx_stride"), arg("dresidual"), arg("dresidual_stride"),
        arg("dw_partials"), arg("partials"), arg("rows"), arg("cols"),
        arg("zero_centered_weight"), arg("dtype"), arg("weight_dtype"), arg("device"),
        arg("stream"), "RMSNorm backward; returns the vector width used (csrc/kernels.h)");
  m.def("rotary", &eurocore::rotary, arg("q"), arg("q_strides"), arg("k"), arg("k_strides"),
        arg("out_q"), arg("out_q_strides"), arg("out_k"), arg("out_k_strides"), arg("outer"),
        arg("inner"), arg("q_heads"), arg("k_heads"), arg("head_dim"), arg("cos"), arg("sin"),
        arg("table_stride"), arg("half"), arg("table_positions"), arg("table_dtype"),
        arg("positions"), arg("positions_stride_outer"), arg("positions_stride_inner"),
        arg("batch_first"), arg("interleaved"), arg("conjugate"), arg("copy_tail"), arg("dtype"),
        arg("device"), arg("stream"),
        "rotary embedding of q and k in one launch; returns the vector width used");
}
