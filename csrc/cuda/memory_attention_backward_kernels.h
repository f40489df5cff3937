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

// The tensor-core backward (include/memory3/prefill_backward.cuh), bf16/fp16 at head dims 32,
// 64, 80, 96, 128 with the alignment of prefill_supports (memory_attention_prefill.h) and dout
// 16-byte aligned. delta: float [B, Hq, T]; mem_slots: float [B, C, R, 2, Hkv, M, D] when
// g.dmem_k is set (then add them with launch_reduce_memory_grads). Returns false (launching
// nothing) for a head dim it lacks.
bool launch_prefill_backward_bf16(const MemoryAttentionBwdParams& g, bool int8_bank, float* delta, float* mem_slots,
                                  cudaStream_t stream);
bool launch_prefill_backward_fp16(const MemoryAttentionBwdParams& g, bool int8_bank, float* delta, float* mem_slots,
                                  cudaStream_t stream);

// dmem_k/dmem_v (float, zero-filled) += the per-slot grads, slot by slot in (b, c, r) order.
void launch_reduce_memory_grads(const MemoryAttentionBwdParams& g, const float* mem_slots, cudaStream_t stream);

}  // namespace memory3
