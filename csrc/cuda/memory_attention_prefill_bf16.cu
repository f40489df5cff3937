// The bf16 instantiations of the prefill kernel (head dims 32, 64, 80, 96, 128; float and int8 banks).
#include "memory3/prefill_attention.cuh"
#include "memory3/prefill_mma.cuh"
#include "memory_attention_prefill.h"

namespace memory3 {
bool launch_prefill_bf16(const MemoryAttentionParams& p, bool int8_bank, bool exact_p, cudaStream_t stream) {
  return prefill::launch_forward_dims<__nv_bfloat16>(p, int8_bank, exact_p, stream);
}
}  // namespace memory3
