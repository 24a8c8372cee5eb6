// A CPU emulator for the kernels, so that the very sources nvcc and hipcc compile run in
// tests on machines without a GPU (as Triton's interpreter does for Triton kernels).
//
// A launch runs its blocks one after another. Inside a block every GPU thread is a fiber
// (ucontext) with its own stack, all on one OS thread: a fiber runs until it reaches a
// barrier or returns, and after each block barrier the warps run one at a time, each as far
// as it can, in a pseudo-random order. A warp shuffle waits for the thread's
// warp only; __syncthreads for the whole block. Shared memory (`__shared__`, a
// function-local static here) is shared by one block's threads and reused by the next
// block, as on a GPU. Reported as errors: threads that return or wait at a shuffle while
// others wait at __syncthreads (undefined behaviour on a GPU), misaligned vector accesses,
// and launches beyond the GPUs' limits.
//
// The warp width is a run-time setting (32 or 64), so one build checks the kernels'
// reductions for NVIDIA's and AMD's widths alike. Not modelled: concurrency between blocks
// (they run one after another), memory ordering, FMA contraction, the performance of
// anything.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables of the running GPU thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using gpuStream_t = void*;
using gpuError_t = int;
constexpr gpuError_t gpuSuccess = 0;

namespace eurocore::emulation {

inline int warp_size = 32;

enum class FiberState { kRunning, kAtSyncthreads, kAtShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 thread;
  FiberState state;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<float> exchange;  // one slot per thread, for shuffles
  std::string error;            // set by a thread that broke a rule; the launch throws it
};

inline Block& block() {
  static Block state;
  return state;
}

inline void fiber_main() {
  Block& b = block();
  (*b.body)();
  b.current->state = FiberState::kDone;
  // Returning resumes uc_link: the scheduler.
}

inline void wait_at(FiberState barrier) {
  Block& b = block();
  Fiber* self = b.current;
  self->state = barrier;
  swapcontext(&self->context, &b.scheduler);
}

inline void syncthreads() { wait_at(FiberState::kAtSyncthreads); }

// Ends the calling thread and makes the launch throw: exceptions cannot cross fibers.
inline void fail(const std::string& message) {
  Block& b = block();
  if (b.error.empty()) b.error = message;
  b.current->state = FiberState::kDone;
  swapcontext(&b.current->context, &b.scheduler);  // never resumed
}

inline unsigned linear_thread() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

// A vector access must be aligned to its size (up to 16 bytes), as GPUs require.
inline void check_aligned(const void* pointer, size_t alignment) {
  if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0) {
    fail("vector access at " + std::to_string(reinterpret_cast<uintptr_t>(pointer)) +
         " is not aligned to " + std::to_string(alignment) + " bytes");
  }
}

// Every thread of the warp must call this; it checks that the partner lane lies in the
// caller's warp.
inline float shuffle_xor(float value, int lane_mask) {
  Block& b = block();
  const unsigned self = linear_thread();
  const unsigned partner = self ^ unsigned(lane_mask);
  if (lane_mask <= 0 || lane_mask >= warp_size || partner >= b.fibers.size()) {
    fail("shuffle_xor: lane mask " + std::to_string(lane_mask) + " leaves the warp");
  }
  b.exchange[self] = value;
  wait_at(FiberState::kAtShuffle);
  const float result = b.exchange[partner];
  wait_at(FiberState::kAtShuffle);  // nobody overwrites a slot before its partner read it
  return result;
}

// Releases the warp of `thread` if all of its threads now wait at a shuffle.
inline void release_warp_if_complete(Block& b, unsigned thread, std::vector<unsigned>& runnable) {
  const unsigned width = unsigned(warp_size);
  const unsigned first = thread / width * width;
  const unsigned end = std::min<unsigned>(first + width, unsigned(b.fibers.size()));
  for (unsigned t = first; t < end; ++t) {
    if (b.fibers[t].state != FiberState::kAtShuffle) return;
  }
  for (unsigned t = first; t < end; ++t) {
    b.fibers[t].state = FiberState::kRunning;
    runnable.push_back(t);
  }
}

// Pushes every thread of the block, warp by warp in a pseudo-random order of warps.
inline void push_all_warps(unsigned threads, uint64_t& random, std::vector<unsigned>& runnable) {
  const unsigned width = unsigned(warp_size);
  std::vector<unsigned> warps;
  for (unsigned w = 0; w * width < threads; ++w) warps.push_back(w);
  for (size_t i = warps.size(); i > 1; --i) {  // Fisher-Yates with xorshift
    random ^= random << 13;
    random ^= random >> 7;
    random ^= random << 17;
    std::swap(warps[i - 1], warps[size_t(random % i)]);
  }
  for (unsigned w : warps) {
    for (unsigned t = std::min(threads, (w + 1) * width); t-- > w * width;) runnable.push_back(t);
  }
}

// Runs one block: every thread to completion. After each block barrier the warps start in a
// pseudo-random order, and each runs as far as it can (a warp released from a shuffle goes
// on at once) before the next starts: the widest drift between warps a GPU may show, so a
// missing __syncthreads shows as a wrong result instead of being hidden by lock-step.
inline void run_block(const std::function<void()>& body, dim3 block_index, dim3 block_dim) {
  Block& b = block();
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (b.fibers.size() != threads) {
    b.fibers.clear();
    b.fibers.resize(threads);
    for (Fiber& f : b.fibers) f.stack.reset(new char[kStackBytes]);
    b.exchange.assign(threads, 0.0f);
  }
  b.body = &body;
  b.error.clear();
  blockIdx = block_index;
  blockDim = block_dim;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.thread = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y,
                    t / (block_dim.x * block_dim.y));
    f.state = FiberState::kRunning;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  // Seeded by the block: runs are reproducible.
  uint64_t random = 0x9e3779b97f4a7c15ull ^ (uint64_t(block_index.x) << 32) ^ block_index.y ^
                    (uint64_t(block_index.z) << 16);
  std::vector<unsigned> runnable;  // a stack: the warp on top runs on
  push_all_warps(threads, random, runnable);
  for (;;) {
    while (!runnable.empty()) {
      const unsigned t = runnable.back();
      runnable.pop_back();
      Fiber& f = b.fibers[t];
      b.current = &f;
      threadIdx = f.thread;
      swapcontext(&b.scheduler, &f.context);
      if (!b.error.empty()) throw std::logic_error("emulated kernel: " + b.error);
      if (f.state == FiberState::kAtShuffle) release_warp_if_complete(b, t, runnable);
    }
    unsigned done = 0, at_sync = 0, at_shuffle = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == FiberState::kDone;
      at_sync += f.state == FiberState::kAtSyncthreads;
      at_shuffle += f.state == FiberState::kAtShuffle;
    }
    if (done == threads) return;
    if (at_sync != threads) {  // some returned, or a warp is stuck at a shuffle
      throw std::logic_error(
          "emulated block: threads diverged at a barrier (" + std::to_string(done) +
          " returned, " + std::to_string(at_sync) + " at __syncthreads, " +
          std::to_string(at_shuffle) + " at a shuffle, of " + std::to_string(threads) + ")");
    }
    for (Fiber& f : b.fibers) f.state = FiberState::kRunning;
    push_all_warps(threads, random, runnable);
  }
}

// kernel<<<grid, block>>>(args...): the blocks in order, x fastest. Launch limits are those
// every target GPU enforces (NVIDIA's are the tighter: z at most 64 threads).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block_dim, Args... args) {
  const auto check = [](bool ok, const std::string& what) {
    if (!ok) throw std::logic_error("emulated launch: " + what);
  };
  check(block_dim.x * block_dim.y * block_dim.z <= 1024, "more than 1024 threads per block");
  check(block_dim.x >= 1 && block_dim.y >= 1 && block_dim.z >= 1, "an empty block dimension");
  check(block_dim.x <= 1024 && block_dim.y <= 1024, "block x or y above 1024");
  check(block_dim.z <= 64, "block z above 64 (NVIDIA's limit)");
  check(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "an empty grid dimension");
  check(grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535, "grid above the limits");
  gridDim = grid;
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(body, dim3(x, y, z), block_dim);
}

// IEEE binary16 conversions, round to nearest even (what a GPU's cvt.rn does).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const int exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(float(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(float(mantissa | 0x400u), exponent - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  bits |= sign;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint16_t float_to_half_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return uint16_t(sign | 0x7e00u);
  if (magnitude >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds past the largest half
  if (magnitude < std::ldexp(1.0f, -14)) {
    // Subnormal: an integer count of 2^-24, rounded to nearest even by nearbyint.
    return uint16_t(sign | uint16_t(std::nearbyint(std::ldexp(magnitude, 24))));
  }
  int exponent;
  std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent, m in [0.5, 1)
  // 11 significant bits: scale to an integer in [1024, 2048), round to nearest even.
  uint32_t significand = uint32_t(std::nearbyint(std::ldexp(magnitude, 11 - exponent)));
  int biased = exponent - 1 + 15;
  if (significand == 2048u) {  // rounding carried into the next binade
    significand = 1024u;
    biased += 1;
  }
  if (biased >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | uint16_t(biased << 10) | uint16_t(significand & 0x3ffu));
}

}  // namespace eurocore::emulation

inline void __syncthreads() { eurocore::emulation::syncthreads(); }
