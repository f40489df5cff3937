// A register-blocked GEMM on small packed tiles, the one matrix primitive of the CPU kernels.
// Every product inside attention (Q K^T, P V, dO V^T, dS K, P^T dO, dS^T Q) is this call on
// tiles packed into the right layout, so one loop nest carries all the flops.
#pragma once

#include <cstring>

#include "memory3/numeric.h"

namespace memory3::cpu {

// One 64-byte vector of Acc (16 floats / 8 doubles) as a GCC/Clang vector extension: the
// compiler maps it to one zmm, two ymm or four xmm registers depending on the ISA clone.
// aligned(alignof(Acc)) makes loads and stores through it unaligned-safe.
template <typename Acc> struct Vec64 {
  typedef Acc type __attribute__((vector_size(64), aligned(alignof(Acc))));
};

// 16 lanes of float / int32: one zmm in the AVX-512 clone, two ymm in the AVX2 one.
using VecF = Vec64<float>::type;
typedef int32_t VecI __attribute__((vector_size(64), aligned(4)));

// Tile sizes: rows are taken MR at a time (8, then 4 for the tail), columns one vector at a
// time; callers pad M to a multiple of 4 and N to a multiple of NR.
template <typename Acc> struct GemmTile {
  static constexpr int MR = 4;
  static constexpr int NR = 64 / int(sizeof(Acc));
};

// C[rows x NV*NR] (+)= A[rows x K] * B[K x NV*NR] with the accumulators in registers. A is
// read as scalars at A[r * a_rs + k * a_cs], so it may be row-major (a_cs = 1) or the
// transpose of a row-major tile (a_rs = 1): no transposed copy is ever made.
template <typename Acc, int Rows, int NV>
M3_ALWAYS_INLINE void gemm_micro(Acc* __restrict C, int ldc, const Acc* __restrict A, int a_rs, int a_cs,
                                 const Acc* __restrict B, int ldb, int K, bool accumulate) {
  using V = typename Vec64<Acc>::type;
  constexpr int W = GemmTile<Acc>::NR;
  V acc[Rows][NV];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < NV; ++c) {
      if (accumulate) std::memcpy(&acc[r][c], C + r * ldc + c * W, sizeof(V));
      else acc[r][c] = V{};
    }
  for (int k = 0; k < K; ++k) {
    V b[NV];
    for (int c = 0; c < NV; ++c) std::memcpy(&b[c], B + int64_t(k) * ldb + c * W, sizeof(V));
    for (int r = 0; r < Rows; ++r) {
      const Acc a = A[int64_t(r) * a_rs + int64_t(k) * a_cs];
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < NV; ++c) std::memcpy(C + r * ldc + c * W, &acc[r][c], sizeof(V));
}

// One block of Rows rows across all N columns: two vectors at a time, then one.
template <typename Acc, int Rows>
M3_ALWAYS_INLINE void gemm_rows(Acc* __restrict C, int ldc, const Acc* __restrict A, int a_rs, int a_cs,
                                const Acc* __restrict B, int ldb, int N, int K, bool accumulate) {
  constexpr int NR = GemmTile<Acc>::NR;
  int j = 0;
  for (; j + 2 * NR <= N; j += 2 * NR)
    gemm_micro<Acc, Rows, 2>(C + j, ldc, A, a_rs, a_cs, B + j, ldb, K, accumulate);
  if (j < N) gemm_micro<Acc, Rows, 1>(C + j, ldc, A, a_rs, a_cs, B + j, ldb, K, accumulate);
}

// C[M x N] (+)= A[M x K] * B[K x N]: C and B row-major (ldc, ldb in elements), A(r, k) at
// A[r * a_rs + k * a_cs]. N % NR == 0 (pad with zeros); any M (rows are never read past M).
template <typename Acc>
M3_ALWAYS_INLINE void gemm(Acc* __restrict C, int ldc, const Acc* __restrict A, int a_rs, int a_cs,
                           const Acc* __restrict B, int ldb, int M, int N, int K, bool accumulate) {
  int i = 0;
  for (; i + 8 <= M; i += 8)
    gemm_rows<Acc, 8>(C + int64_t(i) * ldc, ldc, A + int64_t(i) * a_rs, a_rs, a_cs, B, ldb, N, K, accumulate);
  for (; i + 4 <= M; i += 4)
    gemm_rows<Acc, 4>(C + int64_t(i) * ldc, ldc, A + int64_t(i) * a_rs, a_rs, a_cs, B, ldb, N, K, accumulate);
  for (; i < M; ++i)
    gemm_rows<Acc, 1>(C + int64_t(i) * ldc, ldc, A + int64_t(i) * a_rs, a_rs, a_cs, B, ldb, N, K, accumulate);
}

}  // namespace memory3::cpu
