// The CPU's bf16 dot-product unit (AVX512-BF16, vdpbf16ps): 32 bf16 pairs multiplied exactly
// and summed into 16 float lanes. Only reachable from workers compiled with
// M3_CPU_BF16_TARGET and called when the CPU has the unit (the launcher checks at run time),
// so the binary still runs on CPUs without it.
#pragma once

#include <cstdint>
#include <cstring>

#include "memory3/cpu_gemm.h"
#include "memory3/numeric.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#include <immintrin.h>
#define M3_CPU_BF16_DOT 1
#define M3_CPU_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define M3_CPU_BF16_DOT 0
#endif

namespace memory3::cpu {

constexpr int kBf16Lanes = 32;  // bf16 elements per 64-byte vector
typedef short VecBf __attribute__((vector_size(64), aligned(2)));

#if M3_CPU_BF16_DOT
// GCC's builtins rather than the _mm512_* intrinsics: an intrinsic carries its own target
// attribute and refuses to inline into these ISA-neutral helpers, while a builtin is only
// checked where it is finally expanded, inside the bf16 worker.
M3_ALWAYS_INLINE VecBf load_bf16(const bf16_t* p) {
  VecBf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Elements [0, n) of p, n < 32, zeros past them; nothing past p + n is touched.
M3_ALWAYS_INLINE VecBf load_bf16_head(const bf16_t* p, int n) {
  return __builtin_ia32_loaddquhi512_mask(reinterpret_cast<const short*>(p), VecBf{}, (1u << n) - 1u);
}

// acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1], the products exact, the sums in float.
M3_ALWAYS_INLINE VecF dot_bf16(VecF acc, VecBf a, VecBf b) {
  return __builtin_ia32_dpbf16ps_v16sf(acc, (__m512bh)a, (__m512bh)b);
}

// C[Rows x NV*16] = A[Rows x 2K] B[2K x NV*16]: A's rows bf16 (lda apart), each pair of
// columns broadcast as one 32-bit word; B as K rows of column pairs, B(2k + e, n) at
// B[(k * ldb + n) * 2 + e] (the layout vdpbf16ps multiplies).
template <int Rows, int NV>
M3_ALWAYS_INLINE void gemm_bf16_micro(float* __restrict C, int ldc, const bf16_t* __restrict A, int64_t lda,
                                      const bf16_t* __restrict B, int ldb, int K) {
  VecF acc[Rows][NV] = {};
  for (int k = 0; k < K; ++k) {
    VecBf b[NV];
    for (int c = 0; c < NV; ++c) b[c] = load_bf16(B + (int64_t(k) * ldb + c * 16) * 2);
    for (int r = 0; r < Rows; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k, sizeof(pair));
      const VecBf a = (VecBf)(VecI{} + pair);
      for (int c = 0; c < NV; ++c) acc[r][c] = dot_bf16(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < NV; ++c) std::memcpy(C + r * ldc + c * 16, &acc[r][c], sizeof(VecF));
}

template <int Rows>
M3_ALWAYS_INLINE void gemm_bf16_rows(float* C, int ldc, const bf16_t* A, int64_t lda, const bf16_t* B, int ldb,
                                     int N, int K) {
  int j = 0;
  for (; j + 32 <= N; j += 32) gemm_bf16_micro<Rows, 2>(C + j, ldc, A, lda, B + 2 * j, ldb, K);
  if (j < N) gemm_bf16_micro<Rows, 1>(C + j, ldc, A, lda, B + 2 * j, ldb, K);
}

// C[M x N] = A[M x 2K] B[2K x N] (layouts of gemm_bf16_micro), N % 16 == 0, any M; A's
// rows are read up to column 2K exactly.
M3_ALWAYS_INLINE void gemm_bf16(float* C, int ldc, const bf16_t* A, int64_t lda, const bf16_t* B, int ldb, int M,
                                int N, int K) {
  int i = 0;
  for (; i + 8 <= M; i += 8) gemm_bf16_rows<8>(C + int64_t(i) * ldc, ldc, A + i * lda, lda, B, ldb, N, K);
  for (; i + 4 <= M; i += 4) gemm_bf16_rows<4>(C + int64_t(i) * ldc, ldc, A + i * lda, lda, B, ldb, N, K);
  for (; i < M; ++i) gemm_bf16_rows<1>(C + int64_t(i) * ldc, ldc, A + i * lda, lda, B, ldb, N, K);
}
#endif

}  // namespace memory3::cpu
