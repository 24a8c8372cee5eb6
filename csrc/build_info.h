// What the extension was built for; plain C++ so bindings.cpp needs no GPU compiler.
#pragma once
#include <string>

namespace eurocore {
std::string gpu_backend();     // "cuda", "hip", or "emulation" (the CPU emulator)
std::string gpu_archs();       // the architectures compiled in, e.g. "80,90a"
int gpu_runtime_version();     // CUDA/HIP runtime version the module was linked with
int gpu_device_count();        // visible devices; 0 when there is no driver or GPU
#if defined(EUROCORE_HOST_EMULATION)
void set_emulated_warp_size(int width);       // 32 (NVIDIA) or 64 (AMD CDNA)
int emulator_check(const std::string& name);  // csrc/host_emulation_checks.cpp
#endif
}  // namespace eurocore
