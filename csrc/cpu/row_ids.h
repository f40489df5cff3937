// Row ids of the CPU gather/decode launchers (gather_memory, dequantize_memory).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace memory3 {

// ids of any shape (int32/int64, on the CPU) flattened to int64, each checked in [-1, N).
// `op` names the op in the device error.
inline at::Tensor flat_cpu_ids(const at::Tensor& ids, int64_t N, const char* op) {
  TORCH_CHECK(is_index_dtype(ids.scalar_type()), "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.device().is_cpu(), op, " (CPU kernel): ids must be on the CPU, got ", ids.device());
  at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  check_ids_in_range(flat.data_ptr<int64_t>(), flat.numel(), N, "ids");
  return flat;
}

// What a dequantize_memory decode writes: every row of codes [N, Hkv, M, *] or, with ids, the
// rows ids (flat_ids, checked); out is [N or *ids.shape, Hkv, M, D] of out_type.
struct DecodeRows {
  at::Tensor flat_ids;  // undefined without ids
  at::Tensor out;
};

inline DecodeRows decode_rows(const at::Tensor& codes, const std::optional<at::Tensor>& ids, int64_t D,
                              at::ScalarType out_type) {
  const int64_t N = codes.size(0);
  DecodeRows rows;
  std::vector<int64_t> out_shape{N};
  if (ids) {
    rows.flat_ids = flat_cpu_ids(*ids, N, "dequantize_memory");
    out_shape = ids->sizes().vec();
  }
  out_shape.insert(out_shape.end(), {codes.size(1), codes.size(2), D});
  rows.out = at::empty(out_shape, codes.options().dtype(out_type));
  return rows;
}

}  // namespace memory3
