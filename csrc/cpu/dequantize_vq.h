// The CPU launcher of dequantize_memory(codes, meta, "vq"), called by the dequantize_memory
// op (csrc/cpu/quantize_memory.cpp) for codec vq. Torch glue; the kernel is memory3/vq.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memory3 {

// codes uint8 [N, Hkv, M, code_size]; meta float32 [1 + D + 2^coarse_bits + 2^pq_bits, D]
// (python/memory3/vq.py); ids int32/int64 any shape or none; out [*ids | N, Hkv, M, D].
at::Tensor dequantize_vq_cpu(const at::Tensor& codes, const at::Tensor& meta, const std::optional<at::Tensor>& ids,
                             std::optional<at::ScalarType> out_dtype);

}  // namespace memory3
