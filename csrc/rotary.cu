// Rotary position embeddings for q and k in one launch, forward and backward.
//
// For each token at position p, each head of q and of k, and each frequency i < r/2 (r the
// rotary dims), with c = cos[p, i] and s = sin[p, i] read in fp32 (the semantics of
// eurocore.ops.apply_rotary):
//
//     rotate-half:  (x1, x2) = (x[i], x[i + r/2])      interleaved:  (x1, x2) = (x[2i], x[2i+1])
//     y1 = x1·c − x2·s,    y2 = x2·c + x1·s            (backward: s → −s)
//     y[d] = x[d] for d >= r                          (copied only when out of place)
//
// Token (outer, inner) takes row positions[outer, inner] of the table (int64, read through
// its strides: an expanded view has stride 0), or without positions its index along the
// sequence axis: inner when batch_first, else outer (the one form of positions
// eurocore.ops.rotary.normalize_positions gives; packed sequences come with positions). A
// position outside the table gives NaN (the op checks positions unless it runs inside a
// graph).
//
// Layout: a block is (x: pair groups, y: heads, z: tokens). A thread owns one group of V
// consecutive frequencies of one token, loads their cos/sin once and walks its heads of q,
// then of k (every blockDim.y-th head). Its V pairs are two vectors of V elements: (x[gV..], x[r/2 + gV..]) rotate-half,
// (x[2gV..], x[2gV + V..]) interleaved. Each thread writes exactly what it read, so rotating
// in place needs no barrier.
#include <algorithm>

#include "kernel_utils.h"
#include "launch.h"

namespace eurocore {
namespace {

constexpr int64_t kTargetBlockThreads = 256;
constexpr int64_t kMaxHeadThreads = 8;

struct TensorView {
  void* data;
  int64_t outer_stride, inner_stride, head_stride;
};

template <typename C>
struct Params {
  TensorView q, k, out_q, out_k;
  int64_t tokens, inner, q_heads, heads, head_dim, half;
  const C* cos;
  const C* sin;
  int64_t table_stride, table_positions;
  const int64_t* positions;  // (outer, inner) by the two strides below; null: the token index
  int64_t positions_stride_outer, positions_stride_inner;
  bool batch_first, interleaved, conjugate, copy_tail;
};

template <typename C>
EUROCORE_DEVICE int64_t position_of(const Params<C>& p, int64_t outer, int64_t inner) {
  if (p.positions == nullptr) return p.batch_first ? inner : outer;
  return p.positions[outer * p.positions_stride_outer + inner * p.positions_stride_inner];
}

template <typename T>
EUROCORE_DEVICE T* head_of(const TensorView& t, int64_t outer, int64_t inner, int64_t head) {
  return static_cast<T*>(t.data) + outer * t.outer_stride + inner * t.inner_stride +
         head * t.head_stride;
}

// Rotates the V pairs of group g of one head, from x to out (which may be x).
template <int V, typename T>
EUROCORE_DEVICE void rotate_group(const T* x, T* out, int64_t g, int64_t half, bool interleaved,
                                  const float (&c)[V], const float (&s)[V]) {
  const int64_t first = interleaved ? 2 * g * V : g * V;
  const int64_t second = interleaved ? first + V : half + g * V;
  float a[V], b[V];
  load_floats<V>(x + first, a);
  load_floats<V>(x + second, b);
  float ya[V], yb[V];
  if (interleaved) {
    // Pair j is elements (2j, 2j + 1) of the 2V elements a ++ b.
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float x1 = 2 * j < V ? a[2 * j] : b[2 * j - V];
      const float x2 = 2 * j + 1 < V ? a[2 * j + 1] : b[2 * j + 1 - V];
      const float y1 = x1 * c[j] - x2 * s[j];
      const float y2 = x2 * c[j] + x1 * s[j];
      if (2 * j < V) ya[2 * j] = y1; else yb[2 * j - V] = y1;
      if (2 * j + 1 < V) ya[2 * j + 1] = y2; else yb[2 * j + 1 - V] = y2;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ya[j] = a[j] * c[j] - b[j] * s[j];
      yb[j] = b[j] * c[j] + a[j] * s[j];
    }
  }
  store_floats<V>(out + first, ya);
  store_floats<V>(out + second, yb);
}

template <typename T, typename C, int V>
__global__ __launch_bounds__(kMaxBlockThreads) void rotary_kernel(Params<C> p) {
  const int64_t token = int64_t(blockIdx.x) * blockDim.z + threadIdx.z;
  if (token >= p.tokens) return;  // no barriers in this kernel
  const int64_t outer = token / p.inner;
  const int64_t inner = token % p.inner;
  const int64_t position = position_of(p, outer, inner);
  const bool in_table = position >= 0 && position < p.table_positions;
  const C* cos_row = p.cos + (in_table ? position * p.table_stride : 0);
  const C* sin_row = p.sin + (in_table ? position * p.table_stride : 0);

  const int64_t groups = p.half / V;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    float c[V], s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      c[j] = in_table ? to_float(cos_row[g * V + j]) : NAN;
      s[j] = in_table ? to_float(sin_row[g * V + j]) : 0.0f;
      if (p.conjugate) s[j] = -s[j];
    }
    for (int64_t head = threadIdx.y; head < p.heads; head += blockDim.y) {
      const bool is_q = head < p.q_heads;
      const TensorView& in = is_q ? p.q : p.k;
      const TensorView& out = is_q ? p.out_q : p.out_k;
      const int64_t h = is_q ? head : head - p.q_heads;
      rotate_group<V>(head_of<const T>(in, outer, inner, h), head_of<T>(out, outer, inner, h), g,
                      p.half, p.interleaved, c, s);
    }
  }
  if (!p.copy_tail) return;
  const int64_t tail_vectors = (p.head_dim - 2 * p.half) / V;
  for (int64_t t = threadIdx.x; t < tail_vectors; t += blockDim.x) {
    const int64_t col = 2 * p.half + t * V;
    for (int64_t head = threadIdx.y; head < p.heads; head += blockDim.y) {
      const bool is_q = head < p.q_heads;
      const int64_t h = is_q ? head : head - p.q_heads;
      const T* src = head_of<const T>(is_q ? p.q : p.k, outer, inner, h) + col;
      T* dst = head_of<T>(is_q ? p.out_q : p.out_k, outer, inner, h) + col;
      store_vector<V>(dst, load_vector<V>(src));
    }
  }
}

TensorView view(uintptr_t data, const std::array<int64_t, 3>& strides) {
  return {reinterpret_cast<void*>(data), strides[0], strides[1], strides[2]};
}

// 16-byte vectors when groups, tail, strides and pointers all allow them; else 1 element.
template <typename T>
int vector_width(int64_t half, int64_t head_dim, bool copy_tail,
                 std::initializer_list<const TensorView*> tensors) {
  constexpr int width = kVectorBytes / int(sizeof(T));
  if (half % width != 0 || (copy_tail && head_dim % width != 0)) return 1;
  for (const TensorView* t : tensors) {
    if (!allows_vectors(t->data, {t->outer_stride, t->inner_stride, t->head_stride}, width)) {
      return 1;
    }
  }
  return width;
}

}  // namespace

int rotary(uintptr_t q, std::array<int64_t, 3> q_strides, uintptr_t k,
           std::array<int64_t, 3> k_strides, uintptr_t out_q, std::array<int64_t, 3> out_q_strides,
           uintptr_t out_k, std::array<int64_t, 3> out_k_strides, int64_t outer, int64_t inner,
           int64_t q_heads, int64_t k_heads, int64_t head_dim, uintptr_t cos, uintptr_t sin,
           int64_t table_stride, int64_t half, int64_t table_positions, int table_dtype,
           uintptr_t positions, int64_t positions_stride_outer, int64_t positions_stride_inner,
           bool batch_first, bool interleaved, bool conjugate, bool copy_tail, int dtype,
           int device, uintptr_t stream) {
  require(outer >= 0 && inner >= 0 && q_heads >= 0 && k_heads >= 0, "q", "negative size");
  const bool empty = outer * inner == 0;  // empty tensors may have null data pointers
  require(empty || q_heads == 0 || (q != 0 && out_q != 0), "q", "null data pointer");
  require(empty || k_heads == 0 || (k != 0 && out_k != 0), "k", "null data pointer");
  require(half > 0 && 2 * half <= head_dim, "cos",
          "rotates 2 * " + std::to_string(half) + " dims of head_dim " +
              std::to_string(head_dim));
  require(empty || (cos != 0 && sin != 0), "cos", "null data pointer");
  int width = 1;
  dispatch_dtype(dtype, "dtype", [&](auto t) {
    using T = decltype(t);
    const auto run = [&](auto table_type) {
      using C = decltype(table_type);
      Params<C> p{view(q, q_strides), view(k, k_strides), view(out_q, out_q_strides),
                  view(out_k, out_k_strides), outer * inner, inner, q_heads, q_heads + k_heads,
                  head_dim, half, reinterpret_cast<const C*>(cos),
                  reinterpret_cast<const C*>(sin), table_stride, table_positions,
                  reinterpret_cast<const int64_t*>(positions), positions_stride_outer,
                  positions_stride_inner, batch_first, interleaved, conjugate, copy_tail};
      width = vector_width<T>(half, head_dim, copy_tail, {&p.q, &p.k, &p.out_q, &p.out_k});
      if (p.tokens == 0 || p.heads == 0) return;
      DeviceGuard guard(device);
      // x: the pair groups; y: up to 8 heads (a power of two), each thread walking every
      // 8th head of q then k with the same cos/sin; z: tokens, filling the block to 256
      // threads (at most 64: NVIDIA's limit on z).
      const int64_t groups = half / width;
      const int64_t threads_x = std::min<int64_t>(groups, kTargetBlockThreads);
      int64_t threads_y = 1;
      while (threads_y < p.heads && threads_y < kMaxHeadThreads &&
             threads_x * threads_y * 2 <= kTargetBlockThreads) {
        threads_y *= 2;
      }
      const int64_t fill = std::max<int64_t>(1, kTargetBlockThreads / (threads_x * threads_y));
      const int64_t threads_z = std::min({p.tokens, kMaxBlockZ, fill});
      const dim3 block = dim3(unsigned(threads_x), unsigned(threads_y), unsigned(threads_z));
      const int64_t blocks = ceil_div(p.tokens, threads_z);
      require(blocks <= kMaxGridX, "q", "too many tokens: " + std::to_string(p.tokens));
      const dim3 grid = dim3(unsigned(blocks));
      if (width == 1) {
        launch("rotary", rotary_kernel<T, C, 1>, grid, block, stream, p);
      } else {
        launch("rotary", rotary_kernel<T, C, kVectorBytes / sizeof(T)>, grid, block, stream, p);
      }
    };
    dispatch_same_or_float<T>(table_dtype, dtype, true, "cos", run);
  });
  return width;
}

}  // namespace eurocore
