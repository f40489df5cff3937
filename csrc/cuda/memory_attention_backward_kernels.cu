// Instantiations of the CUDA-core backward (include/memory3/memory_attention_backward.cuh) for
// every dtype and bank type, behind one torch-free entry point.
#include "memory3/memory_attention_backward.cuh"
#include "memory_attention_backward_kernels.h"

namespace memory3 {

static_assert(kBackwardMaxD == backward::kMaxD);

bool launch_memory_attention_backward(const MemoryAttentionBwdParams& g, BackwardDtype dtype, bool int8_bank,
                                      void* delta, void* mem_slots, cudaStream_t stream) {
  using namespace backward;
  if (g.D > kMaxD) return false;
  const BackwardScratch w{delta, mem_slots};
  switch (dtype) {
    case BackwardDtype::f32:
      int8_bank ? launch_backward<float, int8_t, float>(g, w, stream) : launch_backward<float, float, float>(g, w, stream);
      return true;
    case BackwardDtype::f64:
      int8_bank ? launch_backward<double, int8_t, double>(g, w, stream)
                : launch_backward<double, double, double>(g, w, stream);
      return true;
    case BackwardDtype::bf16:
      int8_bank ? launch_backward<__nv_bfloat16, int8_t, float>(g, w, stream)
                : launch_backward<__nv_bfloat16, __nv_bfloat16, float>(g, w, stream);
      return true;
    case BackwardDtype::f16:
      int8_bank ? launch_backward<__half, int8_t, float>(g, w, stream) : launch_backward<__half, __half, float>(g, w, stream);
      return true;
  }
  return false;
}

void launch_reduce_memory_grads(const MemoryAttentionBwdParams& g, const float* mem_slots, cudaStream_t stream) {
  const int64_t per_memory = int64_t(g.Hkv) * g.M * g.D;
  const int64_t slots = int64_t(g.B) * g.C * g.R;
  if (per_memory == 0 || slots == 0 || g.dmem_k == nullptr) return;
  const backward::BackwardScratch w{nullptr, const_cast<float*>(mem_slots)};
  backward::reduce_memory_grads_kernel<float>
      <<<dim3(unsigned((per_memory + 255) / 256)), dim3(256), 0, stream>>>(g, w);
}

}  // namespace memory3
