// CPU launcher of memory_attention, forward: the ISA-multiversioned worker over work items
// of include/memory3/memory_attention.h, and the op's CPU registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "memory_attention_launch.h"

namespace memory3 {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_attention_backward_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& mem_k, const at::Tensor& mem_v, const at::Tensor& mem_ids,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kv_lens, int64_t chunk_size,
    int64_t chunk_start, double scale, const std::optional<at::Tensor>& mem_k_scale,
    const std::optional<at::Tensor>& mem_v_scale, bool mem_grad);

namespace {

using namespace cpu_launch;
using cpu::MemoryAttentionCpu;

// Compiled once per ISA level; all kernel code it reaches is inlined into it.
M3_CPU_MULTIVERSION void run_forward_pass(const PassArgs& a, WorkQueue& queue) {
  dispatch_types(a.elem, a.int8, [&](auto t, auto mt, auto acc) M3_LAMBDA_INLINE {
    const MemoryAttentionParams& p = *a.p;
    MemoryAttentionCpu<decltype(t), decltype(mt), decltype(acc)> kernel(p, a.block_q);
    const int64_t bh = int64_t(p.B) * p.Hkv;
    const int nqb = (p.T + a.block_q - 1) / a.block_q;
    int64_t i;
    while (queue.pop(i)) {  // heaviest first: the last query blocks see the longest context
      const int qb = nqb - 1 - int(i / bh), b = int(i % bh / p.Hkv), kvh = int(i % p.Hkv);
      kernel.forward_item(b, kvh, qb * a.block_q);
    }
  });
}

// Decode with fewer (sequence, KV head) items than threads: the context of each is cut into
// `parts` ranges computed as items of their own, then merged (float accumulation only).
M3_CPU_MULTIVERSION void run_decode_split_pass(const PassArgs& a, WorkQueue& queue) {
  dispatch_types(a.elem, a.int8, [&](auto t, auto mt, auto acc) M3_LAMBDA_INLINE {
    if constexpr (std::is_same_v<decltype(acc), float>) {
      const MemoryAttentionParams& p = *a.p;
      MemoryAttentionCpu<decltype(t), decltype(mt), float> kernel(p, 1);
      const int64_t G = p.Hq / p.Hkv;
      int64_t i;
      while (queue.pop(i)) {
        const int64_t item = a.merge ? i : i / a.parts, part = a.merge ? 0 : i % a.parts;
        const int b = int(item / p.Hkv), kvh = int(item % p.Hkv);
        const int64_t slot = item * a.parts + part;
        float *o = a.split_o + slot * G * p.D, *m = a.split_m + slot * G, *l = a.split_l + slot * G;
        if (a.merge) kernel.merge_parts(b, kvh, a.parts, o, m, l);
        else kernel.forward_part(b, kvh, int(part), a.parts, o, m, l);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> memory_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mem_k,
    const at::Tensor& mem_v, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
    int64_t chunk_size, int64_t chunk_start, std::optional<double> scale,
    const std::optional<at::Tensor>& mem_k_scale, const std::optional<at::Tensor>& mem_v_scale) {
  Prepared in = prepare(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, scale,
                        mem_k_scale, mem_v_scale);
  const auto& s = in.shape;
  at::Tensor out = at::empty({s.B, s.T, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.T}, q.options().dtype(at::kFloat));
  MemoryAttentionParams p = make_params(s, in.q, in.k, in.v, in.mem_k, in.mem_v, in.mem_ids, in.kv_lens,
                                        chunk_size, chunk_start, in.scale, in.mks, in.mvs);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int64_t nqb = (s.T + in.block_q - 1) / in.block_q;
  PassArgs args{&p, float_type_of(q.scalar_type(), "q"), s.int8_bank, in.block_q};
  const int64_t items = s.B * s.Hkv, threads = at::get_num_threads();
  if (s.T == 1 && items < threads && s.S >= 2 * cpu::kKeyBlock && q.scalar_type() != at::kDouble) {
    args.parts = int(std::min<int64_t>((2 * threads + items - 1) / items, s.S / cpu::kKeyBlock));
    const int64_t rows = items * args.parts * (s.Hq / s.Hkv);
    at::Tensor scratch = at::empty({rows * (s.D + 2)}, q.options().dtype(at::kFloat));
    args.split_o = scratch.data_ptr<float>(), args.split_m = args.split_o + rows * s.D;
    args.split_l = args.split_m + rows;
    parallel_pass(run_decode_split_pass, args, items * args.parts);
    args.merge = true;
    parallel_pass(run_decode_split_pass, args, items);
    return {out, lse};
  }
  parallel_pass(run_forward_pass, args, nqb * s.B * s.Hkv);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CPU, m) {
  m.impl("memory_attention", &memory_attention_cpu);
  m.impl("memory_attention_backward", &memory_attention_backward_cpu);
}

}  // namespace memory3
