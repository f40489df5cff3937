// Memory codecs on the GPU: quantize_memory / dequantize_memory for int8, int4 and pq.
// Torch-free; the launcher is csrc/cuda/codecs.cu, the instantiations
// csrc/cuda/quant_kernels.cu. The numerics are the CPU kernel's (memory3/quant.h), step by
// step, with IEEE-rounded intrinsics so --use_fast_math cannot change them: true divisions
// (__fdiv_rn), round half to even (rintf), int4's product through double and one rounding,
// so int8/int4 codes and decoded values are bit-identical to the reference. pq codes may
// differ only between centroids at (near-)equal distance (the CPU's rule too).
#pragma once

#include <cstdint>
#include <type_traits>

#include "memory3/cuda_common.cuh"
#include "memory3/params.h"

namespace memory3::cuda {

constexpr int kQuantThreads = 128;
constexpr int kQuantWarps = kQuantThreads / 32;
constexpr int kDecodePiece = 8;  // outputs per thread step of the 8-wide dequantize path

template <typename Acc>
M3_DEV Acc warp_min(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// ---------------------------------------------------------------- quantize

// int8: one warp per vector; scale = max|x| / 127, code = round(x / scale).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_int8_kernel(const QuantizeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (r >= p.N * p.Hkv * p.M) return;  // whole warps
  const T* x = static_cast<const T*>(p.x) + r * p.D;
  float amax = 0.0f;
  for (int d = lane; d < p.D; d += 32) amax = fmaxf(amax, fabsf(to_acc<float>(x[d])));
  amax = warp_max(amax);
  const float s = __fdiv_rn(amax, 127.0f);
  if (lane == 0) p.meta[r] = s;
  int8_t* codes = static_cast<int8_t*>(p.codes) + r * p.D;
  for (int d = lane; d < p.D; d += 32) {
    const float q = s > 0.0f ? rintf(__fdiv_rn(to_acc<float>(x[d]), s)) : 0.0f;
    codes[d] = int8_t(fminf(127.0f, fmaxf(-127.0f, q)));
  }
}

// int4: one warp per vector, one lane per value of a group of 32 (the last may be shorter;
// D is even, so a byte never straddles groups): zero = min, scale = (max - min) / 15.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quantize_int4_kernel(const QuantizeParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kQuantWarps + (threadIdx.x >> 5);
  if (r >= p.N * p.Hkv * p.M) return;
  const T* x = static_cast<const T*>(p.x) + r * p.D;
  const int groups = (p.D + kInt4Group - 1) / kInt4Group;
  uint8_t* packed = static_cast<uint8_t*>(p.codes) + r * (p.D / 2);
  float* meta = p.meta + r * groups * 2;
  for (int g0 = 0; g0 < p.D; g0 += kInt4Group) {
    const int n = min(kInt4Group, p.D - g0);
    const bool have = lane < n;
    const float v = have ? to_acc<float>(x[g0 + lane]) : 0.0f;
    const float mn = warp_min(have ? v : INFINITY), mx = warp_max(have ? v : -INFINITY);
    const float s = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
    const float c = s > 0.0f ? rintf(__fdiv_rn(__fsub_rn(v, mn), s)) : 0.0f;
    const int q = int(fminf(15.0f, fmaxf(0.0f, c)));
    const int next = __shfl_down_sync(0xffffffffu, q, 1);
    if (have && lane % 2 == 0) packed[g0 / 2 + lane / 2] = uint8_t(q | (next << 4));
    if (lane == 0) meta[2 * (g0 / kInt4Group)] = s, meta[2 * (g0 / kInt4Group) + 1] = mn;
  }
}

// pq: one thread per (vector, sub-space); block (vectors of one head, blockIdx.y = head *
// nsub + sub-space). The nearest of 256 centroids, the first on ties (strictly closer wins).
// kDsub > 0 keeps the sub-vector in registers.
template <typename T, int kDsub>
__global__ void __launch_bounds__(kQuantThreads) quantize_pq_kernel(const QuantizeParams p) {
  const int dsub = kDsub > 0 ? kDsub : p.dsub;
  const int nsub = p.D / dsub;
  const int h = int(blockIdx.y) / nsub, s = int(blockIdx.y) % nsub;
  const int64_t i = int64_t(blockIdx.x) * kQuantThreads + threadIdx.x;  // vector of head h
  if (i >= p.N * p.M) return;
  const int64_t r = (i / p.M * p.Hkv + h) * p.M + i % p.M;
  const T* x = static_cast<const T*>(p.x) + r * p.D + s * dsub;
  const float* cb = p.codebook + (int64_t(h) * nsub + s) * kPqCentroids * dsub;
  float best = INFINITY;
  int best_k = 0;
  if constexpr (kDsub > 0) {
    float xs[kDsub];
#pragma unroll
    for (int d = 0; d < kDsub; ++d) xs[d] = to_acc<float>(x[d]);
    for (int k = 0; k < kPqCentroids; ++k) {
      float dist = 0.0f;
#pragma unroll
      for (int d = 0; d < kDsub; ++d) {
        const float e = xs[d] - cb[k * kDsub + d];
        dist += e * e;
      }
      if (dist < best) best = dist, best_k = k;
    }
  } else {
    for (int k = 0; k < kPqCentroids; ++k) {
      float dist = 0.0f;
      for (int d = 0; d < dsub; ++d) {
        const float e = to_acc<float>(x[d]) - cb[k * dsub + d];
        dist += e * e;
      }
      if (dist < best) best = dist, best_k = k;
    }
  }
  static_cast<uint8_t*>(p.codes)[r * nsub + s] = uint8_t(best_k);
}

// ---------------------------------------------------------------- dequantize

// One block per output row (a memory: Hkv * M vectors of D); ids[r] (or r) picks the
// memory, -1 gives zeros, an id outside [-1, N) is recorded and gives zeros. kP outputs per
// step: 8 (D % 8 == 0 and 16-byte aligned codes rows, host-checked) or 1.
template <Codec kCodec, typename Out, int kP>
__global__ void __launch_bounds__(kQuantThreads) dequantize_kernel(const DequantizeParams p, int64_t N) {
  const int64_t r = blockIdx.x;
  int64_t id = p.ids ? p.ids[r] : r;
  if (id < -1 || id >= N) {
    if (threadIdx.x == 0) record_range_error(p.range_error, kRangeDecodeIds, r, id, N);
    id = -1;
  }
  const int D = p.D;
  const int64_t row = p.Hkv * p.M * D;
  Out* out = static_cast<Out*>(p.out) + r * row;
  const int groups = (D + kInt4Group - 1) / kInt4Group;
  const int nsub = kCodec == Codec::pq ? D / p.dsub : 1;
  for (int64_t e = int64_t(threadIdx.x) * kP; e < row; e += int64_t(kQuantThreads) * kP) {
    Out vals[kP];
    if (id < 0) {
#pragma unroll
      for (int i = 0; i < kP; ++i) vals[i] = from_acc<Out>(0.0f);
    } else {
      const int64_t t = e / D;  // vector within the memory; a step never straddles two
      const int d = int(e % D);
      const uint8_t* codes = static_cast<const uint8_t*>(p.codes) + id * p.codes_stride_n;
      if constexpr (kCodec == Codec::int8) {
        const float s = p.meta[id * p.meta_stride_n + t];
        int8_t c[kP];
        if constexpr (kP > 1) load_vec<int8_t, kP>(c, reinterpret_cast<const int8_t*>(codes) + t * D + d);
        else c[0] = reinterpret_cast<const int8_t*>(codes)[t * D + d];
#pragma unroll
        for (int i = 0; i < kP; ++i) vals[i] = from_acc<Out>(__fmul_rn(float(c[i]), s));
      } else if constexpr (kCodec == Codec::int4) {
        const float* meta = p.meta + id * p.meta_stride_n + t * groups * 2;
        const uint8_t* packed = codes + t * (D / 2);
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          const int dd = d + i, byte = packed[dd / 2];
          const int code = dd % 2 ? byte >> 4 : byte & 15;
          const int g = dd / kInt4Group;
          // code * scale through double (exact) and one rounding, then + zero: the reference's steps
          vals[i] = from_acc<Out>(
              __fadd_rn(__double2float_rn(__dmul_rn(double(code), double(meta[2 * g]))), meta[2 * g + 1]));
        }
      } else {
        const Out* cb = static_cast<const Out*>(p.codebook) + (t / p.M) * int64_t(nsub) * kPqCentroids * p.dsub;
        const uint8_t* c = codes + t * nsub;
#pragma unroll
        for (int i = 0; i < kP; ++i) {
          const int dd = d + i, s = dd / p.dsub;
          vals[i] = cb[(int64_t(s) * kPqCentroids + c[s]) * p.dsub + dd % p.dsub];
        }
      }
    }
    if constexpr (kP > 1) store_vec<Out, kP>(out + e, vals);
    else out[e] = vals[0];
  }
}

#ifndef M3_EMULATE_CUDA  // launches (the CPU emulation launches the kernels itself)
// ---------------------------------------------------------------- host entry points

// Instantiated per input dtype in csrc/cuda/quant_kernels.cu. R = N * Hkv * M vectors.
template <typename T>
cudaError_t run_quantize_memory(Codec codec, const QuantizeParams& p, cudaStream_t stream) {
  const int64_t R = p.N * p.Hkv * p.M;
  if (R == 0) return cudaSuccess;
  if (codec == Codec::int8) {
    quantize_int8_kernel<T><<<unsigned(ceil_div(R, kQuantWarps)), kQuantThreads, 0, stream>>>(p);
  } else if (codec == Codec::int4) {
    quantize_int4_kernel<T><<<unsigned(ceil_div(R, kQuantWarps)), kQuantThreads, 0, stream>>>(p);
  } else {
    const dim3 grid(unsigned(ceil_div(p.N * p.M, kQuantThreads)), unsigned(p.Hkv * (p.D / p.dsub)));
    switch (p.dsub) {
      case 2: quantize_pq_kernel<T, 2><<<grid, kQuantThreads, 0, stream>>>(p); break;
      case 4: quantize_pq_kernel<T, 4><<<grid, kQuantThreads, 0, stream>>>(p); break;
      case 8: quantize_pq_kernel<T, 8><<<grid, kQuantThreads, 0, stream>>>(p); break;
      case 16: quantize_pq_kernel<T, 16><<<grid, kQuantThreads, 0, stream>>>(p); break;
      default: quantize_pq_kernel<T, 0><<<grid, kQuantThreads, 0, stream>>>(p); break;
    }
  }
  return cudaGetLastError();
}

// rows output rows (ids' count, or N without ids); N bounds the ids. Instantiated per output
// dtype in csrc/cuda/quant_kernels.cu.
template <typename Out>
cudaError_t run_dequantize_memory(Codec codec, const DequantizeParams& p, int64_t N, int64_t rows, bool wide,
                                  cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned grid = unsigned(rows);
  switch (codec) {
    case Codec::int8:
      if (wide) dequantize_kernel<Codec::int8, Out, kDecodePiece><<<grid, kQuantThreads, 0, stream>>>(p, N);
      else dequantize_kernel<Codec::int8, Out, 1><<<grid, kQuantThreads, 0, stream>>>(p, N);
      break;
    case Codec::int4:
      if (wide) dequantize_kernel<Codec::int4, Out, kDecodePiece><<<grid, kQuantThreads, 0, stream>>>(p, N);
      else dequantize_kernel<Codec::int4, Out, 1><<<grid, kQuantThreads, 0, stream>>>(p, N);
      break;
    case Codec::pq:
      if (wide) dequantize_kernel<Codec::pq, Out, kDecodePiece><<<grid, kQuantThreads, 0, stream>>>(p, N);
      else dequantize_kernel<Codec::pq, Out, 1><<<grid, kQuantThreads, 0, stream>>>(p, N);
      break;
  }
  return cudaGetLastError();
}

#endif

}  // namespace memory3::cuda

#define M3_QUANTIZE_INSTANCE(PREFIX, T)                                                          \
  PREFIX template cudaError_t memory3::cuda::run_quantize_memory<T>(memory3::Codec, const memory3::QuantizeParams&, \
                                                                    cudaStream_t);
#define M3_DEQUANTIZE_INSTANCE(PREFIX, OUT)                                                               \
  PREFIX template cudaError_t memory3::cuda::run_dequantize_memory<OUT>(                                   \
      memory3::Codec, const memory3::DequantizeParams&, int64_t, int64_t, bool, cudaStream_t);
