// Scalar types and conversions shared by the CPU kernels. Torch-free: bf16_t and fp16_t are
// plain 16-bit storage, layout-compatible with c10::BFloat16 / c10::Half, so launchers pass
// tensor data pointers straight through.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Round to nearest even, NaN stays NaN.
inline bf16_t to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((x >> 16) | 0x40u)};
  x += 0x7fffu + ((x >> 16) & 1u);
  return bf16_t{uint16_t(x >> 16)};
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

inline constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

}  // namespace memory3
