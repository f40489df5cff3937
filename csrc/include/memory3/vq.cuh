// Decoder of the paper's vq codec on the GPU (FAISS OPQ{D/4}_{D},Residual2x14,PQ8x10; the
// steps and the meta layout are those of memory3/vq.h and python/memory3/vq.py). Torch-free;
// the launcher is csrc/cuda/codecs.cu, the instantiations csrc/cuda/vq_kernels.cu.
//
// The header row of meta (format, coarse_bits, pq_m, pq_bits) is read here, on the device,
// so a decode needs no copy to the host (graph-capturable); a header that does not fit the
// shapes the host saw is recorded as a range error and decodes to zeros.
//
// A block decodes kVqTile vectors: one thread per vector unpacks its indices, all threads
// build y = coarse + fine into shared memory, then each thread owns output columns i and
// runs x[v][i] = sum_j y[v][j] A[j][i] for the tile's vectors at once, so each element of A
// read from memory serves kVqTile vectors (the sum runs in increasing j, as on the CPU).
#pragma once

#include <cstdint>

#include "memory3/cuda_common.cuh"

namespace memory3::cuda {

constexpr int kVqThreads = 128;
constexpr int kVqTile = 16;       // vectors per block
constexpr int kVqMaxPqParts = 64;  // memory3/vq.h kVqMaxPqM
constexpr int kVqMaxDim = 512;     // memory3/vq.h kVqMaxD

// One dequantize_memory(codes, meta, "vq") call on the GPU.
struct VqCudaParams {
  const uint8_t* codes;    // [N, Hkv, M, code_size], (Hkv, M, code_size) contiguous
  int64_t codes_stride_n;  // bytes between memories
  const float* meta;       // [meta_rows, D] contiguous: header, rotation A, coarse, fine
  int64_t meta_rows;
  const int64_t* ids;      // [R] contiguous, each in [-1, N); null: row r is memory r
  void* out;               // [R, Hkv, M, D] contiguous
  int64_t N, Hkv, M, vectors;  // vectors = R * Hkv * M
  int D, code_size;
  int64_t* range_error;
};

// The header, checked against the shapes: true when usable.
M3_HD bool vq_header_ok(float fmt, float cb, float pm, float pb, int D, int64_t rows, int code_size) {
  auto integer_in = [](float v, int lo, int hi) { return v == float(int(v)) && v >= float(lo) && v <= float(hi); };
  if (fmt != 1.0f || !integer_in(cb, 1, 16) || !integer_in(pm, 1, kVqMaxPqParts) || !integer_in(pb, 1, 16)) return false;
  const int coarse_bits = int(cb), pq_m = int(pm), pq_bits = int(pb);
  if (D % pq_m != 0) return false;
  if (rows != 1 + int64_t(D) + (int64_t(1) << coarse_bits) + (int64_t(1) << pq_bits)) return false;
  return code_size == (2 * coarse_bits + 7) / 8 + (pq_m * pq_bits + 7) / 8;
}

template <typename Out>
__global__ void __launch_bounds__(kVqThreads) dequantize_vq_kernel(const VqCudaParams p) {
  M3_DYNAMIC_SMEM(smem);
  float* y = reinterpret_cast<float*>(smem);                          // [kVqTile][D]
  int* coarse_ix = reinterpret_cast<int*>(y + kVqTile * p.D);          // [kVqTile][2]
  int* fine_ix = coarse_ix + 2 * kVqTile;                              // [kVqTile][kVqMaxPqParts]
  int* live = fine_ix + kVqTile * kVqMaxPqParts;                       // [kVqTile]: decode (1) or zero (0)
  M3_SHARED int header[4];  // ok, coarse_bits, pq_m, pq_bits
  const int D = p.D;
  const int64_t v0 = int64_t(blockIdx.x) * kVqTile;
  const int64_t per_row = p.Hkv * p.M;
  if (threadIdx.x == 0) {
    const float fmt = p.meta[0], cb = p.meta[1], pm = p.meta[2], pb = p.meta[3];
    const bool ok = vq_header_ok(fmt, cb, pm, pb, D, p.meta_rows, p.code_size);
    if (!ok && blockIdx.x == 0) record_range_error(p.range_error, kRangeVqHeader, 0, p.meta_rows, D, p.code_size);
    header[0] = ok, header[1] = ok ? int(cb) : 1, header[2] = ok ? int(pm) : 1, header[3] = ok ? int(pb) : 1;
  }
  __syncthreads();
  const int coarse_bits = header[1], pq_m = header[2], pq_bits = header[3];
  const float* A = p.meta + D;  // row 1 on
  const float* coarse = A + int64_t(D) * D;
  const float* fine = coarse + (int64_t(1) << coarse_bits) * D;

  // 1. unpack (memory3/vq.h vq_unpack): indices masked to their widths.
  if (threadIdx.x < kVqTile) {
    const int v = threadIdx.x;
    const int64_t g = v0 + v;
    int alive = 0;
    if (g < p.vectors && header[0]) {
      const int64_t r = g / per_row, t = g % per_row;
      int64_t id = p.ids ? p.ids[r] : r;
      if (id < -1 || id >= p.N) {
        if (t == 0) record_range_error(p.range_error, kRangeDecodeIds, r, id, p.N);
        id = -1;
      }
      if (id >= 0) {
        alive = 1;
        const uint8_t* code = p.codes + id * p.codes_stride_n + t * p.code_size;
        const int nb1 = (2 * coarse_bits + 7) / 8;
        uint64_t list_no = 0;
        for (int b = 0; b < nb1; ++b) list_no |= uint64_t(code[b]) << (8 * b);
        const uint64_t cmask = (uint64_t(1) << coarse_bits) - 1;
        coarse_ix[2 * v] = int(list_no & cmask), coarse_ix[2 * v + 1] = int((list_no >> coarse_bits) & cmask);
        const uint8_t* bits = code + nb1;
        const int nbytes = p.code_size - nb1;
        const uint32_t fmask = (uint32_t(1) << pq_bits) - 1;
        for (int m = 0; m < pq_m; ++m) {
          const int bit = m * pq_bits, byte = bit >> 3;
          uint32_t window = 0;
          for (int k = 0; k < 3 && byte + k < nbytes; ++k) window |= uint32_t(bits[byte + k]) << (8 * k);
          fine_ix[v * kVqMaxPqParts + m] = int((window >> (bit & 7)) & fmask);
        }
      }
    }
    live[v] = alive;
  }
  __syncthreads();

  // 2. y = level-1 reconstruction + level-2 residual (rotated space).
  const int half = D / 2, dsub = D / pq_m;
  for (int idx = threadIdx.x; idx < kVqTile * D; idx += kVqThreads) {
    const int v = idx / D, d = idx % D;
    float val = 0.0f;
    if (live[v]) {
      val = coarse[int64_t(coarse_ix[2 * v + (d >= half)]) * D + d];
      val += fine[int64_t(fine_ix[v * kVqMaxPqParts + d / dsub]) * D + d];
    }
    y[idx] = val;
  }
  __syncthreads();

  // 3. x = A^T y: thread owns columns i, all kVqTile vectors at once. With D % 4 == 0, four
  // rows of A per step and y read as float4 (one shared load per 4 multiply-adds); the sum
  // still runs in increasing j.
  for (int i = threadIdx.x; i < D; i += kVqThreads) {
    float acc[kVqTile];
#pragma unroll
    for (int v = 0; v < kVqTile; ++v) acc[v] = 0.0f;
    int j = 0;
    if (D % 4 == 0)
      for (; j < D; j += 4) {
        const float a0 = A[int64_t(j) * D + i], a1 = A[int64_t(j + 1) * D + i];
        const float a2 = A[int64_t(j + 2) * D + i], a3 = A[int64_t(j + 3) * D + i];
#pragma unroll
        for (int v = 0; v < kVqTile; ++v) {
          const float4 yv = *reinterpret_cast<const float4*>(y + v * D + j);
          acc[v] += yv.x * a0;
          acc[v] += yv.y * a1;
          acc[v] += yv.z * a2;
          acc[v] += yv.w * a3;
        }
      }
    for (; j < D; ++j) {
      const float a = A[int64_t(j) * D + i];
#pragma unroll
      for (int v = 0; v < kVqTile; ++v) acc[v] += y[v * D + j] * a;
    }
#pragma unroll
    for (int v = 0; v < kVqTile; ++v) {
      const int64_t g = v0 + v;
      if (g < p.vectors) static_cast<Out*>(p.out)[g * D + i] = from_acc<Out>(live[v] ? acc[v] : 0.0f);
    }
  }
}

// Shared memory of a block at head dim D.
M3_HD int vq_smem_bytes(int D) { return kVqTile * D * 4 + (2 * kVqTile + kVqTile * kVqMaxPqParts + kVqTile) * 4; }

#ifndef M3_EMULATE_CUDA  // launches (the CPU emulation launches the kernels itself)
// Instantiated per output dtype in csrc/cuda/vq_kernels.cu.
template <typename Out>
cudaError_t run_dequantize_vq(const VqCudaParams& p, cudaStream_t stream) {
  if (p.vectors == 0) return cudaSuccess;
  const int smem = vq_smem_bytes(p.D);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(dequantize_vq_kernel<Out>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  dequantize_vq_kernel<Out><<<unsigned(ceil_div(p.vectors, kVqTile)), kVqThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

#endif

}  // namespace memory3::cuda

#define M3_VQ_INSTANCE(PREFIX, OUT) \
  PREFIX template cudaError_t memory3::cuda::run_dequantize_vq<OUT>(const memory3::cuda::VqCudaParams&, cudaStream_t);
