// The bf16 instantiations of the tensor-core backward (include/memory3/prefill_backward.cuh).
#include "memory3/prefill_backward.cuh"
#include "memory_attention_backward_kernels.h"

namespace memory3 {
bool launch_prefill_backward_bf16(const MemoryAttentionBwdParams& g, bool int8_bank, float* delta, float* mem_slots,
                                  cudaStream_t stream) {
  return prefill::launch_backward_dims<__nv_bfloat16>(g, int8_bank, delta, mem_slots, stream);
}
}  // namespace memory3
