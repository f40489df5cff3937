// CPU launcher of memory_attention, backward: one pass over (sequence, KV head[, part]) items
// (FlashAttention-2's loop: dk/dv per key block, dq accumulated per item), one pass summing
// each item's dq parts, and the per-slot memory grads added into the bank rows by id.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "memory_attention_launch.h"

namespace memory3 {
namespace {

using namespace cpu_launch;
using cpu::MemoryAttentionCpu;

M3_CPU_MULTIVERSION void run_backward_pass(const PassArgs& a, WorkQueue& queue) {
  dispatch_types(a.elem, a.int8, [&](auto t, auto mt, auto acc) M3_LAMBDA_INLINE {
    const MemoryAttentionBwdParams& g = *a.g;
    const cpu::BackwardScratch& w = *a.scratch;
    MemoryAttentionCpu<decltype(t), decltype(mt), decltype(acc)> kernel(g, a.block_q);
    int64_t i;
    if (a.merge) {  // dq of each (sequence, KV head) from its parts
      while (queue.pop(i)) kernel.backward_finish_dq(g, w, int(i / g.Hkv), int(i % g.Hkv));
      return;
    }
    while (queue.pop(i)) {
      const int64_t item = i / w.parts;
      kernel.backward_item(g, w, int(item / g.Hkv), int(item % g.Hkv), int(i % w.parts));
    }
  });
}

// Adds the per-slot memory grads [B, C, R, 2, Hkv, M, D] into g.dmem_k / g.dmem_v by id. The
// threads split the elements of a bank row ([Hkv, M, D]); each element sums its slots in slot
// order, so the result is the same at any thread count.
template <typename Acc>
void reduce_memory_grads(const at::Tensor& slots, const at::Tensor& mem_ids, const MemoryAttentionBwdParams& g) {
  const int64_t n_slots = slots.size(0) * slots.size(1) * slots.size(2);
  const int64_t row = slots.size(4) * slots.size(5) * slots.size(6);  // Hkv * M * D
  const Acc* src = slots.data_ptr<Acc>();
  const int32_t* ids = mem_ids.data_ptr<int32_t>();
  Acc* dk = static_cast<Acc*>(g.dmem_k);
  Acc* dv = static_cast<Acc*>(g.dmem_v);
  parallel_ranges(row, 1024, [&](int64_t e0, int64_t e1) {
    for (int64_t slot = 0; slot < n_slots; ++slot) {
      const int64_t id = ids[slot];
      if (id < 0) continue;
      const Acc* gk = src + slot * 2 * row;
      const Acc* gv = gk + row;
      Acc* tk = dk + id * row;
      Acc* tv = dv + id * row;
      for (int64_t e = e0; e < e1; ++e) tk[e] += gk[e], tv[e] += gv[e];
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_attention_backward_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& mem_ids,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kv_lens, int64_t chunk_size,
    int64_t chunk_start, double scale, const std::optional<at::Tensor>& mem_k_scale,
    const std::optional<at::Tensor>& mem_v_scale, bool mem_grad) {
  Prepared in = prepare(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, scale,
                        mem_k_scale, mem_v_scale);
  const auto& s = in.shape;
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "dout and out must have the dtype of q (", q.scalar_type(), ")");
  const std::vector<int64_t> stat_shape{s.B, s.Hq, s.T};
  TORCH_CHECK(lse.sizes() == stat_shape && lse.scalar_type() == at::kFloat, "lse must be float32 [B, Hq, T] = ",
              stat_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
  if (dlse) TORCH_CHECK(dlse->sizes() == stat_shape && dlse->scalar_type() == at::kFloat,
                        "dlse must be float32 [B, Hq, T]");
  TORCH_CHECK(!(mem_grad && s.int8_bank), "memory_attention: an int8 bank has no gradient (mem_grad=True)");

  const at::ScalarType acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  std::optional<at::Tensor> dlse_c = dlse ? std::optional<at::Tensor>(dlse->contiguous()) : std::nullopt;
  at::Tensor dq = at::empty({s.B, s.T, s.Hq, s.D}, q.options());
  // Every row of dk, dv is written by the kernel (rows past kv_lens as zeros).
  at::Tensor dk = at::empty({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor dv = at::empty({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor slots, acc_k, acc_v;  // per-slot memory grads; the bank grads, in Acc
  if (mem_grad) {
    slots = at::zeros({s.B, s.C, s.R, 2, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));
    acc_k = at::zeros({s.N, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));
    acc_v = at::zeros_like(acc_k);
  }

  MemoryAttentionBwdParams g{};
  static_cast<MemoryAttentionParams&>(g) = make_params(s, in.q, in.k, in.v, in.mem_k, in.mem_v, in.mem_ids,
                                                        in.kv_lens, chunk_size, chunk_start, scale, in.mks, in.mvs);
  g.out = out_c.data_ptr();
  g.lse = lse_c.data_ptr<float>();
  g.dout = dout_c.data_ptr();
  g.dlse = dlse_c ? dlse_c->data_ptr<float>() : nullptr;
  g.dq = dq.data_ptr(), g.dk = dk.data_ptr(), g.dv = dv.data_ptr();
  g.dmem_k = mem_grad ? acc_k.data_ptr() : nullptr;
  g.dmem_v = mem_grad ? acc_v.data_ptr() : nullptr;
  // Work items: (sequence, KV head), each cut into `parts` (round robin over its key blocks)
  // when there are fewer of them than threads; then each part accumulates its own dQ in
  // scratch, summed by a second pass. One part writes dq itself.
  const int64_t bh = s.B * s.Hkv, threads = at::get_num_threads();
  const int parts = int(std::max<int64_t>(1, std::min<int64_t>((threads + bh - 1) / bh,
                                                               (s.S + cpu::kKeyBlock - 1) / cpu::kKeyBlock)));
  const int G = int(s.Hq / s.Hkv);
  const int64_t part_elems = acc_type == at::kDouble ? cpu::dq_part_elems<double>(int(s.T), G, int(s.D), in.block_q)
                                                     : cpu::dq_part_elems<float>(int(s.T), G, int(s.D), in.block_q);
  at::Tensor dq_parts;
  if (parts > 1) dq_parts = at::zeros({bh * parts * part_elems}, q.options().dtype(acc_type));
  const cpu::BackwardScratch scratch{parts > 1 ? dq_parts.data_ptr() : nullptr,
                                     mem_grad ? slots.data_ptr() : nullptr, parts};

  PassArgs args{&g, float_type_of(q.scalar_type(), "q"), s.int8_bank, in.block_q, &g, &scratch};
  parallel_pass(run_backward_pass, args, bh * parts);
  if (parts > 1) {
    args.merge = true;
    parallel_pass(run_backward_pass, args, bh);
  }
  at::Tensor dmem_k = at::empty({0}, q.options()), dmem_v = at::empty({0}, q.options());
  if (mem_grad) {
    if (acc_type == at::kDouble) reduce_memory_grads<double>(slots, in.mem_ids, g);
    else reduce_memory_grads<float>(slots, in.mem_ids, g);
    dmem_k = acc_k.to(mem_k.scalar_type());
    dmem_v = acc_v.to(mem_k.scalar_type());
  }
  return {dq, dk, dv, dmem_k, dmem_v};
}

}  // namespace memory3
