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

// C[rows x NR] (+)= A[rows x K] * B[K x NR] with the rows' accumulators in registers.
template <typename Acc, int Rows>
M3_ALWAYS_INLINE void gemm_micro(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda,
                                 const Acc* __restrict B, int ldb, int K, bool accumulate) {
  using V = typename Vec64<Acc>::type;
  V acc[Rows];
  for (int r = 0; r < Rows; ++r) {
    if (accumulate) std::memcpy(&acc[r], C + r * ldc, sizeof(V));
    else acc[r] = V{};
  }
  for (int k = 0; k < K; ++k) {
    V b;
    std::memcpy(&b, B + k * ldb, sizeof(V));
    for (int r = 0; r < Rows; ++r) acc[r] += A[r * lda + k] * b;
  }
  for (int r = 0; r < Rows; ++r) std::memcpy(C + r * ldc, &acc[r], sizeof(V));
}

// C[M x N] (+)= A[M x K] * B[K x N]. Row-major, leading dimensions lda/ldb/ldc in elements.
// M % 4 == 0 and N % NR == 0 (pad with zeros).
template <typename Acc>
M3_ALWAYS_INLINE void gemm(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda,
                           const Acc* __restrict B, int ldb, int M, int N, int K, bool accumulate) {
  constexpr int NR = GemmTile<Acc>::NR;
  int i = 0;
  for (; i + 8 <= M; i += 8)
    for (int j = 0; j < N; j += NR)
      gemm_micro<Acc, 8>(C + i * ldc + j, ldc, A + i * lda, lda, B + j, ldb, K, accumulate);
  for (; i < M; i += 4)
    for (int j = 0; j < N; j += NR)
      gemm_micro<Acc, 4>(C + i * ldc + j, ldc, A + i * lda, lda, B + j, ldb, K, accumulate);
}

}  // namespace memory3::cpu
