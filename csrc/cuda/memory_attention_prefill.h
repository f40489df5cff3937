// The tensor-core prefill kernel of memory_attention (include/memory3/prefill_attention.cuh),
// as the CUDA launcher of memory_attention calls it. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include "memory3/params.h"

namespace memory3 {

enum class PrefillDtype { bf16, fp16 };

// True when the kernel serves this call: head dim 32, 64, 80, 96 or 128; every row of q, k, v and
// the bank 16-byte aligned (pointers and strides); out and lse contiguous as params.h says;
// mem_ids and kv_lens already checked on the host (ids in [-1, N), kv_lens in [0, S], the
// table covering every query).
bool prefill_supports(const MemoryAttentionParams& p, bool int8_bank);

// Launches the kernel on `stream` when prefill_supports(p, int8_bank), and returns whether it
// did (false: the caller runs its fallback). Launch errors are left for cudaGetLastError.
// P enters P V rounded to bf16/fp16 as in FlashAttention (one MMA, prefill_attention.cuh) unless
// MEMORY3_PREFILL_P=exact (two terms, two MMAs: within the float32-accumulation cap).
bool launch_memory_attention_prefill(const MemoryAttentionParams& p, PrefillDtype dtype, bool int8_bank,
                                     cudaStream_t stream);

// One translation unit per dtype (compile time).
bool launch_prefill_bf16(const MemoryAttentionParams& p, bool int8_bank, bool exact_p, cudaStream_t stream);
bool launch_prefill_fp16(const MemoryAttentionParams& p, bool int8_bank, bool exact_p, cudaStream_t stream);

}  // namespace memory3
