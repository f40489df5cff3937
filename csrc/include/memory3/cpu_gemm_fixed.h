// GEMMs whose A layout is fixed at compile time, for the CPU backward's tiles. The generic
// gemm() of cpu_gemm.h reads A(r, k) at A[r * a_rs + k * a_cs] with both strides known only
// at run time; with eight rows per tile the compiler keeps the row offsets on the stack, and
// the inner loop issued 18 loads per 16 FMAs (load-bound, ~2/3 of the FMA rate, measured with
// perf annotate). Here A is either
//   a panel:    A(r, k) = A[r + k * lda]  (the tile's rows for one k are adjacent), or
//   row-major:  A(r, k) = A[r * LDA + k]  with LDA a template constant (immediate offsets),
// and a tile is 4 rows x 4 vectors (16 accumulators, 8 loads per 16 FMAs).
#pragma once

#include <cstring>

#include "memory3/cpu_gemm.h"

namespace memory3::cpu {

// C[Rows x NV*NR] (+)= A[Rows x K] * B[K x NV*NR]; LDA > 0: A row-major with row stride LDA,
// LDA == 0: A a panel with k-stride lda.
template <typename Acc, int Rows, int NV, int LDA>
M3_ALWAYS_INLINE void gemm_fixed_micro(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda,
                                       const Acc* __restrict B, int ldb, int K, bool accumulate) {
  using V = typename Vec64<Acc>::type;
  constexpr int W = GemmTile<Acc>::NR;
  V acc[Rows][NV];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < NV; ++c) {
      if (accumulate) std::memcpy(&acc[r][c], C + r * ldc + c * W, sizeof(V));
      else acc[r][c] = V{};
    }
  const Acc* a = A;
  for (int k = 0; k < K; ++k) {
    V b[NV];
    for (int c = 0; c < NV; ++c) std::memcpy(&b[c], B + int64_t(k) * ldb + c * W, sizeof(V));
    for (int r = 0; r < Rows; ++r) {
      const Acc ar = LDA > 0 ? a[r * LDA] : a[r];
      for (int c = 0; c < NV; ++c) acc[r][c] += ar * b[c];
    }
    a += LDA > 0 ? 1 : lda;
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < NV; ++c) std::memcpy(C + r * ldc + c * W, &acc[r][c], sizeof(V));
}

template <typename Acc, int Rows, int LDA>
M3_ALWAYS_INLINE void gemm_fixed_rows(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda,
                                      const Acc* __restrict B, int ldb, int N, int K, bool accumulate) {
  constexpr int NR = GemmTile<Acc>::NR;
  int j = 0;
  for (; j + 4 * NR <= N; j += 4 * NR)
    gemm_fixed_micro<Acc, Rows, 4, LDA>(C + j, ldc, A, lda, B + j, ldb, K, accumulate);
  for (; j + 2 * NR <= N; j += 2 * NR)
    gemm_fixed_micro<Acc, Rows, 2, LDA>(C + j, ldc, A, lda, B + j, ldb, K, accumulate);
  if (j < N) gemm_fixed_micro<Acc, Rows, 1, LDA>(C + j, ldc, A, lda, B + j, ldb, K, accumulate);
}

// C[M x N] (+)= A[M x K] * B[K x N], C and B row-major; N % NR == 0, any M (rows of A past M
// are never read). LDA > 0: A row-major with row stride LDA (lda unused); LDA == 0: A a
// panel, A(r, k) = A[r + k * lda].
template <typename Acc, int LDA>
M3_ALWAYS_INLINE void gemm_fixed(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda, const Acc* __restrict B,
                                 int ldb, int M, int N, int K, bool accumulate) {
  auto row_step = [](int rows) { return LDA > 0 ? int64_t(rows) * LDA : int64_t(rows); };
  int i = 0;
  for (; i + 4 <= M; i += 4)
    gemm_fixed_rows<Acc, 4, LDA>(C + int64_t(i) * ldc, ldc, A + row_step(i), lda, B, ldb, N, K, accumulate);
  for (; i < M; ++i)
    gemm_fixed_rows<Acc, 1, LDA>(C + int64_t(i) * ldc, ldc, A + row_step(i), lda, B, ldb, N, K, accumulate);
}

// A is a panel: A(r, k) = A[r + k * lda].
template <typename Acc>
M3_ALWAYS_INLINE void gemm_panel(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda, const Acc* __restrict B,
                                 int ldb, int M, int N, int K, bool accumulate) {
  gemm_fixed<Acc, 0>(C, ldc, A, lda, B, ldb, M, N, K, accumulate);
}

}  // namespace memory3::cpu
