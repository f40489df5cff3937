// Scalar types and conversions shared by the CPU kernels. Torch-free: bf16_t and fp16_t are
// plain 16-bit storage, layout-compatible with c10::BFloat16 / c10::Half, so launchers pass
// tensor data pointers straight through.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

namespace memory3 {

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

inline float to_float(fp16_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24
  const float mag = float(mant) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

// Round to nearest even, NaN stays NaN. Branch-free (a select), so conversion loops vectorize.
inline bf16_t to_bf16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return bf16_t{uint16_t((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

inline fp16_t to_fp16(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};  // nan
  if (x >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: subnormal half, m * 2^-24 with m <= 1024
    const float m = std::nearbyint(bits_float(x) * 16777216.0f);
    return fp16_t{uint16_t(sign | uint16_t(m))};
  }
  x += 0xfffu + ((x >> 13) & 1u);
  x -= uint32_t(127 - 15) << 23;
  return fp16_t{uint16_t(sign | (x >> 13))};
}

// Load any supported element as the accumulator type, and store back.
template <typename Acc> inline Acc load_as(float x) { return Acc(x); }
template <typename Acc> inline Acc load_as(double x) { return Acc(x); }
template <typename Acc> inline Acc load_as(bf16_t x) { return Acc(to_float(x)); }
template <typename Acc> inline Acc load_as(fp16_t x) { return Acc(to_float(x)); }
template <typename Acc> inline Acc load_as(int8_t x) { return Acc(x); }

template <typename T, typename Acc> inline T store_as(Acc x) {
  if constexpr (std::is_same_v<T, bf16_t>) return to_bf16(float(x));
  else if constexpr (std::is_same_v<T, fp16_t>) return to_fp16(float(x));
  else return T(x);
}

// The float element types every kernel takes, and a dispatch to their storage types.
enum class FloatType { f32, f64, bf16, f16 };

// Calls f(T{}) with the storage type of t.
template <typename F>
M3_ALWAYS_INLINE void dispatch_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::f32: return f(float{});
    case FloatType::f64: return f(double{});
    case FloatType::bf16: return f(bf16_t{});
    case FloatType::f16: return f(fp16_t{});
  }
}

inline constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

}  // namespace memory3
