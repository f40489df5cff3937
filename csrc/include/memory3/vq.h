// Decoding of the paper's vector-quantization codec `vq` (FAISS OPQ{D/4}_{D},Residual2x14,
// PQ8x10; python/memory3/vq.py has the derivation from FAISS's source and the meta layout).
// Torch-free and free of compiler vector extensions, so the CUDA kernel (with the CUDA
// issues) can reuse the parameters and the per-vector steps as they are:
//
//   1. unpack   list number (coarse_bytes, little-endian) -> i0, i1; pq_m fine codes of
//               pq_bits each from one little-endian bit stream           (vq_unpack)
//   2. lookup   y[d] = coarse[i0 or i1][d] + fine[j_{d / dsub}][d]       (vq_lookup)
//   3. rotate   x[i] = sum_j y[j] * A[j][i], i.e. x = A^T y              (vq_rotate)
//
// Step 3 is the only loop with work in it (D^2 multiply-adds per vector); it runs over rows j
// of A and is independent across outputs i, which on a GPU becomes one thread per (vector, i)
// with y and A in shared memory. (Tiling 8 vectors per pass over A, accumulators in local
// arrays, measured 5x slower here with GCC 12: the plain loop below vectorizes along i.) Everything is float32, as in FAISS; the sum over j runs in increasing j, so results
// match FAISS's sa_decode to float rounding (its rotation is a BLAS sgemm), not bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "memory3/numeric.h"

namespace memory3 {

constexpr int kVqFormat = 1;  // meta row 0, column 0
constexpr int kVqMaxD = 512;  // python/memory3/vq.py VQ_MAX_D
constexpr int kVqMaxPqM = 64;

// One dequantize_memory(codes, meta, "vq") call: out[r] = decode(memory ids[r]), zeros where
// ids[r] == -1. meta is float32 [1 + D + 2^coarse_bits + 2^pq_bits, D] (vq.py); the
// launcher reads its header row and points rotation/coarse/fine at the later rows.
struct VqDequantizeParams {
  const uint8_t* codes;    // [N, Hkv, M, code_size], (Hkv, M, code_size) contiguous
  int64_t codes_stride_n;  // bytes between memories
  const float* rotation;   // A [D, D] row-major, y = A x (FAISS OPQMatrix.A)
  const float* coarse;     // [2^coarse_bits, D]: row n = [C0[n] | C1[n]] (halves of D / 2)
  const float* fine;       // [2^pq_bits, D]: row n = [P0[n] | ... | P_{pq_m-1}[n]]
  const int64_t* ids;      // [R] contiguous, each in [-1, N); null: row r is memory r
  void* out;               // [R, Hkv, M, D] contiguous, float32/float64/bfloat16/float16
  int64_t Hkv, M;
  int D, code_size, coarse_bits, pq_m, pq_bits;
};

// Bytes of the list number: Index2Layer::code_size_1 for nlist = 2^(2 coarse_bits).
inline constexpr int vq_coarse_bytes(int coarse_bits) { return (2 * coarse_bits + 7) / 8; }
inline constexpr int vq_code_size(int coarse_bits, int pq_m, int pq_bits) {
  return vq_coarse_bytes(coarse_bits) + (pq_m * pq_bits + 7) / 8;
}

struct VqIndices {
  int64_t i0, i1;       // coarse centroids of the two halves
  int32_t j[kVqMaxPqM]; // fine centroid of each of the pq_m parts
};

// Step 1. Indices are masked to their bit widths, so any code bytes decode inside the tables
// (a list number >= nlist, which FAISS refuses, decodes as its low bits).
M3_ALWAYS_INLINE void vq_unpack(VqIndices& ix, const uint8_t* code, const VqDequantizeParams& p) {
  const int nb1 = vq_coarse_bytes(p.coarse_bits);
  uint64_t list_no = 0;
  for (int b = 0; b < nb1; ++b) list_no |= uint64_t(code[b]) << (8 * b);
  const uint64_t cmask = (uint64_t(1) << p.coarse_bits) - 1;
  ix.i0 = int64_t(list_no & cmask);
  ix.i1 = int64_t((list_no >> p.coarse_bits) & cmask);
  const uint8_t* bits = code + nb1;
  const int nbytes = p.code_size - nb1;
  const uint32_t fmask = (uint32_t(1) << p.pq_bits) - 1;
  for (int m = 0; m < p.pq_m; ++m) {  // code m = bits [m pq_bits, (m + 1) pq_bits), LSB first
    const int bit = m * p.pq_bits, byte = bit >> 3;
    uint32_t window = 0;  // pq_bits <= 16 and a shift < 8 fit in 3 bytes
    for (int k = 0; k < 3 && byte + k < nbytes; ++k) window |= uint32_t(bits[byte + k]) << (8 * k);
    ix.j[m] = int32_t((window >> (bit & 7)) & fmask);
  }
}

// Step 2: y = level-1 reconstruction + level-2 residual, in the rotated space.
M3_ALWAYS_INLINE void vq_lookup(float* __restrict y, const VqIndices& ix, const VqDequantizeParams& p) {
  const int D = p.D, half = D / 2, dsub = D / p.pq_m;
  const float* c0 = p.coarse + ix.i0 * D;
  const float* c1 = p.coarse + ix.i1 * D;
  for (int d = 0; d < half; ++d) y[d] = c0[d];
  for (int d = half; d < D; ++d) y[d] = c1[d];
  for (int m = 0; m < p.pq_m; ++m) {
    const float* f = p.fine + int64_t(ix.j[m]) * D;
    for (int d = m * dsub; d < (m + 1) * dsub; ++d) y[d] += f[d];
  }
}

// Step 3: x = A^T y as a sum of rows of A (contiguous, vectorizes along i).
M3_ALWAYS_INLINE void vq_rotate(float* __restrict x, const float* __restrict y, const float* __restrict A, int D) {
  for (int i = 0; i < D; ++i) x[i] = 0.0f;
  for (int j = 0; j < D; ++j) {
    const float yj = y[j];
    const float* a = A + int64_t(j) * D;
    for (int i = 0; i < D; ++i) x[i] += yj * a[i];
  }
}

namespace cpu {

// Output rows [r0, r1) (one memory each: Hkv * M vectors), Out the output element type.
template <typename Out>
M3_ALWAYS_INLINE void dequantize_vq_rows(const VqDequantizeParams& p, int64_t r0, int64_t r1) {
  const int64_t vectors = p.Hkv * p.M;
  float y[kVqMaxD], x[kVqMaxD];
  VqIndices ix;
  for (int64_t r = r0; r < r1; ++r) {
    Out* out = static_cast<Out*>(p.out) + r * vectors * p.D;
    const int64_t id = p.ids ? p.ids[r] : r;
    if (id < 0) {
      std::memset(static_cast<void*>(out), 0, size_t(vectors * p.D) * sizeof(Out));  // +0.0
      continue;
    }
    const uint8_t* code = p.codes + id * p.codes_stride_n;
    for (int64_t t = 0; t < vectors; ++t, code += p.code_size, out += p.D) {
      vq_unpack(ix, code, p);
      vq_lookup(y, ix, p);
      vq_rotate(x, y, p.rotation, p.D);
      for (int i = 0; i < p.D; ++i) out[i] = store_as<Out>(x[i]);
    }
  }
}

}  // namespace cpu
}  // namespace memory3
