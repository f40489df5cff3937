// gather_memory on the GPU: rows of a bank by id into a dense tensor, converting or
// dequantizing (int8 x per-token scale) on the way. The bank may live in GPU memory or in
// pinned host memory, read in place through unified addressing (no staging copy). Torch-free;
// the launcher is csrc/cuda/gather_memory.cu, the instantiations csrc/cuda/gather_memory_kernels.cu.
//
// One block per (output row, side): its threads stream the row's Hkv * M * D elements in
// pieces of 16 bytes of the bank (kVec, when the host found every address and row 16-byte
// aligned) or element by element. Numerics follow the CPU kernel (memory3/gather.h): code *
// scale in float (double for a double output), one rounding to the output type.
#pragma once

#include <cstdint>
#include <type_traits>

#include "memory3/cuda_common.cuh"
#include "memory3/params.h"

namespace memory3::cuda {

constexpr int kGatherThreads = 256;

template <typename In, typename Out, bool kVec>
__global__ void __launch_bounds__(kGatherThreads) gather_memory_kernel(const GatherParams p, int64_t N) {
  using Acc = std::conditional_t<std::is_same_v<Out, double>, double, float>;
  constexpr int kV = kVec ? 16 / int(sizeof(In)) : 1;  // elements per piece
  const int64_t r = blockIdx.x / 2;
  const int side = int(blockIdx.x % 2);
  const BankRows& bank = side == 0 ? p.k : p.v;
  const int64_t row = p.vectors * p.D;
  Out* out = static_cast<Out*>(side == 0 ? p.out_k : p.out_v) + r * row;
  int64_t id = p.ids[r];
  if (id < -1 || id >= N) {
    if (threadIdx.x == 0 && side == 0) record_range_error(p.range_error, kRangeGatherIds, r, id, N);
    id = -1;  // never read: a zero row
  }
  const In* src = id >= 0 ? static_cast<const In*>(bank.data) + id * bank.stride_n : nullptr;
  const float* scale = id >= 0 && bank.scale ? bank.scale + id * bank.scale_stride_n : nullptr;
  for (int64_t e = int64_t(threadIdx.x) * kV; e < row; e += int64_t(kGatherThreads) * kV) {
    Out vals[kV];
    if (id < 0) {
#pragma unroll
      for (int i = 0; i < kV; ++i) vals[i] = from_acc<Out>(Acc(0));
    } else {
      In x[kV];
      if constexpr (kVec) load_vec<In, kV>(x, src + e);
      else x[0] = src[e];
      if constexpr (std::is_same_v<In, int8_t>) {
        const Acc s = Acc(scale[e / p.D]);  // a piece never straddles two vectors (D % kV == 0)
#pragma unroll
        for (int i = 0; i < kV; ++i) vals[i] = from_acc<Out>(to_acc<Acc>(x[i]) * s);
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          if constexpr (std::is_same_v<In, Out>) vals[i] = x[i];
          else vals[i] = from_acc<Out>(to_acc<Acc>(x[i]));
        }
      }
    }
    if constexpr (kVec) store_vec<Out, kV>(out + e, vals);
    else out[e] = vals[0];
  }
}

#ifndef M3_EMULATE_CUDA  // launches (the CPU emulation launches the kernels itself)
// Rows ids[0, R) of both sides on `stream`. kVec needs 16-byte aligned bank rows and pieces
// (host-checked). Instantiated per (In, Out) in csrc/cuda/gather_memory_kernels.cu.
template <typename In, typename Out>
cudaError_t run_gather_memory(const GatherParams& p, int64_t N, int64_t R, bool vec, cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  const unsigned blocks = unsigned(2 * R);
  if (vec) gather_memory_kernel<In, Out, true><<<blocks, kGatherThreads, 0, stream>>>(p, N);
  else gather_memory_kernel<In, Out, false><<<blocks, kGatherThreads, 0, stream>>>(p, N);
  return cudaGetLastError();
}

#endif

}  // namespace memory3::cuda

#define M3_GATHER_INSTANCE(PREFIX, IN, OUT)                                                              \
  PREFIX template cudaError_t memory3::cuda::run_gather_memory<IN, OUT>(const memory3::GatherParams&, int64_t, \
                                                                        int64_t, bool, cudaStream_t);
#define M3_GATHER_INSTANCES_FOR_OUT(PREFIX, OUT) \
  M3_GATHER_INSTANCE(PREFIX, float, OUT)         \
  M3_GATHER_INSTANCE(PREFIX, double, OUT)        \
  M3_GATHER_INSTANCE(PREFIX, __nv_bfloat16, OUT) \
  M3_GATHER_INSTANCE(PREFIX, __half, OUT)        \
  M3_GATHER_INSTANCE(PREFIX, int8_t, OUT)
