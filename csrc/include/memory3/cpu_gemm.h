// A register-blocked GEMM on small packed tiles, the one matrix primitive of the CPU kernels.
// Every product inside attention (Q K^T, P V, dO V^T, dS K, P^T dO, dS^T Q) is this call on
// tiles packed into the right layout, so one loop nest carries all the flops.
#pragma once

#include "memory3/numeric.h"

#if defined(__GNUC__)
#define M3_ALWAYS_INLINE inline __attribute__((always_inline))
#define M3_LAMBDA_INLINE __attribute__((always_inline))
#else
#define M3_ALWAYS_INLINE inline
#define M3_LAMBDA_INLINE
#endif

// Hot entry points are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load
// time (GCC function multiversioning); the templates they inline follow the clone's ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define M3_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define M3_CPU_MULTIVERSION
#endif

namespace memory3::cpu {

// Tile sizes: C is computed in MR x NR register blocks; callers pad M to MR and N to NR.
template <typename Acc> struct GemmTile {
  static constexpr int MR = 4;
  static constexpr int NR = 64 / int(sizeof(Acc));  // one 512-bit vector (two 256-bit) per row
};

// C[M x N] (+)= A[M x K] * B[K x N]. Row-major, leading dimensions lda/ldb/ldc in elements.
// M % MR == 0 and N % NR == 0 (pad with zeros).
template <typename Acc>
M3_ALWAYS_INLINE void gemm(Acc* __restrict C, int ldc, const Acc* __restrict A, int lda,
                           const Acc* __restrict B, int ldb, int M, int N, int K, bool accumulate) {
  constexpr int MR = GemmTile<Acc>::MR;
  constexpr int NR = GemmTile<Acc>::NR;
  for (int i = 0; i < M; i += MR) {
    for (int j = 0; j < N; j += NR) {
      Acc acc[MR][NR];
      for (int ii = 0; ii < MR; ++ii)
        for (int jj = 0; jj < NR; ++jj)
          acc[ii][jj] = accumulate ? C[(i + ii) * ldc + j + jj] : Acc(0);
      for (int k = 0; k < K; ++k) {
        const Acc* __restrict b = B + k * ldb + j;
        for (int ii = 0; ii < MR; ++ii) {
          const Acc a = A[(i + ii) * lda + k];
          for (int jj = 0; jj < NR; ++jj) acc[ii][jj] += a * b[jj];
        }
      }
      for (int ii = 0; ii < MR; ++ii)
        for (int jj = 0; jj < NR; ++jj) C[(i + ii) * ldc + j + jj] = acc[ii][jj];
    }
  }
}

}  // namespace memory3::cpu
