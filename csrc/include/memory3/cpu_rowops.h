// Softmax row operations on packed score rows, one 64-byte vector at a time (see cpu_gemm.h
// for the vector type). Rows are padded to a multiple of the vector width by the caller.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "memory3/cpu_gemm.h"

namespace memory3::cpu {

constexpr int kVecF = 16;  // lanes of VecF

M3_ALWAYS_INLINE VecF load_vec(const float* p) { VecF v; std::memcpy(&v, p, sizeof(v)); return v; }
M3_ALWAYS_INLINE void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0, 16 lanes: x = n ln2 + f, |f| <= ln2 / 2, e^f by a degree-6 Taylor
// polynomial (relative error ~2e-7), 2^n built in the exponent bits. Lanes below -87
// (including -inf) give exactly 0. Rounding to nearest uses the 1.5 * 2^23 trick, which
// needs no floor instruction.
M3_ALWAYS_INLINE VecF exp_nonpositive(VecF x) {
  const VecI underflow = x < -87.0f;
  x = underflow ? VecF{} - 87.0f : x;
  const VecF t = x * 1.44269504088896341f;
  const VecF n = (t + 12582912.0f) - 12582912.0f;
  const VecF f = (t - n) * 0.693147180559945309f;
  VecF p = VecF{} + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const VecI bits = (__builtin_convertvector(n, VecI) + 127) << 23;
  VecF two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? VecF{} : p * two_n;
}

// 2^t for t <= 0 (scores kept in log2 units, so no multiply by log2 e): t = n + f, |f| <= 1/2,
// 2^f = e^(f ln2) by the same degree-6 Taylor polynomial (coefficients ln2^k / k!), relative
// error ~2e-7. 2^n comes from the rounding sum's own bits: t + 1.5 * 2^23 holds n in its low
// mantissa bits, and shifting them into the exponent field needs no float-to-int conversion.
// Lanes below -125 (including -inf, whose NaN on the way is discarded) give exactly 0.
M3_ALWAYS_INLINE VecF exp2_nonpositive(VecF t) {
  typedef uint32_t VecU __attribute__((vector_size(64), aligned(4)));
  const VecF r = t + 12582912.0f;
  const VecF f = t - (r - 12582912.0f);
  VecF p = VecF{} + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428441e-3f;
  p = p * f + 9.618129107628477e-3f;
  p = p * f + 5.5504108664821576e-2f;
  p = p * f + 0.2402265069591007f;
  p = p * f + 0.6931471805599453f;
  p = p * f + 1.0f;
  VecU bits;
  std::memcpy(&bits, &r, sizeof(bits));
  bits = (bits << 23) + (127u << 23);
  VecF two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return t < -125.0f ? VecF{} : p * two_n;
}

M3_ALWAYS_INLINE float hmax(VecF v) {
  float m = v[0];
  for (int i = 1; i < kVecF; ++i) m = std::max(m, v[i]);
  return m;
}
M3_ALWAYS_INLINE float hsum(VecF v) {
  float s = 0;
  for (int i = 0; i < kVecF; ++i) s += v[i];
  return s;
}

// Lane i of the result = the sum of the lanes of a[i]: a transpose-and-add tree, 30
// shuffles and 15 adds for 16 dot products instead of 16 horizontal sums.
M3_ALWAYS_INLINE VecF hsum16(const VecF* a) {
  VecF b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // b[i]: lanes 0-7 halves of a[2i], lanes 8-15 of a[2i+1]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // c[i]: quarters of a[4i], a[4i+2], a[4i+1], a[4i+3]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // d[i]: pairs of a[8i + {0,4,2,6,1,5,3,7}]
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  // e lane 2m + h = a[8h + rev(m)], rev = 3-bit reversal; the last shuffle puts lane i = a[i].
  const VecF e = __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                 __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(e, e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Lanes at or past `lim` of the row s[0, np) become -inf (masked keys).
M3_ALWAYS_INLINE void mask_tail(float* s, int lim, int np) {
  for (int j = lim; j < np; ++j) s[j] = -std::numeric_limits<float>::infinity();
}

M3_ALWAYS_INLINE float row_max(const float* s, int np) {
  VecF m = load_vec(s);
  for (int j = kVecF; j < np; j += kVecF) {
    const VecF x = load_vec(s + j);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// s[j] = exp(s[j] - shift) in place for j < np; returns the sum.
M3_ALWAYS_INLINE float row_exp_sum(float* s, int np, float shift) {
  VecF acc{};
  for (int j = 0; j < np; j += kVecF) {
    const VecF p = exp_nonpositive(load_vec(s + j) - shift);
    store_vec(s + j, p);
    acc += p;
  }
  return hsum(acc);
}

// Backward: p = exp(s - lse) and ds = p * (dp - delta), in place over s and ds.
M3_ALWAYS_INLINE void row_probs_and_ds(float* s, float* ds, int np, float lse, float delta) {
  for (int j = 0; j < np; j += kVecF) {
    const VecF p = exp_nonpositive(load_vec(s + j) - lse);
    store_vec(s + j, p);
    store_vec(ds + j, p * (load_vec(ds + j) - delta));
  }
}

// The same for double accumulation (the float64 path, used for gradient checks): scalar.
M3_ALWAYS_INLINE void mask_tail(double* s, int lim, int np) {
  for (int j = lim; j < np; ++j) s[j] = -std::numeric_limits<double>::infinity();
}
M3_ALWAYS_INLINE double row_max(const double* s, int np) {
  double m = s[0];
  for (int j = 1; j < np; ++j) m = std::max(m, s[j]);
  return m;
}
M3_ALWAYS_INLINE double row_exp_sum(double* s, int np, double shift) {
  double sum = 0;
  for (int j = 0; j < np; ++j) sum += (s[j] = std::exp(s[j] - shift));
  return sum;
}
M3_ALWAYS_INLINE void row_probs_and_ds(double* s, double* ds, int np, double lse, double delta) {
  for (int j = 0; j < np; ++j) {
    s[j] = std::exp(s[j] - lse);
    ds[j] = s[j] * (ds[j] - delta);
  }
}

}  // namespace memory3::cpu
