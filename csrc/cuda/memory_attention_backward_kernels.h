// The CUDA backward of memory_attention as its torch launcher calls it. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include "memory3/params.h"

namespace memory3 {

enum class BackwardDtype { f32, f64, bf16, f16 };

// Head dims the CUDA backward serves (memory3::backward::kMaxD).
constexpr int kBackwardMaxD = 256;

// Runs dq, dk, dv (and dmem_k, dmem_v into g's Acc buffers when g.dmem_k is set) on
// `stream`. Scratch: delta [B, Hq, T] Acc; mem_slots [B, C, R, 2, Hkv, M, D] Acc (only with
// dmem_k). dmem_k/dmem_v must be zero-filled; dq, dk, dv are written in full. Returns false
// (launching nothing) when D > kBackwardMaxD; launch errors are left for cudaGetLastError.
bool launch_memory_attention_backward(const MemoryAttentionBwdParams& g, BackwardDtype dtype, bool int8_bank,
                                      void* delta, void* mem_slots, cudaStream_t stream);

}  // namespace memory3
