// Row ids of the CPU gather/decode launchers (gather_memory, dequantize_memory).
#pragma once

#include <ATen/ATen.h>

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

}  // namespace memory3
