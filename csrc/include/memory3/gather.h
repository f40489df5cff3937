// gather_memory on the CPU: copy rows of a memory bank by id into a dense tensor,
// converting or dequantizing (int8 x per-token scale) on the way. Torch-free.
//
// A row is one memory: its Hkv x M x D block, contiguous in the bank (the bank itself may
// have any stride between memories, e.g. one layer sliced out of a bigger tensor). Rows of
// a float bank copied to their own dtype are a single memcpy; everything else is a flat
// loop over the row that the compiler vectorizes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "memory3/numeric.h"
#include "memory3/params.h"
#include "memory3/quant.h"

namespace memory3::cpu {

// One row of a float bank, converted through Acc (float, or double for a double output:
// the same two roundings as the reference's x.to(Acc).to(Out)).
template <typename T, typename Out, typename Acc>
M3_ALWAYS_INLINE void copy_row(Out* __restrict out, const T* __restrict src, int64_t n) {
  if constexpr (std::is_same_v<T, Out>) {
    std::memcpy(static_cast<void*>(out), static_cast<const void*>(src), size_t(n) * sizeof(T));
  } else {
    for (int64_t e = 0; e < n; ++e) out[e] = store_as<Out>(load_as<Acc>(src[e]));
  }
}

// Rows [r0, r1) of both sides. T is the bank's element type (int8_t for a quantized bank),
// Out the output's, Acc the type conversions go through.
template <typename T, typename Out, typename Acc>
M3_ALWAYS_INLINE void gather_rows(const GatherParams& p, int64_t r0, int64_t r1) {
  const int64_t row = p.vectors * p.D;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = p.ids[r];
    for (int side = 0; side < 2; ++side) {
      const BankRows& bank = side == 0 ? p.k : p.v;
      Out* out = static_cast<Out*>(side == 0 ? p.out_k : p.out_v) + r * row;
      if (id < 0) {
        zero_row(out, row);
        continue;
      }
      const T* src = static_cast<const T*>(bank.data) + id * bank.stride_n;
      if constexpr (std::is_same_v<T, int8_t>) {
        const float* scale = bank.scale + id * bank.scale_stride_n;
        for (int64_t t = 0; t < p.vectors; ++t)
          dequantize_int8_vector<Out, Acc>(out + t * p.D, src + t * p.D, scale[t], p.D);
      } else {
        copy_row<T, Out, Acc>(out, src, row);
      }
    }
  }
}

}  // namespace memory3::cpu
