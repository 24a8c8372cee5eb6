// The launchers the binding module exposes: plain C++ over raw pointers, element strides and
// a stream handle, so neither this header nor bindings.cpp needs a GPU compiler or libtorch.
// Tensors are passed as integer addresses (0 for an absent optional tensor). Every launcher
// checks its arguments and throws std::invalid_argument, naming the argument, before it
// launches anything; it returns the vector width it chose (elements per memory access).
#pragma once

#include <array>
#include <cstdint>

namespace eurocore {

// Element types of activations and tables; the values match eurocore/ops/cuda_launchers.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Threads per warp and multiprocessors of `device` (or of the emulator).
int device_warp_size(int device);
int device_multiprocessors(int device);

// y = RMSNorm(h) (· w), h = x (+ residual); see csrc/rms_norm.cu.
// x, residual, y, h: (rows, cols) in `dtype`, unit stride along cols, the given row strides;
// weight: (cols,) contiguous in `weight_dtype` (`dtype` or float32); rstd: (rows,) float32.
int rms_norm_forward(uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t residual_stride,
                     uintptr_t weight, uintptr_t y, int64_t y_stride, uintptr_t h,
                     int64_t h_stride, uintptr_t rstd, int64_t rows, int64_t cols, float eps,
                     bool zero_centered_weight, int dtype, int weight_dtype, int device,
                     uintptr_t stream);

// Rows of the float32 weight-gradient partials the backward writes for this shape on this
// device: a pure function of them, so the gradient's summation order is too.
int64_t rms_norm_backward_partials(int64_t rows, int64_t cols, int dtype, int device);

// dx (= dresidual) and the weight-gradient partials (partials, cols) float32, all written.
// dy, dh_in, h, dx, dresidual: (rows, cols) in `dtype` with unit stride along cols.
int rms_norm_backward(uintptr_t dy, int64_t dy_stride, uintptr_t dh_in, int64_t dh_in_stride,
                      uintptr_t h, int64_t h_stride, uintptr_t weight, uintptr_t rstd,
                      uintptr_t dx, int64_t dx_stride, uintptr_t dresidual,
                      int64_t dresidual_stride, uintptr_t dw_partials, int64_t partials,
                      int64_t rows, int64_t cols, bool zero_centered_weight, int dtype,
                      int weight_dtype, int device, uintptr_t stream);

// Rotates q and k (either may be rotated in place: out == in) in one launch; see
// csrc/rotary.cu. q, out_q: (outer, inner, q_heads, head_dim), k, out_k with k_heads (k may
// be 0 with k_heads 0); strides (outer, inner, head) in elements, unit along head_dim.
// cos, sin: (positions, half) with row stride table_stride, in `table_dtype`.
// positions: int64 (outer, inner), each token's row of the table, read at
// outer * positions_stride_outer + inner * positions_stride_inner (a stride may be 0); or 0:
// the token's index along the sequence axis (inner when batch_first, else outer).
int rotary(uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k,
           std::array<int64_t, 3> k_strides, uintptr_t out_q, std::array<int64_t, 3> out_q_strides,
           uintptr_t out_k, std::array<int64_t, 3> out_k_strides, int64_t outer, int64_t inner,
           int64_t q_heads, int64_t k_heads, int64_t head_dim, uintptr_t cos, uintptr_t sin,
           int64_t table_stride, int64_t half, int64_t table_positions, int table_dtype,
           uintptr_t positions, int64_t positions_stride_outer, int64_t positions_stride_inner,
           bool batch_first, bool interleaved, bool conjugate, bool copy_tail, int dtype,
           int device, uintptr_t stream);

}  // namespace eurocore
