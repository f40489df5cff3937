// CPU launcher of memory_attention, forward: the ISA-multiversioned worker over work items
// of include/memory3/memory_attention.h, and the op's CPU registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <numeric>
#include <tuple>
#include <type_traits>

#include "cuda/env_choice.h"
#include "memory_attention_launch.h"
#include "memory3/cpu_bf16.h"

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

// Decode (T == 1): one item per sequence and context part, every KV head in it (float
// accumulation; double inputs go through the forward pass). With parts > 1 a second pass
// merges each sequence's parts.
template <typename T, typename MT, bool kDotBf16>
M3_ALWAYS_INLINE void decode_items(const PassArgs& a, WorkQueue& queue) {
  const MemoryAttentionParams& p = *a.p;
  MemoryAttentionCpu<T, MT, float, kDotBf16> kernel(p, 1);
  int64_t i;
  while (queue.pop(i)) {
    const int64_t b = a.merge ? i : i / a.parts, part = a.merge ? 0 : i % a.parts;
    const int64_t slot = b * a.parts + part;
    float* o = a.parts > 1 ? a.split_o + slot * p.Hq * p.D : nullptr;
    float* m = a.parts > 1 ? a.split_m + slot * p.Hq : nullptr;
    float* l = a.parts > 1 ? a.split_l + slot * p.Hq : nullptr;
    if (a.merge) kernel.merge_decode(int(b), a.parts, o, m, l);
    else kernel.decode_item(int(b), int(part), a.parts, o, m, l);
  }
}

M3_CPU_MULTIVERSION void run_decode_pass(const PassArgs& a, WorkQueue& queue) {
  dispatch_types(a.elem, a.int8, [&](auto t, auto mt, auto acc) M3_LAMBDA_INLINE {
    if constexpr (std::is_same_v<decltype(acc), float>) decode_items<decltype(t), decltype(mt), false>(a, queue);
  });
}

#if M3_CPU_BF16_DOT
// bf16 decode with the context scores on the bf16 dot-product unit: compiled for
// AVX512-BF16, called only when the CPU has it (use_bf16_dot). The prefill stays on the
// float GEMM: its S^T = K Q^T on vdpbf16ps ran slower here (17.2 against 14.1 ms, B=4,
// T=512, one core: the unit's bf16 pairs give no more multiply-adds per cycle than two
// float FMA ports), so only the decode, bound by its reads, gains from reading K as bf16.
M3_CPU_BF16_TARGET void run_decode_pass_bf16_dot(const PassArgs& a, WorkQueue& queue) {
  if (a.int8) decode_items<bf16_t, int8_t, true>(a, queue);
  else decode_items<bf16_t, bf16_t, true>(a, queue);
}
#endif

// Whether bf16 inputs take the bf16 dot-product workers: when the CPU has AVX512-BF16, unless
// MEMORY3_CPU_BF16=off, which forces the float path (how the tests run the fallback on a CPU
// that has the unit). An unknown value is an error naming the variable.
bool use_bf16_dot(at::ScalarType dtype) {
  const bool wanted = env_choice("MEMORY3_CPU_BF16", {"auto", "off"}, "auto") == "auto";
#if M3_CPU_BF16_DOT
  static const bool cpu_has_it = __builtin_cpu_supports("avx512bf16");
  return wanted && cpu_has_it && dtype == at::kBFloat16;
#else
  return false;
#endif
}

// Context parts per decode sequence: enough that every thread gets the same number of items
// (B * parts a multiple of the thread count) unless there are plenty of sequences; whole key
// blocks each.
int64_t decode_parts(int64_t B, int64_t S, int64_t threads) {
  if (B >= 4 * threads) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads / std::gcd(B, threads), S / cpu::kKeyBlock));
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
  [[maybe_unused]] const bool bf16_dot = use_bf16_dot(q.scalar_type());
  if (s.T == 1 && s.B > 0 && q.scalar_type() != at::kDouble) {
    args.parts = int(decode_parts(s.B, s.S, at::get_num_threads()));
    at::Tensor scratch;
    if (args.parts > 1) {
      const int64_t rows = s.B * args.parts * s.Hq;
      scratch = at::empty({rows * (s.D + 2)}, q.options().dtype(at::kFloat));
      args.split_o = scratch.data_ptr<float>(), args.split_m = args.split_o + rows * s.D;
      args.split_l = args.split_m + rows;
    }
    PassWorker decode = run_decode_pass;
#if M3_CPU_BF16_DOT
    if (bf16_dot) decode = run_decode_pass_bf16_dot;
#endif
    parallel_pass(decode, args, s.B * args.parts);
    if (args.parts > 1) {
      args.merge = true;
      parallel_pass(decode, args, s.B);
    }
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
