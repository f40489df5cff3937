// Device helpers shared by the memory3 CUDA kernels: element conversions, 16-byte vector
// loads, cp.async, warp reductions and the device-side range-error word (params.h explains
// the plan: a bad id or length is recorded here, never dereferenced). Torch-free.
//
// M3_EMULATE_CUDA (csrc/cuda/nvcc_check/cuda_emulation.h) compiles the kernels with the host
// compiler and runs each block as threads on the CPU: the few device-only steps below have a
// host form under it. Real builds never define it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#define M3_HD __host__ __device__ __forceinline__
#define M3_DEV __device__ __forceinline__

// Shared memory: the dynamic buffer of a kernel, and a static array shared by the block.
#ifndef M3_EMULATE_CUDA
#define M3_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define M3_SHARED __shared__
#endif

namespace memory3::cuda {

// ---------------------------------------------------------------- element conversions

// Loads to the accumulator type. int8 is a code (the caller multiplies by its scale).
template <typename Acc> M3_DEV Acc to_acc(float x) { return Acc(x); }
template <typename Acc> M3_DEV Acc to_acc(double x) { return Acc(x); }
template <typename Acc> M3_DEV Acc to_acc(__nv_bfloat16 x) { return Acc(__bfloat162float(x)); }
template <typename Acc> M3_DEV Acc to_acc(__half x) { return Acc(__half2float(x)); }
template <typename Acc> M3_DEV Acc to_acc(int8_t x) { return Acc(x); }

// Round-to-nearest-even stores; a double goes to bf16/fp16 through float, as the reference's
// x.to(float).to(dtype) does.
template <typename Out> M3_DEV Out from_acc(float x) {
  if constexpr (std::is_same_v<Out, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else if constexpr (std::is_same_v<Out, __half>) return __float2half_rn(x);
  else return Out(x);
}
template <typename Out> M3_DEV Out from_acc(double x) {
  if constexpr (std::is_same_v<Out, double>) return x;
  else return from_acc<Out>(float(x));
}

// ---------------------------------------------------------------- vector memory access

// n elements of E moved as one access of n * sizeof(E) bytes (2..16, a power of two): the
// caller guarantees the alignment.
template <int kBytes> struct VecWord;
template <> struct VecWord<1> { using type = uint8_t; };
template <> struct VecWord<2> { using type = uint16_t; };
template <> struct VecWord<4> { using type = uint32_t; };
template <> struct VecWord<8> { using type = uint2; };
template <> struct VecWord<16> { using type = uint4; };

template <typename E, int n>
M3_DEV void load_vec(E (&dst)[n], const E* src) {
  using W = typename VecWord<n * sizeof(E)>::type;
  const W w = *reinterpret_cast<const W*>(src);
  memcpy(dst, &w, sizeof(W));
}
template <typename E, int n>
M3_DEV void store_vec(E* dst, const E (&src)[n]) {
  if constexpr (n * sizeof(E) <= 16) {
    using W = typename VecWord<n * sizeof(E)>::type;
    W w;
    memcpy(&w, src, sizeof(W));
    *reinterpret_cast<W*>(dst) = w;
  } else {  // wider than one access: 16-byte pieces
    constexpr int kPer = 16 / sizeof(E);
#pragma unroll
    for (int i = 0; i < n; i += kPer) {
      uint4 w;
      memcpy(&w, src + i, 16);
      *reinterpret_cast<uint4*>(dst + i) = w;
    }
  }
}

// cp.async of 16 bytes, global -> shared, bypassing L1; valid = false writes 16 zero bytes
// and reads nothing (src must still be a mapped address).
#ifndef M3_EMULATE_CUDA
M3_DEV void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
}
M3_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
M3_DEV void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
#else  // the host form: a synchronous copy
M3_DEV void cp_async16(void* smem, const void* gmem, bool valid) {
  if (valid) memcpy(smem, gmem, 16);
  else memset(smem, 0, 16);
}
M3_DEV void cp_async_commit() {}
template <int kPending>
M3_DEV void cp_async_wait() {}
#endif

// ---------------------------------------------------------------- warp reductions

template <typename Acc>
M3_DEV Acc warp_max(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename Acc>
M3_DEV Acc warp_sum(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ---------------------------------------------------------------- range errors

// What a kernel found outside its range; the launcher turns it into the CPU op's message.
enum RangeCode : int {
  kRangeNone = 0,
  kRangeMemIds = 1,     // memory_attention mem_ids: index = flat index, bound = N
  kRangeKvLens = 2,     // memory_attention kv_lens: index = b, bound = S
  kRangeChunks = 3,     // memory_attention: mem_ids too short for sequence index (value L, bound C, extra need)
  kRangeGatherIds = 4,  // gather_memory ids: index = flat index, bound = N
  kRangeDecodeIds = 5,  // dequantize_memory ids: index = flat index, bound = N
  kRangeVqHeader = 6,   // dequantize_memory vq: meta header row; index = column, value = its value (x 1)
};

// The device words: [0] = code << 56 | (flat index + 1), [1] value, [2] bound, [3] extra.
// Zero means no error. The first writer wins (atomicCAS); later offenders are dropped.
constexpr int kRangeWords = 4;

M3_DEV void record_range_error(int64_t* words, int code, int64_t index, int64_t value, int64_t bound,
                               int64_t extra = 0) {
  if (words == nullptr) return;
  const unsigned long long tag = (static_cast<unsigned long long>(code) << 56) | static_cast<unsigned long long>(index + 1);
  if (atomicCAS(reinterpret_cast<unsigned long long*>(words), 0ull, tag) == 0ull) {
    words[1] = value, words[2] = bound, words[3] = extra;
  }
}

// ---------------------------------------------------------------- sizes

M3_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
M3_HD constexpr int round_up16(int bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace memory3::cuda
