// Fused RMSNorm, optionally after a residual add, forward and backward.
//
// Per row of n elements, in fp32 (the semantics of eurocore.ops.rms_norm):
//
//     h    = x + r                 (h = x without a residual; rounded to h's dtype)
//     rstd = 1 / sqrt(mean(h²) + eps)
//     n̂    = round(h · rstd)       (to h's dtype, as HF LlamaRMSNorm does)
//     y    = n̂ · w                 (w → 1 + w zero-centred; no weight: y = n̂)
//
// Backward, with g = dy · w, x̂ = h · rstd and dh_in the gradient reaching h through the
// residual stream:
//
//     dh = rstd · (g − x̂ · mean(g · x̂)) + dh_in,    dx = dr = dh
//     dw = Σ_rows dy · n̂
//
// Layout: a block is (threads_per_row, rows_per_block) threads (256 but for rows that need
// more); each row of threads owns one row of the tensor and reads it in vectors of V
// elements (16 bytes, or 1 element when the pointers or strides do not allow it). A thread
// keeps its first vectors (4 forward, 2 backward) in registers between the two passes;
// longer rows reread the rest (from L2).
//
// The weight gradient is deterministic: the backward has a fixed number of partials (a
// function of the shape and the device: at least 16 rows each, at most 4 blocks per
// multiprocessor's worth), each a row of threads that walks rows
// partial, partial + partials, ... and sums dy · n̂ into its own fp32 row of dw_partials.
// Those rows are summed in a fixed order afterwards. No atomics.
#include <algorithm>

#include "kernel_utils.h"
#include "launch.h"

namespace eurocore {
namespace {

// Vectors a thread keeps in registers between the passes over a row. The backward holds
// dy, h and the fp32 dw sums of each: 2 keeps it under 128 registers without spills.
constexpr int kForwardCachedVectors = 4;
constexpr int kBackwardCachedVectors = 2;
constexpr int kMaxBackwardThreads = 512;
constexpr int kMinRowThreads = 4;
constexpr int kTargetBlockThreads = 256;
// Fewer partial rows than this many rows each would make the fp32 partials (written, then
// summed) cost more memory traffic than they save in parallelism.
constexpr int64_t kMinRowsPerPartial = 16;

template <typename T, typename W>
struct ForwardParams {
  const T* x;
  const T* residual;  // null: no residual
  const W* weight;    // null: no weight
  T* y;
  T* h;  // written with a residual
  float* rstd;
  int64_t x_stride, residual_stride, y_stride, h_stride;
  int64_t rows, cols;
  float eps;
  bool zero_centered;
};

template <typename T, typename W>
struct BackwardParams {
  const T* dy;
  const T* dh_in;  // null: no gradient from the residual stream
  const T* h;
  const W* weight;  // null: no weight, no weight gradient
  const float* rstd;
  T* dx;
  T* dresidual;  // null: dx serves both
  float* dw_partials;
  int64_t dy_stride, dh_in_stride, h_stride, dx_stride, dresidual_stride;
  int64_t rows, cols, partials;
  bool zero_centered;
};

// The scale of columns [col, col + V): w (or 1 + w), or 1 without a weight.
template <int V, typename W>
EUROCORE_DEVICE void load_scale(const W* weight, int64_t col, bool zero_centered,
                                float (&w)[V]) {
  if (weight == nullptr) {
#pragma unroll
    for (int e = 0; e < V; ++e) w[e] = 1.0f;
    return;
  }
  load_floats<V>(weight + col, w);
  if (zero_centered) {
#pragma unroll
    for (int e = 0; e < V; ++e) w[e] += 1.0f;
  }
}

// h at [col, col + V): x, or x + r rounded to T and stored to h.
template <int V, typename T, typename W>
EUROCORE_DEVICE Vector<T, V> load_h(const ForwardParams<T, W>& p, int64_t row, int64_t col) {
  Vector<T, V> h = load_vector<V>(p.x + row * p.x_stride + col);
  if (p.residual != nullptr) {
    const Vector<T, V> r =
        load_vector<V>(p.residual + row * p.residual_stride + col);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      h.element[e] = from_float<T>(to_float(h.element[e]) + to_float(r.element[e]));
    }
    store_vector<V>(p.h + row * p.h_stride + col, h);
  }
  return h;
}

template <int V, typename T>
EUROCORE_DEVICE float sum_of_squares(const Vector<T, V>& h) {
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < V; ++e) sum += to_float(h.element[e]) * to_float(h.element[e]);
  return sum;
}

template <int V, typename T, typename W>
EUROCORE_DEVICE void store_y(const ForwardParams<T, W>& p, int64_t row, int64_t col,
                             const Vector<T, V>& h, float rstd) {
  float w[V];
  load_scale<V>(p.weight, col, p.zero_centered, w);
  float y[V];
#pragma unroll
  for (int e = 0; e < V; ++e) y[e] = round_to<T>(to_float(h.element[e]) * rstd) * w[e];
  store_floats<V>(p.y + row * p.y_stride + col, y);
}

template <typename T, typename W, int V>
__global__ __launch_bounds__(kMaxBlockThreads) void rms_norm_forward_kernel(
    ForwardParams<T, W> p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;  // idle rows still join the reduction's barriers
  const int64_t vectors = p.cols / V;
  const int64_t stride = blockDim.x;

  Vector<T, V> cached[kForwardCachedVectors];
  float sum_sq = 0.0f;
#pragma unroll
  for (int k = 0; k < kForwardCachedVectors; ++k) {
    const int64_t v = threadIdx.x + k * stride;
    if (active && v < vectors) {
      cached[k] = load_h<V>(p, row, v * V);
      sum_sq += sum_of_squares<V>(cached[k]);
    }
  }
  const int64_t first_uncached = threadIdx.x + kForwardCachedVectors * stride;
  for (int64_t v = first_uncached; active && v < vectors; v += stride) {
    sum_sq += sum_of_squares<V>(load_h<V>(p, row, v * V));
  }
  const float rstd = 1.0f / sqrtf(row_sum(sum_sq) / float(p.cols) + p.eps);
  if (!active) return;  // no barrier follows
  if (threadIdx.x == 0) p.rstd[row] = rstd;

#pragma unroll
  for (int k = 0; k < kForwardCachedVectors; ++k) {
    const int64_t v = threadIdx.x + k * stride;
    if (v < vectors) store_y<V>(p, row, v * V, cached[k], rstd);
  }
  // The first pass wrote h with a residual (this thread's own columns): reread it.
  const T* h_row = p.residual != nullptr ? p.h + row * p.h_stride : p.x + row * p.x_stride;
  for (int64_t v = first_uncached; v < vectors; v += stride) {
    const Vector<T, V> h = load_vector<V>(h_row + v * V);
    store_y<V>(p, row, v * V, h, rstd);
  }
}

// dh for one vector; adds dy · n̂ into dw. dy, h hold the row's values at [col, col + V).
template <int V, typename T, typename W>
EUROCORE_DEVICE void backward_vector(const BackwardParams<T, W>& p, int64_t row, int64_t col,
                                     const Vector<T, V>& dy, const Vector<T, V>& h, float rstd,
                                     float mean_gx, float (&dw)[V]) {
  float w[V];
  load_scale<V>(p.weight, col, p.zero_centered, w);
  float dh[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float dy_e = to_float(dy.element[e]);
    const float x_hat = to_float(h.element[e]) * rstd;
    dh[e] = rstd * (dy_e * w[e] - x_hat * mean_gx);
    dw[e] += dy_e * round_to<T>(x_hat);
  }
  if (p.dh_in != nullptr) {
    float dh_in[V];
    load_floats<V>(p.dh_in + row * p.dh_in_stride + col, dh_in);
#pragma unroll
    for (int e = 0; e < V; ++e) dh[e] += dh_in[e];
  }
  store_floats<V>(p.dx + row * p.dx_stride + col, dh);
  if (p.dresidual != nullptr) store_floats<V>(p.dresidual + row * p.dresidual_stride + col, dh);
}

template <int V, typename T, typename W>
EUROCORE_DEVICE float dot_g_h(const BackwardParams<T, W>& p, int64_t col, const Vector<T, V>& dy,
                              const Vector<T, V>& h) {
  float w[V];
  load_scale<V>(p.weight, col, p.zero_centered, w);
  float dot = 0.0f;
#pragma unroll
  for (int e = 0; e < V; ++e) dot += to_float(dy.element[e]) * w[e] * to_float(h.element[e]);
  return dot;
}

template <typename T, typename W, int V>
__global__ __launch_bounds__(kMaxBackwardThreads) void rms_norm_backward_kernel(
    BackwardParams<T, W> p) {
  const int64_t partial = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool owns_partial = partial < p.partials;
  const bool has_weight = p.weight != nullptr;
  const int64_t vectors = p.cols / V;
  const int64_t stride = blockDim.x;
  const int64_t first_uncached = threadIdx.x + kBackwardCachedVectors * stride;
  float* dw_row = p.dw_partials + (owns_partial && has_weight ? partial * p.cols : 0);

  // Columns past the cached ones sum in this partial's own row of dw_partials.
  float zeros[V] = {};
  for (int64_t v = first_uncached; owns_partial && has_weight && v < vectors; v += stride) {
    store_floats<V>(dw_row + v * V, zeros);
  }
  float dw[kBackwardCachedVectors][V] = {};
  // Every row of threads takes the same number of steps: the reduction synchronises them.
  const int64_t steps = ceil_div(p.rows, p.partials);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t row = partial + step * p.partials;
    const bool active = owns_partial && row < p.rows;
    const float rstd = active ? p.rstd[row] : 0.0f;
    const T* dy_row = p.dy + (active ? row * p.dy_stride : 0);
    const T* h_row = p.h + (active ? row * p.h_stride : 0);

    Vector<T, V> dy[kBackwardCachedVectors], h[kBackwardCachedVectors];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < kBackwardCachedVectors; ++k) {
      const int64_t v = threadIdx.x + k * stride;
      if (active && v < vectors) {
        dy[k] = load_vector<V>(dy_row + v * V);
        h[k] = load_vector<V>(h_row + v * V);
        dot += dot_g_h<V>(p, v * V, dy[k], h[k]);
      }
    }
    for (int64_t v = first_uncached; active && v < vectors; v += stride) {
      dot += dot_g_h<V>(p, v * V, load_vector<V>(dy_row + v * V),
                        load_vector<V>(h_row + v * V));
    }
    const float mean_gx = row_sum(dot) * rstd / float(p.cols);
    if (!active) continue;

#pragma unroll
    for (int k = 0; k < kBackwardCachedVectors; ++k) {
      const int64_t v = threadIdx.x + k * stride;
      if (v < vectors) backward_vector<V>(p, row, v * V, dy[k], h[k], rstd, mean_gx, dw[k]);
    }
    for (int64_t v = first_uncached; v < vectors; v += stride) {
      float dw_uncached[V] = {};
      if (has_weight) load_floats<V>(dw_row + v * V, dw_uncached);
      backward_vector<V>(p, row, v * V, load_vector<V>(dy_row + v * V),
                         load_vector<V>(h_row + v * V), rstd, mean_gx,
                         dw_uncached);
      if (has_weight) store_floats<V>(dw_row + v * V, dw_uncached);
    }
  }
  if (!owns_partial || !has_weight) return;
#pragma unroll
  for (int k = 0; k < kBackwardCachedVectors; ++k) {
    const int64_t v = threadIdx.x + k * stride;
    if (v < vectors) store_floats<V>(dw_row + v * V, dw[k]);
  }
}

struct RowLayout {
  int vector;           // elements per access
  int threads_per_row;  // a power of two; above a warp, a multiple of the warp width
  int rows_per_block;
};

// Enough threads per row that each holds at most `cached` vectors, within the limit. Short
// rows (QK-norm over a head of 128) take part of a warp, at least 4 threads, so that lanes
// do not idle; several rows then share a warp.
RowLayout row_layout(int64_t cols, int vector, int warp_size, int max_threads, int cached) {
  const int64_t wanted = ceil_div(ceil_div(cols, int64_t(vector)), int64_t(cached));
  int threads = std::min(kMinRowThreads, warp_size);
  while (threads < wanted && threads < max_threads) threads *= 2;
  return {vector, threads, std::max(1, kTargetBlockThreads / threads)};
}

// 16-byte vectors when every row start is 16-byte aligned (a weight's stride is 0), else
// single elements.
template <typename T>
int vector_width(int64_t cols, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  constexpr int width = kVectorBytes / int(sizeof(T));
  if (cols % width != 0) return 1;
  for (const auto& [pointer, stride] : rows) {
    if (!allows_vectors(pointer, {stride}, width)) return 1;
  }
  return width;
}

void check_rows(int64_t rows, int64_t cols) {
  require(rows >= 0, "x", "negative row count " + std::to_string(rows));
  require(cols > 0, "x", "the normalised dimension must be non-empty");
}

}  // namespace

int rms_norm_forward(uintptr_t x, int64_t x_stride, uintptr_t residual, int64_t residual_stride,
                     uintptr_t weight, uintptr_t y, int64_t y_stride, uintptr_t h,
                     int64_t h_stride, uintptr_t rstd, int64_t rows, int64_t cols, float eps,
                     bool zero_centered_weight, int dtype, int weight_dtype, int device,
                     uintptr_t stream) {
  check_rows(rows, cols);
  require(rows == 0 || (x != 0 && y != 0 && rstd != 0), "x", "null data pointer");
  require(residual == 0 || h != 0, "h", "a residual needs an h output");
  require(weight != 0 || !zero_centered_weight, "zero_centered_weight",
          "needs a weight");
  int width = 1;
  dispatch_dtype(dtype, "dtype", [&](auto t) {
    using T = decltype(t);
    const auto run = [&](auto w) {
      using W = decltype(w);
      ForwardParams<T, W> p{reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(residual),
                            reinterpret_cast<const W*>(weight), reinterpret_cast<T*>(y),
                            reinterpret_cast<T*>(h), reinterpret_cast<float*>(rstd),
                            x_stride, residual_stride, y_stride, h_stride, rows, cols, eps,
                            zero_centered_weight};
      width = vector_width<T>(cols, {{p.x, x_stride}, {p.residual, residual_stride},
                                     {p.y, y_stride}, {p.h, h_stride}, {p.weight, 0}});
      if (rows == 0) return;
      DeviceGuard guard(device);
      const RowLayout layout = row_layout(cols, width, device_warp_size(device), kMaxBlockThreads,
                                             kForwardCachedVectors);
      const dim3 block(layout.threads_per_row, layout.rows_per_block);
      const int64_t blocks = ceil_div(rows, int64_t(layout.rows_per_block));
      require(blocks <= kMaxGridX, "x", "too many rows: " + std::to_string(rows));
      const dim3 grid = dim3(unsigned(blocks));
      if (width == 1) {
        launch("rms_norm_forward", rms_norm_forward_kernel<T, W, 1>, grid, block, stream, p);
      } else {
        launch("rms_norm_forward", rms_norm_forward_kernel<T, W, kVectorBytes / sizeof(T)>, grid,
               block, stream, p);
      }
    };
    dispatch_same_or_float<T>(weight_dtype, dtype, weight != 0, "weight", run);
  });
  return width;
}

int64_t rms_norm_backward_partials(int64_t rows, int64_t cols, int dtype, int device) {
  check_rows(rows, cols);
  dispatch_dtype(dtype, "dtype", [](auto) {});
  const int64_t element_bytes = static_cast<DType>(dtype) == DType::kFloat32 ? 4 : 2;
  // The layout of the widest case; the narrow (unaligned) one uses the same partial count.
  const RowLayout layout = row_layout(cols, int(kVectorBytes / element_bytes),
                                      device_warp_size(device), kMaxBackwardThreads,
                                      kBackwardCachedVectors);
  const int64_t blocks = 4 * int64_t(device_multiprocessors(device));
  return std::max<int64_t>(1, std::min(ceil_div(rows, kMinRowsPerPartial),
                                       blocks * layout.rows_per_block));
}

int rms_norm_backward(uintptr_t dy, int64_t dy_stride, uintptr_t dh_in, int64_t dh_in_stride,
                      uintptr_t h, int64_t h_stride, uintptr_t weight, uintptr_t rstd,
                      uintptr_t dx, int64_t dx_stride, uintptr_t dresidual,
                      int64_t dresidual_stride, uintptr_t dw_partials, int64_t partials,
                      int64_t rows, int64_t cols, bool zero_centered_weight, int dtype,
                      int weight_dtype, int device, uintptr_t stream) {
  check_rows(rows, cols);
  require(rows == 0 || (dy != 0 && h != 0 && dx != 0 && rstd != 0), "dy", "null data pointer");
  require(partials == rms_norm_backward_partials(rows, cols, dtype, device), "partials",
          "must be rms_norm_backward_partials(rows, cols, dtype, device)");
  require(weight == 0 || dw_partials != 0, "dw_partials", "a weight needs its partials");
  int width = 1;
  dispatch_dtype(dtype, "dtype", [&](auto t) {
    using T = decltype(t);
    const auto run = [&](auto w) {
      using W = decltype(w);
      BackwardParams<T, W> p{reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(dh_in),
                             reinterpret_cast<const T*>(h), reinterpret_cast<const W*>(weight),
                             reinterpret_cast<const float*>(rstd), reinterpret_cast<T*>(dx),
                             reinterpret_cast<T*>(dresidual),
                             reinterpret_cast<float*>(dw_partials), dy_stride, dh_in_stride,
                             h_stride, dx_stride, dresidual_stride, rows, cols, partials,
                             zero_centered_weight};
      width = vector_width<T>(cols, {{p.dy, dy_stride}, {p.dh_in, dh_in_stride}, {p.h, h_stride},
                                     {p.dx, dx_stride}, {p.dresidual, dresidual_stride},
                                     {p.dw_partials, cols}, {p.weight, 0}});
      if (rows == 0) return;
      DeviceGuard guard(device);
      const RowLayout layout =
          row_layout(cols, width, device_warp_size(device), kMaxBackwardThreads,
                     kBackwardCachedVectors);
      const dim3 block(layout.threads_per_row, layout.rows_per_block);
      const dim3 grid(unsigned(ceil_div(partials, int64_t(layout.rows_per_block))));
      if (width == 1) {
        launch("rms_norm_backward", rms_norm_backward_kernel<T, W, 1>, grid, block, stream, p);
      } else {
        launch("rms_norm_backward", rms_norm_backward_kernel<T, W, kVectorBytes / sizeof(T)>,
               grid, block, stream, p);
      }
    };
    dispatch_same_or_float<T>(weight_dtype, dtype, weight != 0, "weight", run);
  });
  return width;
}

}  // namespace eurocore
