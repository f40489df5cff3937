// memory_attention backward on tensor cores (bf16/fp16, head dims 32..128), built from the
// forward kernel's pieces (prefill_attention.cuh: the same tiles, ldmatrix/mma fragments and
// tile schedule). Three passes, no atomics, so every gradient is deterministic:
//
//   delta   delta = rowsum(dout * out) - dlse, one warp per query row (float [B, Hq, T]).
//   dq      query-major, like the forward: per tile of 64 packed rows, every key block it sees
//           (its chunks' memories read by id, then the causal context): S = Q K^T,
//           P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   dkv     key-major: per block of 64 keys (context keys of (b, KV head), or the memory keys
//           of one chunk), every query tile that sees it, with the products transposed so the
//           keys are the MMA rows: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, dV += P^T dO,
//           dK += dS^T Q. Context grads go to dk/dv; memory grads to per-slot float scratch
//           that reduce_memory_grads_kernel (memory_attention_backward.cuh) adds into the bank
//           rows by id in slot order.
// S and dP are computed twice (in dq and dkv): 7 products instead of FlashAttention-2's 5, the
// price of no atomics. P and dS are rounded to the input dtype before their products, as in
// FlashAttention. int8 banks: codes exact in the MMAs, scales applied to S, dP and dS columns
// (int8 banks get no gradient, so the memory dkv pass is for float banks only).
#pragma once

#include <cstdint>

#include "memory3/params.h"
#include "memory3/prefill_mma.cuh"
#include "memory3/prefill_schedule.h"

namespace memory3::prefill {

constexpr int kBwdWarps = 4;
constexpr int kBwdRows = 16 * kBwdWarps;  // MMA rows per CTA (queries in dq, keys in dkv)
constexpr int kBwdThreads = 32 * kBwdWarps;

// Shared memory of both backward kernels: two A-side tiles (kBwdRows rows) and two stages of
// two B-side tiles (kBlockN rows), plus per stage 4 arrays of kBlockN words.
constexpr M3_PREFILL_HD int backward_smem_bytes(int D, int elem_bytes) {
  return (2 * kBwdRows + 4 * kBlockN) * smem_pitch(D) * elem_bytes + 2 * 4 * kBlockN * 4;
}

// acc (16 x kBlockN per warp) += A (the warp's 16 rows of sA) * B^T (kBlockN rows of sB), over kD.
template <typename Elem, int kD>
__device__ __forceinline__ void mma_rows_by_keys(float (&acc)[kBlockN / 8][4], const Elem* sA, const Elem* sB,
                                                 int lane) {
  using Tr = ElemTraits<Elem>;
  constexpr int kPitch = smem_pitch(kD);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, sA + (lane % 16) * kPitch + ks * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < kBlockN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, sB + (np * 16 + (lane / 16) * 8 + lane % 8) * kPitch + ks * 16 + ((lane / 8) % 2) * 8);
      Tr::mma(acc[2 * np], a, b[0], b[1]);
      Tr::mma(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x kD per warp) += P (16 x kBlockN, the accumulator layout of mma_rows_by_keys, rounded
// to Elem) * B (kBlockN rows of sB, each kD wide).
template <typename Elem, int kD>
__device__ __forceinline__ void mma_probs_by_rows(float (&acc)[kD / 8][4], const float (&p)[kBlockN / 8][4],
                                                  const Elem* sB, int lane) {
  using Tr = ElemTraits<Elem>;
  constexpr int kPitch = smem_pitch(kD);
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    uint32_t a[4];
    a[0] = Tr::pack(p[2 * kk][0], p[2 * kk][1]);
    a[1] = Tr::pack(p[2 * kk][2], p[2 * kk][3]);
    a[2] = Tr::pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = Tr::pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kPitch + dp * 16 + (lane / 16) * 8);
      Tr::mma(acc[2 * dp], a, b[0], b[1]);
      Tr::mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&x)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.f;
}

// lse of a query row in log2 units, +inf for a row that saw nothing (its P is then 0).
__device__ __forceinline__ float lse_log2(float lse) {
  constexpr float kLog2e = 1.4426950408889634f;
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// ---------------------------------------------------------------- delta
template <typename Elem>
__global__ void __launch_bounds__(128) prefill_delta_kernel(MemoryAttentionBwdParams g, float* delta) {
  using Tr = ElemTraits<Elem>;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;  // (b, i, h), contiguous order
  if (row >= int64_t(g.B) * g.T * g.Hq) return;
  const int lane = threadIdx.x % 32;
  const Elem* o = static_cast<const Elem*>(g.out) + row * g.D;
  const Elem* d = static_cast<const Elem*>(g.dout) + row * g.D;
  float sum = 0.f;
  for (int e = lane; e < g.D; e += 32) sum += Tr::to_float(o[e]) * Tr::to_float(d[e]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int h = int(row % g.Hq), i = int(row / g.Hq % g.T), b = int(row / g.Hq / g.T);
    const int64_t stat = (int64_t(b) * g.Hq + h) * g.T + i;
    delta[stat] = sum - (g.dlse ? g.dlse[stat] : 0.f);
  }
}

// Loads a tile of packed query rows [m0, m0 + n) of (b, kvh) from a [B, T, Hq, D] tensor with
// the given strides into sT (zeros past the last query).
template <typename Elem, int kD>
__device__ __forceinline__ void load_query_rows(Elem* sT, const Elem* base, int64_t sb, int64_t st, int64_t sh,
                                                int b, int kvh, int G, int64_t packed, int64_t m0, int n) {
  constexpr int kPitch = smem_pitch(kD), kChunks = kD / 8;
  for (int x = threadIdx.x; x < n * kChunks; x += blockDim.x) {
    const int r = x / kChunks, cc = x % kChunks;
    const int64_t gr = m0 + r;
    const bool ok = gr < packed;
    const int i = ok ? int(gr / G) : 0, h = ok ? kvh * G + int(gr % G) : 0;
    cp_async_16(sT + r * kPitch + cc * 8, base + b * sb + int64_t(i) * st + int64_t(h) * sh + cc * 8, ok ? 16 : 0);
  }
}

// Loads keys [j0, j0 + kBlockN) of a memory chunk (ids by slot) or of the context into sK/sV
// (zeros where there is none), and per key its validity and int8 scales. Same as the forward.
template <typename Elem, int kD, bool kInt8>
__device__ __forceinline__ void load_key_block(const MemoryAttentionParams& p, const KeyBlock& kb, int b, int kvh,
                                               int ctx_end, Elem* sK, Elem* sV, float* sKs, float* sVs, int* sOk) {
  constexpr int kPitch = smem_pitch(kD), kChunks = kD / 8;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  if (!kb.memory) {
    const Elem* kg = static_cast<const Elem*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
    const Elem* vg = static_cast<const Elem*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h;
    for (int x = tid; x < kBlockN * kChunks; x += nthreads) {
      const int jj = x / kChunks, cc = x % kChunks, j = kb.j0 + jj;
      const bool ok = j < ctx_end;
      const int64_t js = ok ? j : 0;
      cp_async_16(sK + jj * kPitch + cc * 8, kg + js * p.k_stride_s + cc * 8, ok ? 16 : 0);
      cp_async_16(sV + jj * kPitch + cc * 8, vg + js * p.v_stride_s + cc * 8, ok ? 16 : 0);
    }
    for (int jj = tid; jj < kBlockN; jj += nthreads) sOk[jj] = kb.j0 + jj < ctx_end;
    return;
  }
  const int32_t* ids = p.mem_ids + (int64_t(b) * p.C + kb.chunk) * p.R;
  const int nkeys = p.R * p.M;
  for (int jj = tid; jj < kBlockN; jj += nthreads) {
    const int j = kb.j0 + jj;
    const MemoryKey mk = memory_key(j, p.M);
    const int64_t id = j < nkeys ? ids[mk.slot] : -1;
    const bool ok = id >= 0 && id < p.N;
    sOk[jj] = ok;
    if constexpr (kInt8) {
      const int64_t srow = ok ? (id * p.Hkv + kvh) * p.M + mk.token : 0;
      sKs[jj] = ok ? p.mem_k_scale[srow] : 0.f;
      sVs[jj] = ok ? p.mem_v_scale[srow] : 0.f;
    }
  }
  if constexpr (!kInt8) {
    const Elem* mkg = static_cast<const Elem*>(p.mem_k);
    const Elem* mvg = static_cast<const Elem*>(p.mem_v);
    for (int x = tid; x < kBlockN * kChunks; x += nthreads) {
      const int jj = x / kChunks, cc = x % kChunks, j = kb.j0 + jj;
      const MemoryKey mk = memory_key(j, p.M);
      const int64_t id0 = j < nkeys ? ids[mk.slot] : -1;
      const bool ok = id0 >= 0 && id0 < p.N;
      const int64_t id = ok ? id0 : 0;
      cp_async_16(sK + jj * kPitch + cc * 8,
                  mkg + id * p.mk_stride_n + kvh * p.mk_stride_h + mk.token * p.mk_stride_m + cc * 8, ok ? 16 : 0);
      cp_async_16(sV + jj * kPitch + cc * 8,
                  mvg + id * p.mv_stride_n + kvh * p.mv_stride_h + mk.token * p.mv_stride_m + cc * 8, ok ? 16 : 0);
    }
  } else {
    using Tr = ElemTraits<Elem>;
    const int8_t* mkg = static_cast<const int8_t*>(p.mem_k);
    const int8_t* mvg = static_cast<const int8_t*>(p.mem_v);
    constexpr int kPieces = kD / 16;
    for (int x = tid; x < kBlockN * kPieces; x += nthreads) {
      const int jj = x / kPieces, cc = x % kPieces, j = kb.j0 + jj;
      const MemoryKey mk = memory_key(j, p.M);
      const int64_t id = j < nkeys ? ids[mk.slot] : -1;
      const bool ok = id >= 0 && id < p.N;
      for (int side = 0; side < 2; ++side) {
        int4 raw = make_int4(0, 0, 0, 0);
        if (ok) {
          const int8_t* src = side == 0
              ? mkg + id * p.mk_stride_n + kvh * p.mk_stride_h + mk.token * p.mk_stride_m + cc * 16
              : mvg + id * p.mv_stride_n + kvh * p.mv_stride_h + mk.token * p.mv_stride_m + cc * 16;
          raw = __ldg(reinterpret_cast<const int4*>(src));
        }
        const int8_t* codes = reinterpret_cast<const int8_t*>(&raw);
        uint32_t w[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = Tr::pack(float(codes[2 * e]), float(codes[2 * e + 1]));
        Elem* dst = (side == 0 ? sK : sV) + jj * kPitch + cc * 16;
        reinterpret_cast<uint4*>(dst)[0] = make_uint4(w[0], w[1], w[2], w[3]);
        reinterpret_cast<uint4*>(dst)[1] = make_uint4(w[4], w[5], w[6], w[7]);
      }
    }
  }
}

// ---------------------------------------------------------------- dq
template <typename Elem, int kD, bool kInt8>
__global__ void __launch_bounds__(kBwdThreads) prefill_dq_kernel(MemoryAttentionBwdParams g, const float* delta) {
  using Tr = ElemTraits<Elem>;
  constexpr int kPitch = smem_pitch(kD);
  constexpr float kLog2e = 1.4426950408889634f;
  M3_PREFILL_DYNAMIC_SMEM(smem_raw);
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* sDO = sQ + kBwdRows * kPitch;
  Elem* sK = sDO + kBwdRows * kPitch;  // [2][kBlockN][kPitch]
  Elem* sV = sK + 2 * kBlockN * kPitch;
  float* sKs = reinterpret_cast<float*>(sV + 2 * kBlockN * kPitch);  // [2][kBlockN]
  float* sVs = sKs + 2 * kBlockN;
  int* sOk = reinterpret_cast<int*>(sVs + 2 * kBlockN);

  const int G = g.Hq / g.Hkv;
  const int64_t packed = int64_t(g.T) * G;
  const int tiles = int((packed + kBwdRows - 1) / kBwdRows);
  const TileIndex ti = tile_of_block(blockIdx.x, int64_t(g.B) * g.Hkv, tiles);
  const int b = int(ti.bh / g.Hkv), kvh = int(ti.bh % g.Hkv);
  const int64_t m0 = int64_t(ti.tile) * kBwdRows;
  int L = g.kv_lens ? g.kv_lens[b] : g.S;
  if (L < 0 || L > g.S) L = 0;
  const TilePlan plan = plan_tile(m0, kBwdRows, G, g.T, L, g.chunk_size, g.chunk_start, g.C, g.R, g.M);
  const int nblk = plan.blocks();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const float scale_log2 = float(g.scale) * kLog2e;

  int pos[2], chunk[2];
  float lse2[2], dlt[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t gr = m0 + warp * 16 + lane / 4 + rr * 8;
    pos[rr] = row_position(gr, G, g.T, L);
    chunk[rr] = row_chunk(pos[rr], g.chunk_size, g.chunk_start);
    lse2[rr] = INFINITY, dlt[rr] = 0.f;
    if (gr < packed) {
      const int i = int(gr / G), h = kvh * G + int(gr % G);
      const int64_t stat = (int64_t(b) * g.Hq + h) * g.T + i;
      lse2[rr] = pos[rr] < 0 ? INFINITY : lse_log2(g.lse[stat]);
      dlt[rr] = delta[stat];
    }
  }

  float dq[kD / 8][4];
  zero(dq);
  if (nblk > 0) {
    load_query_rows<Elem, kD>(sQ, static_cast<const Elem*>(g.q), g.q_stride_b, g.q_stride_t, g.q_stride_h, b, kvh,
                              G, packed, m0, kBwdRows);
    load_query_rows<Elem, kD>(sDO, static_cast<const Elem*>(g.dout), int64_t(g.T) * g.Hq * g.D,
                              int64_t(g.Hq) * g.D, g.D, b, kvh, G, packed, m0, kBwdRows);
    load_key_block<Elem, kD, kInt8>(g, key_block(plan, 0), b, kvh, plan.p_hi + 1, sK, sV, sKs, sVs, sOk);
    cp_async_commit();
  }
  for (int idx = 0; idx < nblk; ++idx) {
    const int st = idx & 1;
    cp_async_wait_all();
    __syncthreads();
    if (idx + 1 < nblk) {
      const int ns = st ^ 1;
      load_key_block<Elem, kD, kInt8>(g, key_block(plan, idx + 1), b, kvh, plan.p_hi + 1, sK + ns * kBlockN * kPitch,
                                      sV + ns * kBlockN * kPitch, sKs + ns * kBlockN, sVs + ns * kBlockN,
                                      sOk + ns * kBlockN);
      cp_async_commit();
    }
    const KeyBlock kb = key_block(plan, idx);
    const Elem* kS = sK + st * kBlockN * kPitch;
    const Elem* vS = sV + st * kBlockN * kPitch;
    const float* ksc = sKs + st * kBlockN;
    const float* vsc = sVs + st * kBlockN;
    const int* ok = sOk + st * kBlockN;

    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    zero(s);
    zero(dp);
    mma_rows_by_keys<Elem, kD>(s, sQ + warp * 16 * kPitch, kS, lane);
    mma_rows_by_keys<Elem, kD>(dp, sDO + warp * 16 * kPitch, vS, lane);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1), rr = e / 2;
        float x = s[nt][e] * scale_log2, dpx = dp[nt][e];
        if (kb.memory) {
          if constexpr (kInt8) x *= ksc[col], dpx *= vsc[col];
          if (!ok[col]) x = -INFINITY;
        }
        if (!visible(kb, col, pos[rr], chunk[rr])) x = -INFINITY;
        const float pr = exp2f(x - lse2[rr]);
        float ds = pr * (dpx - dlt[rr]);
        if constexpr (kInt8)
          if (kb.memory) ds *= ksc[col];  // dQ += dS (code * k_scale)
        s[nt][e] = ds;
      }
    }
    mma_probs_by_rows<Elem, kD>(dq, s, kS, lane);
  }

  // dq = scale * dS K for this thread's two rows.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t gr = m0 + warp * 16 + lane / 4 + rr * 8;
    if (gr >= packed) continue;
    const int i = int(gr / G), h = kvh * G + int(gr % G);
    Elem* out = static_cast<Elem*>(g.dq) + ((int64_t(b) * g.T + i) * g.Hq + h) * kD;
    const float sc = float(g.scale);
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt)
      *reinterpret_cast<uint32_t*>(out + nt * 8 + (lane % 4) * 2) = Tr::pack(dq[nt][2 * rr] * sc, dq[nt][2 * rr + 1] * sc);
  }
}

// ---------------------------------------------------------------- dk, dv
// One CTA per block of kBwdRows keys: context keys [j0, j0 + kBwdRows) of (b, kvh) when
// `memory` is false (grid: key blocks x B x Hkv), else memory keys [j0, ..) of chunk c
// (grid: memory key blocks x C x B x Hkv; float banks only) written to the slot scratch.
struct KeyTile {
  int b, kvh, chunk, j0;  // chunk = -1: context keys
};

// The query tiles (kBlockN packed rows each) that can see a key tile: [first, last).
struct QueryTiles {
  int first, last;
};
M3_PREFILL_HD QueryTiles query_tiles_for_keys(int chunk, int j0, int G, int T, int L, int chunk_size,
                                              int chunk_start) {
  const int qbase = L - T;
  int64_t i_lo, i_hi;  // queries [i_lo, i_hi)
  if (chunk < 0) {
    i_lo = j0 - qbase > 0 ? j0 - qbase : 0;  // positions >= j0
    i_hi = T;
  } else {
    int64_t lo = chunk_begin(chunk, chunk_size, chunk_start), hi = chunk_begin(chunk + 1, chunk_size, chunk_start);
    if (lo < qbase) lo = qbase;
    if (lo < 0) lo = 0;
    if (hi > L) hi = L;
    i_lo = lo - qbase;
    i_hi = hi - qbase;
  }
  if (i_lo >= i_hi) return {0, 0};
  return {int(i_lo * G / kBlockN), int((i_hi * G + kBlockN - 1) / kBlockN)};
}

template <typename Elem, int kD, bool kMemory>
__global__ void __launch_bounds__(kBwdThreads) prefill_dkv_kernel(MemoryAttentionBwdParams g, const float* delta,
                                                                  float* mem_slots) {
  using Tr = ElemTraits<Elem>;
  constexpr int kPitch = smem_pitch(kD), kChunks = kD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  M3_PREFILL_DYNAMIC_SMEM(smem_raw);
  Elem* sK = reinterpret_cast<Elem*>(smem_raw);  // [kBwdRows][kPitch]: this CTA's keys
  Elem* sV = sK + kBwdRows * kPitch;
  Elem* sQ = sV + kBwdRows * kPitch;  // [2][kBlockN][kPitch]: query tile stages
  Elem* sDO = sQ + 2 * kBlockN * kPitch;
  int* sPos = reinterpret_cast<int*>(sDO + 2 * kBlockN * kPitch);  // [2][kBlockN]
  int* sChunk = sPos + 2 * kBlockN;
  float* sLse = reinterpret_cast<float*>(sChunk + 2 * kBlockN);
  float* sDelta = sLse + 2 * kBlockN;

  const int G = g.Hq / g.Hkv;
  const int64_t packed = int64_t(g.T) * G;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Which keys: blockIdx.x = ((key block * [C] ...) flattened with b, kvh last.
  int64_t rest = blockIdx.x;
  const int kvh = int(rest % g.Hkv);
  rest /= g.Hkv;
  const int b = int(rest % g.B);
  rest /= g.B;
  int chunk = -1, j0;
  if constexpr (kMemory) {
    chunk = int(rest % g.C);
    j0 = int(rest / g.C) * kBwdRows;
  } else {
    j0 = int(rest) * kBwdRows;
  }
  int L = g.kv_lens ? g.kv_lens[b] : g.S;
  if (L < 0 || L > g.S) L = 0;
  const QueryTiles qt = query_tiles_for_keys(chunk, j0, G, g.T, L, g.chunk_size, g.chunk_start);

  // This CTA's keys: context rows j0.. (zeros past L) or the chunk's memory rows by id.
  const int nkeys = g.R * g.M;
  for (int x = tid; x < kBwdRows * kChunks; x += kBwdThreads) {
    const int jj = x / kChunks, cc = x % kChunks, j = j0 + jj;
    const Elem *ksrc = nullptr, *vsrc = nullptr;
    if constexpr (kMemory) {
      const MemoryKey mk = memory_key(j, g.M);
      const int64_t id = j < nkeys ? g.mem_ids[(int64_t(b) * g.C + chunk) * g.R + mk.slot] : -1;
      if (id >= 0 && id < g.N) {
        ksrc = static_cast<const Elem*>(g.mem_k) + id * g.mk_stride_n + kvh * g.mk_stride_h + mk.token * g.mk_stride_m;
        vsrc = static_cast<const Elem*>(g.mem_v) + id * g.mv_stride_n + kvh * g.mv_stride_h + mk.token * g.mv_stride_m;
      }
    } else if (j < L) {
      ksrc = static_cast<const Elem*>(g.k) + b * g.k_stride_b + int64_t(j) * g.k_stride_s + kvh * g.k_stride_h;
      vsrc = static_cast<const Elem*>(g.v) + b * g.v_stride_b + int64_t(j) * g.v_stride_s + kvh * g.v_stride_h;
    }
    const bool ok = ksrc != nullptr;
    cp_async_16(sK + jj * kPitch + cc * 8, ok ? ksrc + cc * 8 : static_cast<const Elem*>(g.k), ok ? 16 : 0);
    cp_async_16(sV + jj * kPitch + cc * 8, ok ? vsrc + cc * 8 : static_cast<const Elem*>(g.v), ok ? 16 : 0);
  }
  // The rows' validity: a key row that does not exist sees no query (its P is masked).
  bool key_ok[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = j0 + warp * 16 + lane / 4 + rr * 8;
    if constexpr (kMemory) {
      const MemoryKey mk = memory_key(j, g.M);
      const int64_t id = j < nkeys ? g.mem_ids[(int64_t(b) * g.C + chunk) * g.R + mk.slot] : -1;
      key_ok[rr] = id >= 0 && id < g.N;
    } else {
      key_ok[rr] = j < L;
    }
  }

  auto load_tile = [&](int tile, int st) {
    const int64_t m0 = int64_t(tile) * kBlockN;
    load_query_rows<Elem, kD>(sQ + st * kBlockN * kPitch, static_cast<const Elem*>(g.q), g.q_stride_b,
                              g.q_stride_t, g.q_stride_h, b, kvh, G, packed, m0, kBlockN);
    load_query_rows<Elem, kD>(sDO + st * kBlockN * kPitch, static_cast<const Elem*>(g.dout),
                              int64_t(g.T) * g.Hq * g.D, int64_t(g.Hq) * g.D, g.D, b, kvh, G, packed, m0, kBlockN);
    for (int r = tid; r < kBlockN; r += kBwdThreads) {
      const int64_t gr = m0 + r;
      const int ps = row_position(gr, G, g.T, L);
      sPos[st * kBlockN + r] = ps;
      sChunk[st * kBlockN + r] = row_chunk(ps, g.chunk_size, g.chunk_start);
      float l2 = INFINITY, dl = 0.f;
      if (gr < packed && ps >= 0) {
        const int i = int(gr / G), h = kvh * G + int(gr % G);
        const int64_t stat = (int64_t(b) * g.Hq + h) * g.T + i;
        l2 = lse_log2(g.lse[stat]);
        dl = delta[stat];
      }
      sLse[st * kBlockN + r] = l2;
      sDelta[st * kBlockN + r] = dl;
    }
  };

  float dk[kD / 8][4], dv[kD / 8][4];
  zero(dk);
  zero(dv);
  const float scale_log2 = float(g.scale) * kLog2e;
  if (qt.first < qt.last) load_tile(qt.first, 0);
  cp_async_commit();
  for (int tile = qt.first; tile < qt.last; ++tile) {
    const int st = (tile - qt.first) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < qt.last) {
      load_tile(tile + 1, st ^ 1);
      cp_async_commit();
    }
    const Elem* qS = sQ + st * kBlockN * kPitch;
    const Elem* doS = sDO + st * kBlockN * kPitch;
    const int* cpos = sPos + st * kBlockN;
    const int* cchunk = sChunk + st * kBlockN;
    const float* clse = sLse + st * kBlockN;
    const float* cdelta = sDelta + st * kBlockN;

    float s[kBlockN / 8][4], dp[kBlockN / 8][4];
    zero(s);
    zero(dp);
    mma_rows_by_keys<Elem, kD>(s, sK + warp * 16 * kPitch, qS, lane);   // S^T = K Q^T
    mma_rows_by_keys<Elem, kD>(dp, sV + warp * 16 * kPitch, doS, lane);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1), rr = e / 2;
        const int j = j0 + warp * 16 + lane / 4 + rr * 8;  // this key
        const bool vis = key_ok[rr] && (kMemory ? cchunk[col] >= 0 && cchunk[col] == chunk : cpos[col] >= j);
        const float pr = vis ? exp2f(s[nt][e] * scale_log2 - clse[col]) : 0.f;
        dp[nt][e] = pr * (dp[nt][e] - cdelta[col]);  // dS^T
        s[nt][e] = pr;                               // P^T
      }
    }
    mma_probs_by_rows<Elem, kD>(dv, s, doS, lane);  // dV += P^T dO
    mma_probs_by_rows<Elem, kD>(dk, dp, qS, lane);  // dK += dS^T Q
  }
  cp_async_wait_all();  // the key loads when no query tile came (nothing else is in flight)

  // Write this thread's two key rows: dk * scale, dv.
  const float sc = float(g.scale);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = j0 + warp * 16 + lane / 4 + rr * 8;
    if constexpr (kMemory) {
      if (j >= nkeys) continue;
      const MemoryKey mk = memory_key(j, g.M);
      const int64_t slot = (int64_t(b) * g.C + chunk) * g.R + mk.slot;  // [B, C, R, 2, Hkv, M, D]
      float* tk = mem_slots + (((slot * 2 + 0) * g.Hkv + kvh) * g.M + mk.token) * kD;
      float* tv = mem_slots + (((slot * 2 + 1) * g.Hkv + kvh) * g.M + mk.token) * kD;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + (lane % 4) * 2;
        *reinterpret_cast<float2*>(tk + d) = make_float2(dk[nt][2 * rr] * sc, dk[nt][2 * rr + 1] * sc);
        *reinterpret_cast<float2*>(tv + d) = make_float2(dv[nt][2 * rr], dv[nt][2 * rr + 1]);
      }
    } else {
      if (j >= g.S) continue;
      const int64_t off = ((int64_t(b) * g.S + j) * g.Hkv + kvh) * kD;  // dk, dv [B, S, Hkv, D] contiguous
      Elem* tk = static_cast<Elem*>(g.dk) + off;
      Elem* tv = static_cast<Elem*>(g.dv) + off;
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) {
        const int d = nt * 8 + (lane % 4) * 2;
        *reinterpret_cast<uint32_t*>(tk + d) = Tr::pack(dk[nt][2 * rr] * sc, dk[nt][2 * rr + 1] * sc);
        *reinterpret_cast<uint32_t*>(tv + d) = Tr::pack(dv[nt][2 * rr], dv[nt][2 * rr + 1]);
      }
    }
  }
}

#ifndef M3_PREFILL_EMULATE
// The three passes (and nothing for the bank when g.dmem_k is null). delta: float [B, Hq, T];
// mem_slots: float [B, C, R, 2, Hkv, M, D] when g.dmem_k is set. The caller adds the slots into
// the bank rows (reduce_memory_grads_kernel) after this.
template <typename Elem, int kD, bool kInt8>
void launch_backward(const MemoryAttentionBwdParams& g, float* delta, float* mem_slots, cudaStream_t stream) {
  constexpr int kSmem = backward_smem_bytes(kD, int(sizeof(Elem)));
  const int64_t rows = int64_t(g.B) * g.T * g.Hq;
  if (rows > 0) prefill_delta_kernel<Elem><<<dim3(unsigned((rows + 3) / 4)), dim3(128), 0, stream>>>(g, delta);
  const int G = g.Hq / g.Hkv;
  const int64_t bh = int64_t(g.B) * g.Hkv;
  const int64_t q_tiles = (int64_t(g.T) * G + kBwdRows - 1) / kBwdRows;
  if (q_tiles * bh > 0) {
    auto k = prefill_dq_kernel<Elem, kD, kInt8>;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    k<<<dim3(unsigned(q_tiles * bh)), dim3(kBwdThreads), kSmem, stream>>>(g, delta);
  }
  const int64_t k_tiles = (int64_t(g.S) + kBwdRows - 1) / kBwdRows;
  if (k_tiles * bh > 0) {
    auto k = prefill_dkv_kernel<Elem, kD, false>;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    k<<<dim3(unsigned(k_tiles * bh)), dim3(kBwdThreads), kSmem, stream>>>(g, delta, nullptr);
  }
  if constexpr (!kInt8) {
    const int64_t m_tiles = (int64_t(g.R) * g.M + kBwdRows - 1) / kBwdRows;
    if (g.dmem_k != nullptr && m_tiles * g.C * bh > 0) {
      auto k = prefill_dkv_kernel<Elem, kD, true>;
      cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      k<<<dim3(unsigned(m_tiles * g.C * bh)), dim3(kBwdThreads), kSmem, stream>>>(g, delta, mem_slots);
    }
  }
}

template <typename Elem>
bool launch_backward_dims(const MemoryAttentionBwdParams& g, bool int8_bank, float* delta, float* mem_slots,
                          cudaStream_t stream) {
  switch (g.D) {
#define M3_BWD_CASE(D)                                                                    \
  case D:                                                                                 \
    int8_bank ? launch_backward<Elem, D, true>(g, delta, mem_slots, stream)               \
              : launch_backward<Elem, D, false>(g, delta, mem_slots, stream);             \
    return true;
    M3_BWD_CASE(32)
    M3_BWD_CASE(64)
    M3_BWD_CASE(80)
    M3_BWD_CASE(96)
    M3_BWD_CASE(128)
#undef M3_BWD_CASE
    default: return false;
  }
}
#endif  // M3_PREFILL_EMULATE

}  // namespace memory3::prefill
