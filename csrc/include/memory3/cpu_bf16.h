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
#endif

}  // namespace memory3::cpu
