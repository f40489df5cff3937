// Runs memory3's CUDA kernels on the CPU, for checks on machines without a GPU
// (decode_emulator.cpp): include this before a kernel header and compile with the host
// compiler against CUDA's headers. Each block runs as blockDim.x std::threads sharing one
// dynamic shared-memory buffer (heap-allocated at its exact size, so AddressSanitizer sees
// overruns); __syncthreads is a barrier of the block, warp shuffles exchange through a
// per-warp buffer between two barriers of the warp, cp.async is a synchronous copy. Blocks
// run one after another. It checks indexing, layout and arithmetic, not timing, and races
// only where the emulated order exposes them (compute-sanitizer's racecheck does the rest).
#pragma once

#define M3_EMULATE_CUDA 1

#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace m3_emulation {

struct Block {
  explicit Block(int threads, size_t smem_bytes)
      : sync(threads), smem(new unsigned char[smem_bytes > 0 ? smem_bytes : 1]) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  uint64_t exchange[32][32];  // [warp][lane]
  std::unique_ptr<unsigned char[]> smem;
};

inline thread_local Block* block = nullptr;
inline std::mutex atomics;

// Runs kernel() for every thread of every block of the grid.
inline void launch(dim3 grid, dim3 threads, size_t smem_bytes, const std::function<void()>& kernel) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block blk(int(threads.x), smem_bytes);
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads.x; ++t)
        pool.emplace_back([&, t] {
          block = &blk;
          threadIdx = dim3(t, 0, 0), blockIdx = dim3(bx, by, 0), blockDim = threads, gridDim = grid;
          kernel();
        });
      for (auto& th : pool) th.join();
    }
}

template <typename T>
T exchange(T x, int src_of_lane(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= 8);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  memcpy(&bits, &x, sizeof(T));
  block->exchange[warp][lane] = bits;
  block->warps[warp]->arrive_and_wait();
  T y;
  memcpy(&y, &block->exchange[warp][src_of_lane(lane, arg)], sizeof(T));
  block->warps[warp]->arrive_and_wait();
  return y;
}

}  // namespace m3_emulation

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#define M3_DYNAMIC_SMEM(name) unsigned char* name = m3_emulation::block->smem.get()
#define M3_SHARED static

inline void __syncthreads() { m3_emulation::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { m3_emulation::block->warps[threadIdx.x >> 5]->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T x, int mask) {
  return m3_emulation::exchange(x, [](int lane, int m) { return lane ^ m; }, mask);
}
template <typename T>
T __shfl_down_sync(unsigned, T x, int delta) {
  return m3_emulation::exchange(x, [](int lane, int d) { return lane + d < 32 ? lane + d : lane; }, delta);
}

inline unsigned long long atomicCAS(unsigned long long* word, unsigned long long expected, unsigned long long desired) {
  std::lock_guard<std::mutex> lock(m3_emulation::atomics);
  const unsigned long long old = *word;
  if (old == expected) *word = desired;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
// IEEE-rounded arithmetic: the host's plain operations (no contraction across statements).
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return float(a); }
