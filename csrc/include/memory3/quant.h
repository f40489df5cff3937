// Memory codecs on the CPU: quantize_memory / dequantize_memory for int8, int4 and pq.
// Torch-free. The numerics follow python/memory3/reference.py step by step (float32
// throughout, true divisions, round half to even), so codes and dequantized values are
// bit-identical to it; pq codes may differ only between centroids at (near-)equal distance,
// where the order of the distance sums decides.
//
// A vector is one (memory, head, token) row of D values; every codec works vector by vector.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "memory3/cpu_gemm.h"
#include "memory3/numeric.h"
#include "memory3/params.h"

namespace memory3::cpu {

// The row of an id of -1.
template <typename Out>
M3_ALWAYS_INLINE void zero_row(Out* out, int64_t n) {
  std::memset(static_cast<void*>(out), 0, size_t(n) * sizeof(Out));  // +0.0 in every float type
}

// Smallest and largest of v[0, n), n >= 1. Exact in any order, so it runs on 16
// independent lanes (one vector register) rather than one long dependency chain.
M3_ALWAYS_INLINE void min_max(const float* __restrict v, int n, float& lo, float& hi) {
  lo = hi = v[0];
  int d = 0;
  if (n >= 16) {
    VecF lo_l, hi_l;
    std::memcpy(&lo_l, v, sizeof(lo_l));
    hi_l = lo_l;
    for (d = 16; d + 16 <= n; d += 16) {
      VecF x;
      std::memcpy(&x, v + d, sizeof(x));
      lo_l = x < lo_l ? x : lo_l;
      hi_l = x > hi_l ? x : hi_l;
    }
    for (int l = 0; l < 16; ++l) lo = std::min(lo, lo_l[l]), hi = std::max(hi, hi_l[l]);
  }
  for (; d < n; ++d) lo = std::min(lo, v[d]), hi = std::max(hi, v[d]);
}

// ---------------------------------------------------------------- int8

// v: the vector as float32 (the reference quantizes x.float()).
M3_ALWAYS_INLINE void quantize_int8_vector(int8_t* __restrict codes, float* __restrict scale,
                                           const float* __restrict v, int D) {
  float lo, hi;
  min_max(v, D, lo, hi);
  const float s = std::max(std::fabs(lo), std::fabs(hi)) / 127.0f;  // max |x|
  *scale = s;
  for (int d = 0; d < D; ++d) {
    const float q = s > 0.0f ? std::nearbyint(v[d] / s) : 0.0f;
    codes[d] = int8_t(std::min(127.0f, std::max(-127.0f, q)));
  }
}

// out = code * scale in Acc (gather_memory uses double for a double output; the codec float).
template <typename Out, typename Acc = float>
M3_ALWAYS_INLINE void dequantize_int8_vector(Out* __restrict out, const int8_t* __restrict codes, float scale,
                                             int64_t D) {
  const Acc s = Acc(scale);
  for (int64_t d = 0; d < D; ++d) out[d] = store_as<Out>(Acc(codes[d]) * s);
}

// ---------------------------------------------------------------- int4

// Groups of 32 along D (the last may be shorter; D is even, so no byte straddles groups).
M3_ALWAYS_INLINE void quantize_int4_vector(uint8_t* __restrict packed, float* __restrict meta,
                                           const float* __restrict v, int D) {
  for (int g0 = 0; g0 < D; g0 += kInt4Group, meta += 2) {
    const int n = std::min(kInt4Group, D - g0);
    float mn, mx;
    min_max(v + g0, n, mn, mx);
    const float s = (mx - mn) / 15.0f;
    meta[0] = s, meta[1] = mn;
    uint8_t q[kInt4Group];
    for (int j = 0; j < n; ++j) {
      const float c = s > 0.0f ? std::nearbyint((v[g0 + j] - mn) / s) : 0.0f;
      q[j] = uint8_t(std::min(15.0f, std::max(0.0f, c)));
    }
    for (int j = 0; j < n / 2; ++j) packed[g0 / 2 + j] = uint8_t(q[2 * j] | (q[2 * j + 1] << 4));
  }
}

// The reference rounds code * scale, then adds zero. The product goes through double
// (exact: 4 x 24 bits) and one rounding to float, so the compiler cannot contract the two
// steps into an FMA, whose single rounding would differ in the last bit.
M3_ALWAYS_INLINE float int4_value(int code, float scale, float zero) {
  return float(double(code) * double(scale)) + zero;
}

template <typename Out>
M3_ALWAYS_INLINE void dequantize_int4_vector(Out* __restrict out, const uint8_t* __restrict packed,
                                             const float* __restrict meta, int D) {
  for (int g0 = 0; g0 < D; g0 += kInt4Group) {
    const float s = meta[0], z = meta[1];
    meta += 2;
    const int bytes = std::min(kInt4Group, D - g0) / 2;
    for (int j = 0; j < bytes; ++j) {  // byte j holds values 2j (low nibble) and 2j + 1
      const int b = packed[g0 / 2 + j];
      out[g0 + 2 * j] = store_as<Out>(int4_value(b & 15, s, z));
      out[g0 + 2 * j + 1] = store_as<Out>(int4_value(b >> 4, s, z));
    }
  }
}

// ---------------------------------------------------------------- pq

// Quantization works on tiles of 16 vectors of one head, one vector per lane of an
// VecF. For each centroid, in increasing order, every lane computes its squared
// distance and keeps the centroid only when strictly closer, so each lane ends on the
// first nearest centroid (torch.argmin's tie rule) without any step across lanes.
constexpr int kPqLanes = 16;

// codes[l] = nearest centroid of sub-vector l; xs [dsub, 16] holds the tile's sub-vectors
// by coordinate, cb is the sub-space's codebook [256, dsub].
M3_ALWAYS_INLINE void pq_nearest(int32_t* __restrict codes, const float* __restrict xs,
                                 const float* __restrict cb, int dsub) {
  VecF best = VecF{} + std::numeric_limits<float>::infinity();
  VecI best_k = {};
  for (int k = 0; k < kPqCentroids; ++k) {
    VecF dist = {};
    for (int d = 0; d < dsub; ++d) {
      VecF xd;
      std::memcpy(&xd, xs + d * kPqLanes, sizeof(xd));
      const VecF e = xd - cb[k * dsub + d];
      dist += e * e;
    }
    const VecI closer = dist < best;
    best = closer ? dist : best;
    best_k = closer ? VecI{} + k : best_k;
  }
  std::memcpy(codes, &best_k, sizeof(best_k));
}

// Tile of vectors i0.. of head h (vector i of a head is (memory i / M, token i % M)); a
// short last tile repeats its last vector in the spare lanes. xs: scratch [dsub, 16].
template <typename T>
M3_ALWAYS_INLINE void quantize_pq_tile(const QuantizeParams& p, int64_t h, int64_t i0, float* xs) {
  const int nsub = p.D / p.dsub;
  const int lanes = int(std::min<int64_t>(kPqLanes, p.N * p.M - i0));
  const T* x[kPqLanes];
  uint8_t* codes[kPqLanes];
  for (int l = 0; l < kPqLanes; ++l) {
    const int64_t i = i0 + std::min(l, lanes - 1);
    const int64_t r = (i / p.M * p.Hkv + h) * p.M + i % p.M;
    x[l] = static_cast<const T*>(p.x) + r * p.D;
    codes[l] = static_cast<uint8_t*>(p.codes) + r * nsub;
  }
  for (int s = 0; s < nsub; ++s) {
    for (int d = 0; d < p.dsub; ++d)
      for (int l = 0; l < kPqLanes; ++l) xs[d * kPqLanes + l] = load_as<float>(x[l][s * p.dsub + d]);
    int32_t k[kPqLanes];
    pq_nearest(k, xs, p.codebook + (h * nsub + s) * int64_t(kPqCentroids) * p.dsub, p.dsub);
    for (int l = 0; l < lanes; ++l) codes[l][s] = uint8_t(k[l]);
  }
}

// cb is the head's codebook [D / dsub, 256, dsub], already in the output type, so decoding
// copies one centroid per sub-vector. kDsub > 0 fixes dsub at compile time, which turns
// each copy into a move or two instead of a memcpy call.
template <int kDsub, typename Out>
M3_ALWAYS_INLINE void dequantize_pq_vector(Out* __restrict out, const uint8_t* __restrict codes,
                                           const Out* __restrict cb, int D, int dsub) {
  if constexpr (kDsub > 0) dsub = kDsub;
  for (int s = 0; s < D / dsub; ++s)
    std::memcpy(static_cast<void*>(out + s * dsub), cb + (int64_t(s) * kPqCentroids + codes[s]) * dsub,
                size_t(dsub) * sizeof(Out));
}

template <typename Out>
M3_ALWAYS_INLINE void dequantize_pq_vector(Out* out, const uint8_t* codes, const Out* cb, int D, int dsub) {
  switch (dsub) {
    case 2: return dequantize_pq_vector<2>(out, codes, cb, D, dsub);
    case 4: return dequantize_pq_vector<4>(out, codes, cb, D, dsub);
    case 8: return dequantize_pq_vector<8>(out, codes, cb, D, dsub);
    case 16: return dequantize_pq_vector<16>(out, codes, cb, D, dsub);
    default: return dequantize_pq_vector<0>(out, codes, cb, D, dsub);
  }
}

// ---------------------------------------------------------------- drivers

// Work items of quantize_memory: vectors for int8 and int4, tiles of 16 vectors of one
// head for pq.
inline int64_t quantize_items(Codec codec, const QuantizeParams& p) {
  if (codec != Codec::pq) return p.N * p.Hkv * p.M;
  return p.Hkv * ((p.N * p.M + kPqLanes - 1) / kPqLanes);
}

// Items [i0, i1) of x, T its element type.
template <typename T>
M3_ALWAYS_INLINE void quantize_range(Codec codec, const QuantizeParams& p, int64_t i0, int64_t i1) {
  const T* x = static_cast<const T*>(p.x);
  if (codec == Codec::pq) {
    const int64_t tiles_per_head = (p.N * p.M + kPqLanes - 1) / kPqLanes;
    std::vector<float> xs(size_t(p.dsub) * kPqLanes);
    for (int64_t t = i0; t < i1; ++t)
      quantize_pq_tile<T>(p, t / tiles_per_head, t % tiles_per_head * kPqLanes, xs.data());
    return;
  }
  const int groups = (p.D + kInt4Group - 1) / kInt4Group;
  std::vector<float> v(p.D);  // the vector upcast to float32 (the reference's x.float())
  for (int64_t r = i0; r < i1; ++r) {
    for (int d = 0; d < p.D; ++d) v[d] = load_as<float>(x[r * p.D + d]);
    if (codec == Codec::int8)
      quantize_int8_vector(static_cast<int8_t*>(p.codes) + r * p.D, p.meta + r, v.data(), p.D);
    else
      quantize_int4_vector(static_cast<uint8_t*>(p.codes) + r * (p.D / 2), p.meta + r * groups * 2, v.data(), p.D);
  }
}

// Output rows [r0, r1) (one memory each: Hkv * M vectors), Out the output element type.
template <typename Out>
M3_ALWAYS_INLINE void dequantize_rows(Codec codec, const DequantizeParams& p, int64_t r0, int64_t r1) {
  const int64_t vectors = p.Hkv * p.M;
  const int groups = (p.D + kInt4Group - 1) / kInt4Group;
  // Codes and meta per vector, by codec.
  const int64_t code_len = codec == Codec::int8 ? p.D : codec == Codec::int4 ? p.D / 2 : p.D / p.dsub;
  const int64_t meta_len = codec == Codec::int8 ? 1 : 2 * groups;
  for (int64_t r = r0; r < r1; ++r) {
    Out* out = static_cast<Out*>(p.out) + r * vectors * p.D;
    const int64_t id = p.ids ? p.ids[r] : r;
    if (id < 0) {
      zero_row(out, vectors * p.D);
      continue;
    }
    const int64_t codes0 = id * p.codes_stride_n, meta0 = id * p.meta_stride_n;
    for (int64_t t = 0; t < vectors; ++t, out += p.D) {
      const int64_t c = codes0 + t * code_len;
      switch (codec) {
        case Codec::int8:
          dequantize_int8_vector(out, static_cast<const int8_t*>(p.codes) + c, p.meta[meta0 + t], p.D);
          break;
        case Codec::int4:
          dequantize_int4_vector(out, static_cast<const uint8_t*>(p.codes) + c, p.meta + meta0 + t * meta_len, p.D);
          break;
        case Codec::pq: {
          const Out* cb = static_cast<const Out*>(p.codebook) + t / p.M * p.D * kPqCentroids;
          dequantize_pq_vector(out, static_cast<const uint8_t*>(p.codes) + c, cb, p.D, p.dsub);
          break;
        }
      }
    }
  }
}

}  // namespace memory3::cpu
