// CPU launcher of memory_attention (forward and backward): checks, data validation, the
// work list, and the ISA-multiversioned workers that run the kernels of
// include/memory3/memory_attention.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <tuple>

#include "checks.h"
#include "memory3/memory_attention.h"

namespace memory3 {
namespace {

using cpu::MemoryAttentionCpu;

enum class Elem { f32, f64, bf16, f16 };

Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Elem::f32;
    case at::kDouble: return Elem::f64;
    case at::kBFloat16: return Elem::bf16;
    case at::kHalf: return Elem::f16;
    default: TORCH_CHECK(false, "memory_attention: unsupported dtype ", t);
  }
}

// Calls f(T, MT, Acc) with the kernel types for (q dtype, int8 bank?).
template <typename F>
M3_ALWAYS_INLINE void dispatch_types(Elem e, bool int8, F&& f) {
  switch (e) {
    case Elem::f32: return int8 ? f(float{}, int8_t{}, float{}) : f(float{}, float{}, float{});
    case Elem::f64: return int8 ? f(double{}, int8_t{}, double{}) : f(double{}, double{}, double{});
    case Elem::bf16: return int8 ? f(bf16_t{}, int8_t{}, float{}) : f(bf16_t{}, bf16_t{}, float{});
    case Elem::f16: return int8 ? f(fp16_t{}, int8_t{}, float{}) : f(fp16_t{}, fp16_t{}, float{});
  }
}

// Work items are taken from a shared counter, so threads that drew cheap items take more.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  int64_t size = 0;
  bool pop(int64_t& i) { return (i = next.fetch_add(1, std::memory_order_relaxed)) < size; }
};

// The three passes below are compiled once per ISA level (M3_CPU_MULTIVERSION); all the
// kernel code they reach is inlined into them.
enum class Pass { forward, dq, dkv, dmem };

struct PassArgs {
  const MemoryAttentionParams* p;
  const MemoryAttentionGradParams* g;
  Elem elem;
  bool int8;
  int block_q;
  WorkQueue* queue;
};

M3_CPU_MULTIVERSION void run_pass(Pass pass, const PassArgs& a) {
  dispatch_types(a.elem, a.int8, [&](auto t, auto mt, auto acc) M3_LAMBDA_INLINE {
    using T = decltype(t);
    using MT = decltype(mt);
    using Acc = decltype(acc);
    const MemoryAttentionParams& p = *a.p;
    MemoryAttentionCpu<T, MT, Acc> kernel(p, a.block_q);
    const int64_t bh = int64_t(p.B) * p.Hkv;
    const int nqb = (p.T + a.block_q - 1) / a.block_q;
    int64_t i;
    switch (pass) {
      case Pass::forward:  // heaviest first: the last query blocks see the longest context
        while (a.queue->pop(i)) {
          const int qb = nqb - 1 - int(i / bh), b = int(i % bh / p.Hkv), kvh = int(i % p.Hkv);
          kernel.forward_item(b, kvh, qb * a.block_q);
        }
        break;
      case Pass::dq:
        kernel.lse_in_ = p.lse;
        while (a.queue->pop(i)) {
          const int qb = nqb - 1 - int(i / bh), b = int(i % bh / p.Hkv), kvh = int(i % p.Hkv);
          kernel.backward_dq_item(*a.g, b, kvh, qb * a.block_q);
        }
        break;
      case Pass::dkv:  // heaviest first: the first key blocks are seen by the most queries
        kernel.lse_in_ = p.lse;
        while (a.queue->pop(i)) {
          const int kb = int(i / bh), b = int(i % bh / p.Hkv), kvh = int(i % p.Hkv);
          kernel.backward_dkv_item(*a.g, b, kvh, kb * cpu::kKeyBlock);
        }
        break;
      case Pass::dmem:
        kernel.lse_in_ = p.lse;
        while (a.queue->pop(i)) {
          const int c = int(i / bh), b = int(i % bh / p.Hkv), kvh = int(i % p.Hkv);
          kernel.backward_mem_item(*a.g, b, c, kvh);
        }
        break;
    }
  });
}

void parallel_pass(Pass pass, PassArgs args, int64_t items) {
  if (items <= 0) return;
  WorkQueue queue;
  queue.size = items;
  args.queue = &queue;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { run_pass(pass, args); });
}

// Data checks the CPU can afford: kv_lens within [0, S], ids within [-1, N), and a chunk
// table long enough for every sequence's last query.
void check_data(const AttentionShape& s, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                int64_t chunk_size, int64_t chunk_start) {
  const int32_t* lens = kv_lens ? kv_lens->data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t L = lens ? lens[b] : s.S;
    TORCH_CHECK(L >= 0 && L <= s.S, "kv_lens[", b, "] = ", L, " is outside [0, S=", s.S, "]");
    if (L - 1 >= chunk_start) {
      const int64_t need = (L - 1 - chunk_start) / chunk_size + 1;
      TORCH_CHECK(need <= s.C, "mem_ids has ", s.C, " chunks but sequence ", b, " (", L,
                  " tokens, chunk_start ", chunk_start, ", chunk_size ", chunk_size, ") needs ", need);
    }
  }
  const int32_t* ids = mem_ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < mem_ids.numel(); ++i)
    TORCH_CHECK(ids[i] >= -1 && ids[i] < s.N, "mem_ids holds ", ids[i], " at flat index ", i,
                ", outside [-1, N=", s.N, ")");
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

MemoryAttentionParams make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
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

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mem_k,
                 const at::Tensor& mem_v, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                 int64_t chunk_size, int64_t chunk_start, std::optional<double> scale,
                 const std::optional<at::Tensor>& mks, const std::optional<at::Tensor>& mvs) {
  Prepared r;
  r.shape = check_memory_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, mks, mvs);
  TORCH_CHECK(q.device().is_cpu(), "memory_attention (CPU kernel): q must be on the CPU, got ", q.device());
  r.q = last_dim_contiguous(q), r.k = last_dim_contiguous(k), r.v = last_dim_contiguous(v);
  r.mem_k = last_dim_contiguous(mem_k), r.mem_v = last_dim_contiguous(mem_v);
  r.mem_ids = mem_ids.contiguous();
  if (kv_lens) r.kv_lens = kv_lens->contiguous();
  if (mks) r.mks = mks->contiguous(), r.mvs = mvs->contiguous();
  r.scale = scale.value_or(1.0 / std::sqrt(double(r.shape.D)));
  r.block_q = cpu::query_block_size(int(r.shape.T), int(r.shape.Hq / r.shape.Hkv));
  check_data(r.shape, r.mem_ids, r.kv_lens, chunk_size, chunk_start);
  return r;
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
  parallel_pass(Pass::forward, {&p, nullptr, elem_of(q.scalar_type()), s.int8_bank, in.block_q, nullptr},
                nqb * s.B * s.Hkv);
  return {out, lse};
}

// Adds the per-slot memory grads [B, C, R, 2, Hkv, M, D] into the bank grads by id, one
// KV head per task and the slots in a fixed order, so the result is deterministic.
template <typename Acc>
void reduce_memory_grads(const at::Tensor& slots, const at::Tensor& mem_ids, at::Tensor& dmem_k,
                         at::Tensor& dmem_v) {
  const int64_t B = slots.size(0), C = slots.size(1), R = slots.size(2), Hkv = slots.size(4);
  const int64_t row = slots.size(5) * slots.size(6);
  const Acc* src = slots.data_ptr<Acc>();
  const int32_t* ids = mem_ids.data_ptr<int32_t>();
  Acc* dk = dmem_k.data_ptr<Acc>();
  Acc* dv = dmem_v.data_ptr<Acc>();
  at::parallel_for(0, Hkv, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t slot = 0; slot < B * C * R; ++slot) {
        const int64_t id = ids[slot];
        if (id < 0) continue;
        const Acc* gk = src + ((slot * 2 + 0) * Hkv + h) * row;
        const Acc* gv = src + ((slot * 2 + 1) * Hkv + h) * row;
        Acc* tk = dk + (id * Hkv + h) * row;
        Acc* tv = dv + (id * Hkv + h) * row;
        for (int64_t e = 0; e < row; ++e) tk[e] += gk[e], tv[e] += gv[e];
      }
  });
}

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
  at::Tensor dk = at::zeros({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor dv = at::zeros({s.B, s.S, s.Hkv, s.D}, q.options());
  at::Tensor delta = at::empty({s.B, s.Hq, s.T}, q.options().dtype(acc_type));
  at::Tensor slots;
  if (mem_grad) slots = at::zeros({s.B, s.C, s.R, 2, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));

  MemoryAttentionParams p = make_params(s, in.q, in.k, in.v, in.mem_k, in.mem_v, in.mem_ids, in.kv_lens,
                                        chunk_size, chunk_start, scale, in.mks, in.mvs);
  p.lse = lse_c.data_ptr<float>();
  MemoryAttentionGradParams g{};
  g.dout = dout_c.data_ptr();
  g.out = out_c.data_ptr();
  g.dlse = dlse_c ? dlse_c->data_ptr<float>() : nullptr;
  g.dq = dq.data_ptr(), g.dk = dk.data_ptr(), g.dv = dv.data_ptr();
  g.delta = delta.data_ptr();
  g.mem_grad = mem_grad ? slots.data_ptr() : nullptr;

  const PassArgs args{&p, &g, elem_of(q.scalar_type()), s.int8_bank, in.block_q, nullptr};
  const int64_t bh = s.B * s.Hkv;
  parallel_pass(Pass::dq, args, (s.T + in.block_q - 1) / in.block_q * bh);  // also writes delta
  parallel_pass(Pass::dkv, args, (s.S + cpu::kKeyBlock - 1) / cpu::kKeyBlock * bh);
  at::Tensor dmem_k = at::empty({0}, q.options()), dmem_v = at::empty({0}, q.options());
  if (mem_grad) {
    parallel_pass(Pass::dmem, args, s.C * bh);
    at::Tensor acc_k = at::zeros({s.N, s.Hkv, s.M, s.D}, q.options().dtype(acc_type));
    at::Tensor acc_v = at::zeros_like(acc_k);
    if (acc_type == at::kDouble) reduce_memory_grads<double>(slots, in.mem_ids, acc_k, acc_v);
    else reduce_memory_grads<float>(slots, in.mem_ids, acc_k, acc_v);
    dmem_k = acc_k.to(mem_k.scalar_type());
    dmem_v = acc_v.to(mem_k.scalar_type());
  }
  return {dq, dk, dv, dmem_k, dmem_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CPU, m) {
  m.impl("memory_attention", &memory_attention_cpu);
  m.impl("memory_attention_backward", &memory_attention_backward_cpu);
}

}  // namespace memory3
