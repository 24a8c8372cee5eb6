// A CPU emulator for the kernels, so that the very sources nvcc and hipcc compile run in
// tests on machines without a GPU (as Triton's interpreter does for Triton kernels).
//
// A launch runs its blocks one after another. Inside a block every GPU thread is a fiber
// (ucontext) with its own stack, all on one OS thread: a fiber runs until it reaches a
// barrier (__syncthreads, or a warp shuffle, which is a barrier here) or returns; when every
// fiber waits at the same kind of barrier they all resume. Shared memory (`__shared__`, a
// function-local static here) is therefore shared by one block's threads and reused by the
// next block, as on a GPU. Threads that return while others wait at a barrier are reported
// as an error: on a GPU that is undefined behaviour.
//
// The warp width is a run-time setting (32 or 64), so one build checks the kernels'
// reductions for NVIDIA's and AMD's widths alike. Not modelled: concurrency between blocks,
// memory ordering, the performance of anything.
#pragma once

#include <ucontext.h>

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

// Every thread of the block must call this (the kernels only shuffle in block-uniform code);
// it checks that the partner lane lies in the caller's warp.
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

// Runs one block: every thread to completion, releasing barriers as they fill.
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
  for (;;) {
    for (Fiber& f : b.fibers) {
      if (f.state != FiberState::kRunning) continue;
      b.current = &f;
      threadIdx = f.thread;
      swapcontext(&b.scheduler, &f.context);
    }
    if (!b.error.empty()) throw std::logic_error("emulated kernel: " + b.error);
    unsigned done = 0, at_sync = 0, at_shuffle = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == FiberState::kDone;
      at_sync += f.state == FiberState::kAtSyncthreads;
      at_shuffle += f.state == FiberState::kAtShuffle;
    }
    if (done == threads) return;
    if (at_sync != threads && at_shuffle != threads) {
      throw std::logic_error(
          "emulated block: threads diverged at a barrier (" + std::to_string(done) +
          " returned, " + std::to_string(at_sync) + " at __syncthreads, " +
          std::to_string(at_shuffle) + " at a shuffle, of " + std::to_string(threads) + ")");
    }
    for (Fiber& f : b.fibers) f.state = FiberState::kRunning;
  }
}

// kernel<<<grid, block>>>(args...): the blocks in order, x fastest.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block_dim, Args... args) {
  if (block_dim.x * block_dim.y * block_dim.z > 1024) {
    throw std::logic_error("emulated launch: more than 1024 threads per block");
  }
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
