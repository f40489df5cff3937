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
