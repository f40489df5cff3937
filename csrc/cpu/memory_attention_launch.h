// Shared by the CPU forward and backward launchers of memory_attention: dtype dispatch, the
// work queue, data checks and the layout of the kernel parameters. Torch glue, not kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "thread_pool.h"
#include "memory3/memory_attention.h"

namespace memory3::cpu_launch {

using cpu::MemoryAttentionCpu;

// Calls f(T, MT, Acc) with the kernel types for (q dtype, int8 bank?).
template <typename F>
M3_ALWAYS_INLINE void dispatch_types(FloatType e, bool int8, F&& f) {
  switch (e) {
    case FloatType::f32: return int8 ? f(float{}, int8_t{}, float{}) : f(float{}, float{}, float{});
    case FloatType::f64: return int8 ? f(double{}, int8_t{}, double{}) : f(double{}, double{}, double{});
    case FloatType::bf16: return int8 ? f(bf16_t{}, int8_t{}, float{}) : f(bf16_t{}, bf16_t{}, float{});
    case FloatType::f16: return int8 ? f(fp16_t{}, int8_t{}, float{}) : f(fp16_t{}, fp16_t{}, float{});
  }
}

// What a pass's worker needs besides its work queue. A worker (one per launcher file) is
// compiled once per ISA level (M3_CPU_MULTIVERSION), with all the kernel code it reaches
// inlined into it; the backward runs two passes through one worker.

struct PassArgs {
  const MemoryAttentionParams* p;
  FloatType elem;
  bool int8;
  int block_q;
  const MemoryAttentionBwdParams* g = nullptr;   // backward only: p == g
  const cpu::BackwardScratch* scratch = nullptr;  // backward only
  // Split work (decode split over the context, backward parts): parts per (sequence, KV
  // head), the decode parts' o [G][D], m [G] and l [G], and whether this pass merges them.
  int parts = 0;
  float *split_o = nullptr, *split_m = nullptr, *split_l = nullptr;
  bool merge = false;
};

using PassWorker = void (*)(const PassArgs&, WorkQueue&);

// Runs `worker` on min(torch's intra-op thread count, items) threads sharing one queue
// (thread_pool.h: the calling thread plus helper threads of our own).
inline void parallel_pass(PassWorker worker, const PassArgs& args, int64_t items) {
  run_on_threads(items, [worker, &args](WorkQueue& queue) { worker(args, queue); });
}

// Data checks the CPU can afford, on the caller's values (int32 or int64) before they are
// narrowed to the kernels' int32: kv_lens within [0, S], ids within [-1, N), and a chunk
// table long enough for every sequence's last query.
template <typename Len>
void check_lens(const Len* lens, const AttentionShape& s, int64_t chunk_size, int64_t chunk_start) {
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t L = lens ? int64_t(lens[b]) : s.S;
    TORCH_CHECK(L >= 0 && L <= s.S, "kv_lens[", b, "] = ", L, " is outside [0, S=", s.S, "]");
    if (L - 1 >= chunk_start) {
      const int64_t need = (L - 1 - chunk_start) / chunk_size + 1;
      TORCH_CHECK(need <= s.C, "mem_ids has ", s.C, " chunks but sequence ", b, " (", L,
                  " tokens, chunk_start ", chunk_start, ", chunk_size ", chunk_size, ") needs ", need);
    }
  }
}

inline void check_data(const AttentionShape& s, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                       int64_t chunk_size, int64_t chunk_start) {
  if (!kv_lens) check_lens<int32_t>(nullptr, s, chunk_size, chunk_start);
  else if (kv_lens->scalar_type() == at::kLong) check_lens(kv_lens->data_ptr<int64_t>(), s, chunk_size, chunk_start);
  else check_lens(kv_lens->data_ptr<int32_t>(), s, chunk_size, chunk_start);
  if (mem_ids.scalar_type() == at::kLong)
    check_ids_in_range(mem_ids.data_ptr<int64_t>(), mem_ids.numel(), s.N, "mem_ids");
  else
    check_ids_in_range(mem_ids.data_ptr<int32_t>(), mem_ids.numel(), s.N, "mem_ids");
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline MemoryAttentionParams make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& mem_k, const at::Tensor& mem_v,
                                  const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                                  int64_t chunk_size, int64_t chunk_start, double scale,
                                  const std::optional<at::Tensor>& mks, const std::optional<at::Tensor>& mvs) {
  MemoryAttentionParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_t = q.stride(1), p.q_stride_h = q.stride(2);
  p.k = k.data_ptr();
  p.k_stride_b = k.stride(0), p.k_stride_s = k.stride(1), p.k_stride_h = k.stride(2);
  p.v = v.data_ptr();
  p.v_stride_b = v.stride(0), p.v_stride_s = v.stride(1), p.v_stride_h = v.stride(2);
  p.mem_k = mem_k.data_ptr();
  p.mk_stride_n = mem_k.stride(0), p.mk_stride_h = mem_k.stride(1), p.mk_stride_m = mem_k.stride(2);
  p.mem_v = mem_v.data_ptr();
  p.mv_stride_n = mem_v.stride(0), p.mv_stride_h = mem_v.stride(1), p.mv_stride_m = mem_v.stride(2);
  p.mem_k_scale = mks ? mks->data_ptr<float>() : nullptr;
  p.mem_v_scale = mvs ? mvs->data_ptr<float>() : nullptr;
  p.mem_ids = mem_ids.data_ptr<int32_t>();
  p.kv_lens = kv_lens ? kv_lens->data_ptr<int32_t>() : nullptr;
  p.B = int(s.B), p.T = int(s.T), p.S = int(s.S), p.Hq = int(s.Hq), p.Hkv = int(s.Hkv), p.D = int(s.D);
  p.N = int(s.N), p.M = int(s.M), p.C = int(s.C), p.R = int(s.R);
  p.chunk_size = int(chunk_size), p.chunk_start = int(chunk_start);
  p.scale = scale;
  return p;
}

// The inputs of one call, checked, validated and laid out for the kernel.
struct Prepared {
  AttentionShape shape;
  at::Tensor q, k, v, mem_k, mem_v, mem_ids;
  std::optional<at::Tensor> kv_lens, mks, mvs;
  double scale;
  int block_q;
};

inline Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mem_k,
                 const at::Tensor& mem_v, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                 int64_t chunk_size, int64_t chunk_start, std::optional<double> scale,
                 const std::optional<at::Tensor>& mks, const std::optional<at::Tensor>& mvs) {
  Prepared r;
  r.shape = check_memory_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, mks, mvs);
  TORCH_CHECK(q.device().is_cpu(), "memory_attention (CPU kernel): q must be on the CPU, got ", q.device());
  r.q = last_dim_contiguous(q), r.k = last_dim_contiguous(k), r.v = last_dim_contiguous(v);
  r.mem_k = last_dim_contiguous(mem_k), r.mem_v = last_dim_contiguous(mem_v);
  const at::Tensor ids = mem_ids.contiguous();
  const std::optional<at::Tensor> lens = kv_lens ? std::optional<at::Tensor>(kv_lens->contiguous()) : std::nullopt;
  check_data(r.shape, ids, lens, chunk_size, chunk_start);
  r.mem_ids = ids.to(at::kInt);  // in range now, so narrowing cannot wrap
  if (lens) r.kv_lens = lens->to(at::kInt);
  if (mks) r.mks = mks->contiguous(), r.mvs = mvs->contiguous();
  r.scale = scale.value_or(1.0 / std::sqrt(double(r.shape.D)));
  r.block_q = cpu::query_block_size(int(r.shape.T), int(r.shape.Hq / r.shape.Hkv));
  return r;
}

}  // namespace memory3::cpu_launch
