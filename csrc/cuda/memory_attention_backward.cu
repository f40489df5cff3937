// CUDA launcher of memory_attention_backward and its registration for the CUDA dispatch key.
// bf16/fp16 at head dims 32, 64, 80, 96, 128 with 16-byte aligned rows: the tensor-core
// backward (include/memory3/prefill_backward.cuh). Everything else (float32, float64, other
// head dims up to 256, unaligned rows), or MEMORY3_CUDA_BACKWARD=simt: the CUDA-core backward
// (include/memory3/memory_attention_backward.cuh). Both are deterministic.
//
// Data checks. The backward reads the ids and kv_lens its forward was called with, and the
// forward checked them (csrc/cuda, params.h's range-check plan); the kernels still never read
// past the bank or the context: an id outside [0, N) is an empty slot and a kv_lens value
// outside [0, S] an empty sequence.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"
#include "env_choice.h"
#include "memory_attention_backward_kernels.h"
#include "memory_attention_prefill.h"

namespace memory3 {
namespace {

BackwardDtype backward_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return BackwardDtype::f32;
    case at::kDouble: return BackwardDtype::f64;
    case at::kBFloat16: return BackwardDtype::bf16;
    case at::kHalf: return BackwardDtype::f16;
    default: TORCH_CHECK(false, "q must be float32/float64/bfloat16/float16, got ", t);
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// MEMORY3_CUDA_BACKWARD=simt forces the CUDA-core backward (a cross-check of the tensor-core one).
bool tensor_core_backward_allowed() {
  return memory3::env_choice("MEMORY3_CUDA_BACKWARD", {"tensor_core", "simt"}, "tensor_core") != "simt";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_attention_backward_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& mem_ids,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kv_lens, int64_t chunk_size,
    int64_t chunk_start, double scale, const std::optional<at::Tensor>& mem_k_scale,
    const std::optional<at::Tensor>& mem_v_scale, bool mem_grad) {
  const AttentionShape s = check_memory_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start,
                                                  mem_k_scale, mem_v_scale);
  TORCH_CHECK(q.is_cuda(), "memory_attention_backward (CUDA kernel): q must be on a CUDA device, got ", q.device());
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "dout and out must have the dtype of q (", q.scalar_type(), ")");
  const std::vector<int64_t> stat_shape{s.B, s.Hq, s.T};
  TORCH_CHECK(lse.sizes() == stat_shape && lse.scalar_type() == at::kFloat, "lse must be float32 [B, Hq, T] = ",
              stat_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
  if (dlse) TORCH_CHECK(dlse->sizes() == stat_shape && dlse->scalar_type() == at::kFloat,
                        "dlse must be float32 [B, Hq, T]");
  for (const auto* t : {&dout, &out, &lse}) check_same_device(q, *t, t == &dout ? "dout" : t == &out ? "out" : "lse");
  if (dlse) check_same_device(q, *dlse, "dlse");
  TORCH_CHECK(!(mem_grad && s.int8_bank), "memory_attention: an int8 bank has no gradient (mem_grad=True)");
  TORCH_CHECK(s.D <= kBackwardMaxD, "memory_attention_backward (CUDA kernel): head dim D=", s.D,
              " is more than the ", kBackwardMaxD, " it serves");

  const c10::cuda::CUDAGuard guard(q.device());
  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qc = last_dim_contiguous(q), kc = last_dim_contiguous(k), vc = last_dim_contiguous(v);
  const at::Tensor mkc = last_dim_contiguous(mem_k), mvc = last_dim_contiguous(mem_v);
  const at::Tensor ids = mem_ids.to(at::kInt).contiguous();
  const std::optional<at::Tensor> lens =
      kv_lens ? std::optional<at::Tensor>(kv_lens->to(at::kInt).contiguous()) : std::nullopt;
  const std::optional<at::Tensor> mks =
      mem_k_scale ? std::optional<at::Tensor>(mem_k_scale->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> mvs =
      mem_v_scale ? std::optional<at::Tensor>(mem_v_scale->contiguous()) : std::nullopt;
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const std::optional<at::Tensor> dlse_c = dlse ? std::optional<at::Tensor>(dlse->contiguous()) : std::nullopt;

  // Every element of dq, dk, dv, delta and the slots is written by the kernels.
  at::Tensor dq = at::empty({s.B, s.T, s.Hq, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor dv = at::empty({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor delta = at::empty({s.B, s.Hq, s.T}, q.options().dtype(acc_type));
  at::Tensor slots, acc_k, acc_v;
  if (mem_grad) {
    slots = at::empty({s.B, s.C, s.R, 2, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));
    acc_k = at::zeros({s.N, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));
    acc_v = at::zeros_like(acc_k);
  }

  MemoryAttentionBwdParams g{};
  g.q = qc.data_ptr();
  g.q_stride_b = qc.stride(0), g.q_stride_t = qc.stride(1), g.q_stride_h = qc.stride(2);
  g.k = kc.data_ptr();
  g.k_stride_b = kc.stride(0), g.k_stride_s = kc.stride(1), g.k_stride_h = kc.stride(2);
  g.v = vc.data_ptr();
  g.v_stride_b = vc.stride(0), g.v_stride_s = vc.stride(1), g.v_stride_h = vc.stride(2);
  g.mem_k = mkc.data_ptr();
  g.mk_stride_n = mkc.stride(0), g.mk_stride_h = mkc.stride(1), g.mk_stride_m = mkc.stride(2);
  g.mem_v = mvc.data_ptr();
  g.mv_stride_n = mvc.stride(0), g.mv_stride_h = mvc.stride(1), g.mv_stride_m = mvc.stride(2);
  g.mem_k_scale = mks ? mks->data_ptr<float>() : nullptr;
  g.mem_v_scale = mvs ? mvs->data_ptr<float>() : nullptr;
  g.mem_ids = ids.data_ptr<int32_t>();
  g.kv_lens = lens ? lens->data_ptr<int32_t>() : nullptr;
  g.out = out_c.data_ptr();
  g.lse = lse_c.data_ptr<float>();
  g.B = int(s.B), g.T = int(s.T), g.S = int(s.S), g.Hq = int(s.Hq), g.Hkv = int(s.Hkv), g.D = int(s.D);
  g.N = int(s.N), g.M = int(s.M), g.C = int(s.C), g.R = int(s.R);
  g.chunk_size = int(chunk_size), g.chunk_start = int(chunk_start);
  g.scale = scale;
  g.dout = dout_c.data_ptr();
  g.dlse = dlse_c ? dlse_c->data_ptr<float>() : nullptr;
  g.dq = dq.data_ptr(), g.dk = dk.data_ptr(), g.dv = dv.data_ptr();
  g.dmem_k = mem_grad ? acc_k.data_ptr() : nullptr;
  g.dmem_v = mem_grad ? acc_v.data_ptr() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool half = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  const bool tensor_cores = half && tensor_core_backward_allowed() && prefill_supports(g, s.int8_bank) &&
                            reinterpret_cast<uintptr_t>(g.dout) % 16 == 0;
  bool launched = false;
  if (tensor_cores) {  // float delta and slots: Acc is float for bf16/fp16
    float* d = delta.data_ptr<float>();
    float* sl = mem_grad ? slots.data_ptr<float>() : nullptr;
    launched = q.scalar_type() == at::kBFloat16 ? launch_prefill_backward_bf16(g, s.int8_bank, d, sl, stream)
                                                : launch_prefill_backward_fp16(g, s.int8_bank, d, sl, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (launched && mem_grad) {
      launch_reduce_memory_grads(g, sl, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (!launched) {
    launch_memory_attention_backward(g, backward_dtype(q.scalar_type()), s.int8_bank, delta.data_ptr(),
                                     mem_grad ? slots.data_ptr() : nullptr, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor dmem_k = at::empty({0}, q.options()), dmem_v = at::empty({0}, q.options());
  if (mem_grad) dmem_k = acc_k.to(mem_k.scalar_type()), dmem_v = acc_v.to(mem_k.scalar_type());
  return {dq, dk, dv, dmem_k, dmem_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CUDA, m) { m.impl("memory_attention_backward", &memory_attention_backward_cuda); }

}  // namespace memory3
