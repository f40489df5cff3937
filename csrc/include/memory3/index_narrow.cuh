// int64 ids / lengths narrowed to the kernels' int32 on the device, each checked against its
// range first (no host copy, graph-capturable): a value outside [lo, hi) is recorded as a
// range error with its exact int64 value and replaced by `bad` (a value the consuming kernel
// treats as empty and never dereferences). Torch-free; instantiated in csrc/cuda/index_narrow.cu.
#pragma once

#include <cstdint>

#include "memory3/cuda_common.cuh"

namespace memory3::cuda {

struct NarrowParams {
  const int64_t* in;  // [n] contiguous
  int32_t* out;       // [n] contiguous
  int64_t n, lo, hi;  // valid values: [lo, hi)
  int32_t bad;        // what an out-of-range value becomes
  int code;           // RangeCode to record; bound reported = hi - (code == kRangeKvLens)
  int64_t* range_error;
};

__global__ void narrow_index_kernel(const NarrowParams p);

cudaError_t run_narrow_index(const NarrowParams& p, cudaStream_t stream);

#ifdef M3_DEFINE_NARROW_INDEX
__global__ void narrow_index_kernel(const NarrowParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const int64_t x = p.in[i];
  if (x >= p.lo && x < p.hi) {
    p.out[i] = int32_t(x);
    return;
  }
  record_range_error(p.range_error, p.code, i, x, p.code == kRangeKvLens ? p.hi - 1 : p.hi);
  p.out[i] = p.bad;
}

cudaError_t run_narrow_index(const NarrowParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  narrow_index_kernel<<<unsigned(ceil_div(p.n, 256)), 256, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace memory3::cuda
