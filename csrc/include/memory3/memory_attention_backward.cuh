// memory_attention backward on CUDA cores, for every dtype (float32, float64, bf16, fp16),
// float and int8 banks and head dims up to kMaxD: the CPU backward's three passes, one warp
// per row, each lane holding D / 32 of the row's elements, accumulation in Acc (float, or
// double for float64). Correct first: this is not yet the tensor-core backward issue 13
// asks for (see bench/RESULTS.md). Instantiated in csrc/cuda/memory_attention_backward_kernels.cu.
//
//   dq pass    one warp per (b, query, head): delta = dout . out - dlse (stored for the other
//              passes), then every key the query sees (its chunk's memories, context 0 .. pos):
//              p = exp(s - lse), ds = p (dout . v - delta), dq += ds k; dq *= scale.
//   dkv pass   one warp per (b, context key, KV head): over the queries at positions >= j and
//              the G heads of the group, dv += p dout, dk += ds q scale. Keys past kv_lens get 0.
//   dmem pass  one warp per (b, chunk, slot, token, KV head) with a valid id: the same over the
//              chunk's queries, into a per-slot scratch [B, C, R, 2, Hkv, M, D] (Acc).
//   reduce     one thread per (KV head, token, d) element: adds the slots into dmem_k/dmem_v by
//              id, slots in order (b, c, r), so repeated ids add up deterministically.
// A query that saw no key (lse = -inf) gets dq = 0 and gives no gradient.
//
// M3_PREFILL_EMULATE: compiled by the host emulator (csrc/cuda/nvcc_check/prefill_emulator.cpp),
// which supplies the CUDA types and intrinsics; the launch helpers are left out.
#pragma once

#ifndef M3_PREFILL_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <type_traits>

#include "memory3/params.h"
#include "memory3/prefill_schedule.h"

namespace memory3::backward {

constexpr int kMaxD = 256;              // head dims served (8 elements per lane)
constexpr int kPerLane = kMaxD / 32;
constexpr int kWarpsPerBlock = 4;

// Extra device buffers of the CUDA backward (its algorithm, not the op's contract).
struct BackwardScratch {
  void* delta;      // [B, Hq, T] Acc
  void* mem_slots;  // [B, C, R, 2, Hkv, M, D] Acc, or null without mem_grad
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc load_acc(const T& x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return Acc(__bfloat162float(x));
  else if constexpr (std::is_same_v<T, __half>) return Acc(__half2float(x));
  else return Acc(x);
}
template <typename T, typename Acc>
__device__ __forceinline__ T store_as(Acc x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(x));
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(x));
  else return T(x);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc exp_acc(Acc x) {
  if constexpr (std::is_same_v<Acc, double>) return exp(x);
  else return __expf(x);
}

// A row of D elements spread over the warp: lane holds elements lane + 32 e.
template <typename Acc>
struct Row {
  Acc x[kPerLane];
};

template <typename Acc, typename T>
__device__ __forceinline__ Row<Acc> load_row(const T* src, int D, Acc mul) {
  Row<Acc> r;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    r.x[e] = d < D ? load_acc<Acc>(src[d]) * mul : Acc(0);
  }
  return r;
}

template <typename Acc>
__device__ __forceinline__ Acc dot(const Row<Acc>& a, const Row<Acc>& b) {
  Acc s = 0;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) s += a.x[e] * b.x[e];
  return s;
}

// The per-(b) view every pass needs.
struct Seq {
  int L, qbase;  // context length, position of query 0
};
__device__ __forceinline__ Seq seq_of(const MemoryAttentionParams& p, int b) {
  int L = p.kv_lens ? p.kv_lens[b] : p.S;
  if (L < 0 || L > p.S) L = 0;  // checked by the launcher; never read past
  return {L, L - p.T};
}

// Key row `t` of memory id `id` for KV head kvh (int8: times its scale).
template <typename Acc, typename MT>
__device__ __forceinline__ Row<Acc> memory_row(const MemoryAttentionParams& p, const void* bank, int64_t sn,
                                               int64_t sh, int64_t sm, const float* scale, int64_t id, int kvh, int t) {
  const MT* src = static_cast<const MT*>(bank) + id * sn + kvh * sh + t * sm;
  const Acc mul = scale ? Acc(scale[(id * p.Hkv + kvh) * p.M + t]) : Acc(1);
  return load_row<Acc>(src, p.D, mul);
}

__device__ __forceinline__ bool valid_id(int64_t id, int N) { return id >= 0 && id < N; }

// ---------------------------------------------------------------- dq (and delta)
template <typename T, typename MT, typename Acc>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) dq_kernel(MemoryAttentionBwdParams g, BackwardScratch w) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;  // (b, i, h)
  if (row >= int64_t(g.B) * g.T * g.Hq) return;
  const int h = int(row % g.Hq), i = int(row / g.Hq % g.T), b = int(row / g.Hq / g.T);
  const int kvh = h / (g.Hq / g.Hkv);
  const int lane = threadIdx.x % 32;
  const Seq sq = seq_of(g, b);
  const int pos = sq.qbase + i;
  const int64_t stat = (int64_t(b) * g.Hq + h) * g.T + i;
  const float lse_f = g.lse[stat];
  T* dq_out = static_cast<T*>(g.dq) + row * g.D;
  Acc* delta_out = static_cast<Acc*>(w.delta);
  const bool seen = pos >= 0 && !(isinf(lse_f) && lse_f < 0);
  if (!seen) {
    for (int d = lane; d < g.D; d += 32) dq_out[d] = store_as<T>(Acc(0));
    if (lane == 0) delta_out[stat] = 0;
    return;
  }
  const Acc scale = Acc(g.scale), lse = Acc(lse_f);
  const Row<Acc> q = load_row<Acc>(static_cast<const T*>(g.q) + b * g.q_stride_b + i * g.q_stride_t + h * g.q_stride_h,
                                   g.D, Acc(1));
  const Row<Acc> dout = load_row<Acc>(static_cast<const T*>(g.dout) + row * g.D, g.D, Acc(1));
  const Row<Acc> out = load_row<Acc>(static_cast<const T*>(g.out) + row * g.D, g.D, Acc(1));
  const Acc delta = warp_sum(dot(dout, out)) - (g.dlse ? Acc(g.dlse[stat]) : Acc(0));
  if (lane == 0) delta_out[stat] = delta;

  Row<Acc> dq{};
  auto visit = [&](const Row<Acc>& k, const Row<Acc>& v) {
    const Acc s = warp_sum(dot(q, k)) * scale;
    const Acc dp = warp_sum(dot(dout, v));
    const Acc ds = exp_acc(s - lse) * (dp - delta);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dq.x[e] += ds * k.x[e];
  };
  const int c = prefill::row_chunk(pos, g.chunk_size, g.chunk_start);
  if (c >= 0 && c < g.C) {
    for (int r = 0; r < g.R; ++r) {
      const int64_t id = g.mem_ids[(int64_t(b) * g.C + c) * g.R + r];
      if (!valid_id(id, g.N)) continue;
      for (int t = 0; t < g.M; ++t)
        visit(memory_row<Acc, MT>(g, g.mem_k, g.mk_stride_n, g.mk_stride_h, g.mk_stride_m, g.mem_k_scale, id, kvh, t),
              memory_row<Acc, MT>(g, g.mem_v, g.mv_stride_n, g.mv_stride_h, g.mv_stride_m, g.mem_v_scale, id, kvh, t));
    }
  }
  const T* kb = static_cast<const T*>(g.k) + b * g.k_stride_b + kvh * g.k_stride_h;
  const T* vb = static_cast<const T*>(g.v) + b * g.v_stride_b + kvh * g.v_stride_h;
  for (int j = 0; j <= pos; ++j)
    visit(load_row<Acc>(kb + j * g.k_stride_s, g.D, Acc(1)), load_row<Acc>(vb + j * g.v_stride_s, g.D, Acc(1)));
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < g.D) dq_out[d] = store_as<T>(dq.x[e] * scale);
  }
}

// dk, dv of one key row over the queries [i_lo, i_hi) of sequence b (all G heads of kvh).
template <typename T, typename Acc>
__device__ __forceinline__ void key_grads(const MemoryAttentionBwdParams& g, const BackwardScratch& w, int b, int kvh,
                                          int i_lo, int i_hi, const Row<Acc>& k, const Row<Acc>& v, Row<Acc>& dk,
                                          Row<Acc>& dv) {
  const int G = g.Hq / g.Hkv;
  const Acc scale = Acc(g.scale);
  const Acc* delta = static_cast<const Acc*>(w.delta);
  for (int i = i_lo; i < i_hi; ++i)
    for (int gh = 0; gh < G; ++gh) {
      const int h = kvh * G + gh;
      const int64_t stat = (int64_t(b) * g.Hq + h) * g.T + i;
      const float lse_f = g.lse[stat];
      if (isinf(lse_f) && lse_f < 0) continue;  // the query saw nothing
      const int64_t row = (int64_t(b) * g.T + i) * g.Hq + h;
      const Row<Acc> q = load_row<Acc>(static_cast<const T*>(g.q) + b * g.q_stride_b + i * g.q_stride_t +
                                           h * g.q_stride_h, g.D, scale);
      const Row<Acc> dout = load_row<Acc>(static_cast<const T*>(g.dout) + row * g.D, g.D, Acc(1));
      const Acc pr = exp_acc(warp_sum(dot(q, k)) - Acc(lse_f));
      const Acc ds = pr * (warp_sum(dot(dout, v)) - delta[stat]);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) dv.x[e] += pr * dout.x[e], dk.x[e] += ds * q.x[e];
    }
}

// ---------------------------------------------------------------- dk, dv (context)
template <typename T, typename MT, typename Acc>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) dkv_kernel(MemoryAttentionBwdParams g, BackwardScratch w) {
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;  // (b, j, kvh)
  if (item >= int64_t(g.B) * g.S * g.Hkv) return;
  const int kvh = int(item % g.Hkv), j = int(item / g.Hkv % g.S), b = int(item / g.Hkv / g.S);
  const int lane = threadIdx.x % 32;
  const Seq sq = seq_of(g, b);
  Row<Acc> dk{}, dv{};
  if (j < sq.L) {
    const Row<Acc> k = load_row<Acc>(static_cast<const T*>(g.k) + b * g.k_stride_b + j * g.k_stride_s +
                                         kvh * g.k_stride_h, g.D, Acc(1));
    const Row<Acc> v = load_row<Acc>(static_cast<const T*>(g.v) + b * g.v_stride_b + j * g.v_stride_s +
                                         kvh * g.v_stride_h, g.D, Acc(1));
    const int i_lo = j - sq.qbase > 0 ? j - sq.qbase : 0;  // queries at positions >= j
    key_grads<T, Acc>(g, w, b, kvh, i_lo, g.T, k, v, dk, dv);
  }
  T* dk_out = static_cast<T*>(g.dk) + item * g.D;  // [B, S, Hkv, D] contiguous: item order
  T* dv_out = static_cast<T*>(g.dv) + item * g.D;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < g.D) dk_out[d] = store_as<T>(dk.x[e]), dv_out[d] = store_as<T>(dv.x[e]);
  }
}

// ---------------------------------------------------------------- memory grads, per slot
template <typename T, typename MT, typename Acc>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) dmem_kernel(MemoryAttentionBwdParams g, BackwardScratch w) {
  // item = ((((b * C + c) * R + r) * M + t) * Hkv + kvh)
  const int64_t item = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (item >= int64_t(g.B) * g.C * g.R * g.M * g.Hkv) return;
  const int kvh = int(item % g.Hkv);
  const int t = int(item / g.Hkv % g.M);
  const int64_t slot = item / g.Hkv / g.M;  // (b, c, r)
  const int c = int(slot / g.R % g.C), b = int(slot / g.R / g.C);
  const int lane = threadIdx.x % 32;
  const int64_t id = g.mem_ids[slot];
  Row<Acc> dk{}, dv{};
  if (valid_id(id, g.N)) {
    const Seq sq = seq_of(g, b);
    int64_t lo = prefill::chunk_begin(c, g.chunk_size, g.chunk_start);
    int64_t hi = prefill::chunk_begin(c + 1, g.chunk_size, g.chunk_start);
    lo = lo > sq.qbase ? lo : sq.qbase;
    lo = lo > 0 ? lo : 0;
    hi = hi < sq.L ? hi : sq.L;
    if (lo < hi) {
      const Row<Acc> k =
          memory_row<Acc, MT>(g, g.mem_k, g.mk_stride_n, g.mk_stride_h, g.mk_stride_m, g.mem_k_scale, id, kvh, t);
      const Row<Acc> v =
          memory_row<Acc, MT>(g, g.mem_v, g.mv_stride_n, g.mv_stride_h, g.mv_stride_m, g.mem_v_scale, id, kvh, t);
      key_grads<T, Acc>(g, w, b, kvh, int(lo - sq.qbase), int(hi - sq.qbase), k, v, dk, dv);
    }
  }
  const int64_t elems = int64_t(g.M) * g.D;  // slot layout [B, C, R, 2, Hkv, M, D]
  Acc* sk = static_cast<Acc*>(w.mem_slots) + ((slot * 2 + 0) * g.Hkv + kvh) * elems + int64_t(t) * g.D;
  Acc* sv = static_cast<Acc*>(w.mem_slots) + ((slot * 2 + 1) * g.Hkv + kvh) * elems + int64_t(t) * g.D;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int d = lane + 32 * e;
    if (d < g.D) sk[d] = dk.x[e], sv[d] = dv.x[e];
  }
}

// dmem[id] += slot, slots in (b, c, r) order: one thread per (kvh, t, d) element of a memory.
template <typename Acc>
__global__ void reduce_memory_grads_kernel(MemoryAttentionBwdParams g, BackwardScratch w) {
  const int64_t per_memory = int64_t(g.Hkv) * g.M * g.D;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= per_memory) return;
  const Acc* slots = static_cast<const Acc*>(w.mem_slots);
  Acc* dk = static_cast<Acc*>(g.dmem_k);
  Acc* dv = static_cast<Acc*>(g.dmem_v);
  const int64_t nslots = int64_t(g.B) * g.C * g.R;
  for (int64_t slot = 0; slot < nslots; ++slot) {
    const int64_t id = g.mem_ids[slot];
    if (!valid_id(id, g.N)) continue;
    dk[id * per_memory + e] += slots[(slot * 2 + 0) * per_memory + e];
    dv[id * per_memory + e] += slots[(slot * 2 + 1) * per_memory + e];
  }
}

#ifndef M3_PREFILL_EMULATE
// The four passes on one stream (dmem and reduce only when g.dmem_k is set).
template <typename T, typename MT, typename Acc>
void launch_backward(const MemoryAttentionBwdParams& g, const BackwardScratch& w, cudaStream_t stream) {
  auto grid = [](int64_t warps) { return dim3(unsigned((warps + kWarpsPerBlock - 1) / kWarpsPerBlock)); };
  const dim3 block(32 * kWarpsPerBlock);
  const int64_t rows = int64_t(g.B) * g.T * g.Hq;
  if (rows > 0) dq_kernel<T, MT, Acc><<<grid(rows), block, 0, stream>>>(g, w);
  const int64_t keys = int64_t(g.B) * g.S * g.Hkv;
  if (keys > 0) dkv_kernel<T, MT, Acc><<<grid(keys), block, 0, stream>>>(g, w);
  if (g.dmem_k == nullptr) return;
  const int64_t mem_items = int64_t(g.B) * g.C * g.R * g.M * g.Hkv;
  if (mem_items > 0) dmem_kernel<T, MT, Acc><<<grid(mem_items), block, 0, stream>>>(g, w);
  const int64_t per_memory = int64_t(g.Hkv) * g.M * g.D;
  if (per_memory > 0 && mem_items > 0)
    reduce_memory_grads_kernel<Acc><<<dim3(unsigned((per_memory + 255) / 256)), dim3(256), 0, stream>>>(g, w);
}

#endif  // M3_PREFILL_EMULATE

}  // namespace memory3::backward
