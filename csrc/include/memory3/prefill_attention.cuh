// memory_attention forward on tensor cores for prefill and chunked prefill (any T),
// FlashAttention-2 style: one CTA per (tile of kRows packed rows, sequence, KV head), online
// softmax in registers, no T x S matrix. Index arithmetic: prefill_schedule.h; primitives:
// prefill_mma.cuh. Instantiated per dtype in csrc/cuda/memory_attention_prefill_*.cu.
//
// Warps. kWarps warps, each owning 16 packed rows (query x GQA head) for the whole kernel:
// its Q fragments stay in registers, S = Q K^T and O += P V are warp-level mma.sync, and the
// softmax statistics of a row live in the 4 lanes of a quad (reduced by two shuffles).
// Shared memory. Q tile [kRows][D + 8], K and V [2 stages][kBlockN][D + 8] (padded rows:
// ldmatrix conflict free), plus per stage the memory keys' scales and validity flags.
// Keys. Memory blocks first: key j of chunk c is token j % M of slot j / M, read by id from
// the bank (mem_ids[b, c, slot]; -1 or out of range: a masked column whose rows are zero);
// rows see a memory block only when their query lies in chunk c. Then the context, keys 0 ..
// the tile's last position, causal. Each stage is fetched (cp.async, zero-filled past the
// end) while the previous one is computed: one __syncthreads per block.
// int8 banks. Codes are exact in bf16/fp16 (|code| <= 127), so the kernel stores codes in
// shared memory and applies the scales outside the MMAs: S[:, j] *= k_scale[j] before the
// softmax, P[:, j] *= v_scale[j] before P V (l sums the unscaled P), as exact as a float bank.
// P. As FlashAttention, P is rounded to the input dtype before P V by default (kExactP =
// false: error ~2^-9 relative per term in bf16), held to FlashAttention's 2x rule against the
// same computation done in bf16/fp16. kExactP (MEMORY3_PREFILL_P=exact) feeds P as two terms,
// its rounding and the rounding's remainder (two MMAs per step, ~1.5x the forward's MMA work,
// ~2^-17 relative): the output is then within float32 error of the exact answer before its
// final rounding, the cap the CPU kernel meets (emulated: 0.92-0.99x of it). The rounded P misses
// that cap by 7-90x yet stays at 0.12-0.27x the bf16/fp16 computation's error (the rule allows
// 2x); the speed target needs its one term, so exact P is the opt-in.
#pragma once

#include <cstdint>

#include "memory3/params.h"
#include "memory3/prefill_mma.cuh"
#include "memory3/prefill_schedule.h"

namespace memory3::prefill {

template <typename Elem, int kD, int kWarps, bool kInt8>
struct ForwardConfig {
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kPitch = smem_pitch(kD);
  static constexpr int kChunks = kD / 8;  // 16-byte pieces of a row
  static constexpr int kSmem = forward_smem_bytes(kD, kRows, int(sizeof(Elem)));
};

template <typename Elem, int kD, int kWarps, bool kInt8, bool kExactP>
__global__ void __launch_bounds__(32 * kWarps) memory_attention_prefill_kernel(MemoryAttentionParams p) {
  using Cfg = ForwardConfig<Elem, kD, kWarps, kInt8>;
  using Tr = ElemTraits<Elem>;
  constexpr int kRows = Cfg::kRows, kPitch = Cfg::kPitch, kChunks = Cfg::kChunks, kThreads = Cfg::kThreads;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

  M3_PREFILL_DYNAMIC_SMEM(smem_raw);
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* sK = sQ + kRows * kPitch;             // [2][kBlockN][kPitch]
  Elem* sV = sK + 2 * kBlockN * kPitch;       // [2][kBlockN][kPitch]
  float* sKs = reinterpret_cast<float*>(sV + 2 * kBlockN * kPitch);  // [2][kBlockN]
  float* sVs = sKs + 2 * kBlockN;                                    // [2][kBlockN]
  int* sOk = reinterpret_cast<int*>(sVs + 2 * kBlockN);              // [2][kBlockN]

  const int G = p.Hq / p.Hkv;
  const int64_t BH = int64_t(p.B) * p.Hkv;
  const int64_t packed = int64_t(p.T) * G;
  const int tiles = int((packed + kRows - 1) / kRows);
  const TileIndex ti = tile_of_block(blockIdx.x, BH, tiles);
  const int b = int(ti.bh / p.Hkv), kvh = int(ti.bh % p.Hkv);
  const int64_t m0 = int64_t(ti.tile) * kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Data checks on the device (params.h): a bad length is an empty sequence, a table too
  // short for the sequence leaves its last chunks without memories, a bad id an empty slot;
  // each is recorded, never read past.
  int L = p.kv_lens ? p.kv_lens[b] : p.S;
  if (L < 0 || L > p.S) {
    if (tid == 0 && kvh == 0 && ti.tile == tiles - 1) record_range(p.range_error, cuda::kRangeKvLens, b, L, p.S);
    L = 0;
  }
  if (tid == 0 && kvh == 0 && ti.tile == tiles - 1 && int64_t(L) - 1 >= p.chunk_start) {
    const int64_t need = (int64_t(L) - 1 - p.chunk_start) / p.chunk_size + 1;
    if (need > p.C) record_range(p.range_error, cuda::kRangeChunks, b, L, p.C, need);
  }
  // Every id of the sequence, read below or not (the CPU op checks them all), by the one
  // block per sequence that also checks its length.
  if (kvh == 0 && ti.tile == tiles - 1 && p.range_error != nullptr) {
    const int64_t base = int64_t(b) * p.C * p.R, n = int64_t(p.C) * p.R;
    for (int64_t i = tid; i < n; i += kThreads) {
      const int64_t id = p.mem_ids[base + i];
      if (id < -1 || id >= p.N) record_range(p.range_error, cuda::kRangeMemIds, base + i, id, p.N);
    }
  }
  const TilePlan plan = plan_tile(m0, kRows, G, p.T, L, p.chunk_size, p.chunk_start, p.C, p.R, p.M);
  const int nblk = plan.blocks();

  const float scale_log2 = float(p.scale) * kLog2e;

  // This thread's two rows (lane / 4 and lane / 4 + 8 of its warp's 16).
  int pos[2], chunk[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    pos[rr] = row_position(m0 + warp * 16 + lane / 4 + rr * 8, G, p.T, L);
    chunk[rr] = row_chunk(pos[rr], p.chunk_size, p.chunk_start);
  }

  const Elem* qg = static_cast<const Elem*>(p.q) + b * p.q_stride_b;
  const Elem* kg = static_cast<const Elem*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
  const Elem* vg = static_cast<const Elem*>(p.v) + b * p.v_stride_b + kvh * p.v_stride_h;
  const int32_t* ids = p.mem_ids + int64_t(b) * p.C * p.R;
  const int ctx_end = plan.p_hi + 1;  // context keys [0, ctx_end) exist for this tile

  // Fetch block idx into stage st: context rows by cp.async (zero past ctx_end), memory rows
  // by id (cp.async for a float bank; int8 codes converted to Elem through registers).
  auto load_block = [&](int idx, int st) {
    const KeyBlock kb = key_block(plan, idx);
    Elem* k_dst = sK + st * kBlockN * kPitch;
    Elem* v_dst = sV + st * kBlockN * kPitch;
    if (!kb.memory) {
      for (int x = tid; x < kBlockN * kChunks; x += kThreads) {
        const int jj = x / kChunks, cc = x % kChunks, j = kb.j0 + jj;
        const bool ok = j < ctx_end;
        const int64_t js = ok ? j : 0;
        cp_async_16(k_dst + jj * kPitch + cc * 8, kg + js * p.k_stride_s + cc * 8, ok ? 16 : 0);
        cp_async_16(v_dst + jj * kPitch + cc * 8, vg + js * p.v_stride_s + cc * 8, ok ? 16 : 0);
      }
      return;
    }
    const int nkeys = p.R * p.M;
    for (int jj = tid; jj < kBlockN; jj += kThreads) {  // per key: validity and int8 scales
      const int j = kb.j0 + jj;
      const MemoryKey mk = memory_key(j, p.M);
      const int64_t id = j < nkeys ? ids[int64_t(kb.chunk) * p.R + mk.slot] : -1;
      const bool ok = id >= 0 && id < p.N;
      if (!ok && id != -1 && mk.token == 0)  // once per slot
        record_range(p.range_error, cuda::kRangeMemIds, (int64_t(b) * p.C + kb.chunk) * p.R + mk.slot, id, p.N);
      sOk[st * kBlockN + jj] = ok;
      if constexpr (kInt8) {
        const int64_t srow = ok ? (id * p.Hkv + kvh) * p.M + mk.token : 0;
        sKs[st * kBlockN + jj] = ok ? p.mem_k_scale[srow] : 0.f;
        sVs[st * kBlockN + jj] = ok ? p.mem_v_scale[srow] : 0.f;
      }
    }
    if constexpr (!kInt8) {
      const Elem* mkg = static_cast<const Elem*>(p.mem_k);
      const Elem* mvg = static_cast<const Elem*>(p.mem_v);
      for (int x = tid; x < kBlockN * kChunks; x += kThreads) {
        const int jj = x / kChunks, cc = x % kChunks, j = kb.j0 + jj;
        const MemoryKey mk = memory_key(j, p.M);
        const int64_t id0 = j < nkeys ? ids[int64_t(kb.chunk) * p.R + mk.slot] : -1;
        const bool ok = id0 >= 0 && id0 < p.N;
        const int64_t id = ok ? id0 : 0;
        cp_async_16(k_dst + jj * kPitch + cc * 8,
                    mkg + id * p.mk_stride_n + kvh * p.mk_stride_h + mk.token * p.mk_stride_m + cc * 8, ok ? 16 : 0);
        cp_async_16(v_dst + jj * kPitch + cc * 8,
                    mvg + id * p.mv_stride_n + kvh * p.mv_stride_h + mk.token * p.mv_stride_m + cc * 8, ok ? 16 : 0);
      }
    } else {
      const int8_t* mkg = static_cast<const int8_t*>(p.mem_k);
      const int8_t* mvg = static_cast<const int8_t*>(p.mem_v);
      constexpr int kPieces = kD / 16;  // 16 codes per 16-byte load
      for (int x = tid; x < kBlockN * kPieces; x += kThreads) {
        const int jj = x / kPieces, cc = x % kPieces, j = kb.j0 + jj;
        const MemoryKey mk = memory_key(j, p.M);
        const int64_t id = j < nkeys ? ids[int64_t(kb.chunk) * p.R + mk.slot] : -1;
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
          uint32_t packed_codes[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) packed_codes[e] = Tr::pack(float(codes[2 * e]), float(codes[2 * e + 1]));
          Elem* dst = (side == 0 ? k_dst : v_dst) + jj * kPitch + cc * 16;
          reinterpret_cast<uint4*>(dst)[0] = make_uint4(packed_codes[0], packed_codes[1], packed_codes[2], packed_codes[3]);
          reinterpret_cast<uint4*>(dst)[1] = make_uint4(packed_codes[4], packed_codes[5], packed_codes[6], packed_codes[7]);
        }
      }
    }
  };

  float o[kD / 8][4];
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[kD / 16][4];

  if (nblk > 0) {
    // Q tile: rows past the last query are zeros (they are masked anyway).
    for (int x = tid; x < kRows * kChunks; x += kThreads) {
      const int r = x / kChunks, cc = x % kChunks;
      const int64_t gr = m0 + r;
      const bool ok = gr < packed;
      const int i = ok ? int(gr / G) : 0, h = ok ? kvh * G + int(gr % G) : 0;
      cp_async_16(sQ + r * kPitch + cc * 8, qg + int64_t(i) * p.q_stride_t + int64_t(h) * p.q_stride_h + cc * 8,
                  ok ? 16 : 0);
    }
    load_block(0, 0);
    cp_async_commit();
  }

  for (int idx = 0; idx < nblk; ++idx) {
    const int st = idx & 1;
    cp_async_wait_all();
    __syncthreads();  // stage st is in; every warp is done with stage st ^ 1
    if (idx == 0) {
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks)
        ldmatrix_x4(qf[ks], sQ + (warp * 16 + lane % 16) * kPitch + ks * 16 + (lane / 16) * 8);
    }
    if (idx + 1 < nblk) {
      load_block(idx + 1, st ^ 1);
      cp_async_commit();
    }
    const KeyBlock kb = key_block(plan, idx);
    const Elem* kS = sK + st * kBlockN * kPitch;
    const Elem* vS = sV + st * kBlockN * kPitch;

    // S = Q K^T (16 rows x kBlockN keys per warp).
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t kf[4];
        ldmatrix_x4(kf, kS + (np * 16 + (lane / 16) * 8 + lane % 8) * kPitch + ks * 16 + ((lane / 8) % 2) * 8);
        Tr::mma(s[2 * np], qf[ks], kf[0], kf[1]);
        Tr::mma(s[2 * np + 1], qf[ks], kf[2], kf[3]);
      }
    }

    // Scale (log2 units), key scales, mask.
    const bool masked = kb.memory || context_block_needs_mask(plan, kb.j0);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1), rr = e / 2;
        float x = s[nt][e] * scale_log2;
        if (kb.memory) {
          if constexpr (kInt8) x *= sKs[st * kBlockN + col];
          if (!sOk[st * kBlockN + col]) x = -INFINITY;
        }
        if (masked && !visible(kb, col, pos[rr], chunk[rr])) x = -INFINITY;
        s[nt][e] = x;
      }
    }

    // Online softmax: new row max, rescale o and l, P = exp2(S - max).
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = m[rr];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // a row that has seen nothing yet stays 0
      const float alpha = exp2f(m[rr] - base);         // m = -inf: 0
      m[rr] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * rr] = exp2f(s[nt][2 * rr] - base);
        s[nt][2 * rr + 1] = exp2f(s[nt][2 * rr + 1] - base);
        sum += s[nt][2 * rr] + s[nt][2 * rr + 1];
      }
      l[rr] = l[rr] * alpha + sum;  // this lane's columns only; the quad is summed at the end
#pragma unroll
      for (int nt = 0; nt < kD / 8; ++nt) o[nt][2 * rr] *= alpha, o[nt][2 * rr + 1] *= alpha;
    }

    // O += P V, 16 keys per step; P goes to the A layout of the MMA in registers.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      float v0 = 1.f, v1 = 1.f, v2 = 1.f, v3 = 1.f;  // value scales of this lane's 4 keys
      if constexpr (kInt8) {
        if (kb.memory) {
          const float* vs = sVs + st * kBlockN + kk * 16 + (lane % 4) * 2;
          v0 = vs[0], v1 = vs[1], v2 = vs[8], v3 = vs[9];
        }
      }
      const float x[4][2] = {{s[2 * kk][0] * v0, s[2 * kk][1] * v1},
                             {s[2 * kk][2] * v0, s[2 * kk][3] * v1},
                             {s[2 * kk + 1][0] * v2, s[2 * kk + 1][1] * v3},
                             {s[2 * kk + 1][2] * v2, s[2 * kk + 1][3] * v3}};
      uint32_t a[4], a_lo[4];  // P rounded, and (exact P) what the rounding left out
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = Tr::pack(x[i][0], x[i][1]);
        if constexpr (kExactP) {
          const float2 hi = Tr::unpack(a[i]);
          a_lo[i] = Tr::pack(x[i][0] - hi.x, x[i][1] - hi.y);
        }
      }
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, vS + (kk * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kPitch + dp * 16 + (lane / 16) * 8);
        Tr::mma(o[2 * dp], a, vf[0], vf[1]);
        Tr::mma(o[2 * dp + 1], a, vf[2], vf[3]);
        if constexpr (kExactP) {
          Tr::mma(o[2 * dp], a_lo, vf[0], vf[1]);
          Tr::mma(o[2 * dp + 1], a_lo, vf[2], vf[3]);
        }
      }
    }
  }

  // out = o / l, lse = m ln 2 + ln l; a row that saw nothing: 0 and -inf.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float sum = l[rr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t gr = m0 + warp * 16 + lane / 4 + rr * 8;
    if (gr >= packed) continue;
    const int i = int(gr / G), h = kvh * G + int(gr % G);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    Elem* out = static_cast<Elem*>(p.out) + ((int64_t(b) * p.T + i) * p.Hq + h) * kD;
#pragma unroll
    for (int nt = 0; nt < kD / 8; ++nt)
      *reinterpret_cast<uint32_t*>(out + nt * 8 + (lane % 4) * 2) =
          Tr::pack(o[nt][2 * rr] * inv, o[nt][2 * rr + 1] * inv);
    if (lane % 4 == 0)
      p.lse[(int64_t(b) * p.Hq + h) * p.T + i] = sum > 0.f ? m[rr] * kLn2 + logf(sum) : -INFINITY;
  }
}

}  // namespace memory3::prefill

#ifndef M3_PREFILL_EMULATE
namespace memory3::prefill {

// Launches the kernel for one (dtype, head dim, bank type); the dispatcher
// (csrc/cuda/memory_attention_prefill.cu) has checked the shapes and alignment. The launch
// error, if any, is left for the caller's cudaGetLastError.
template <typename Elem, int kD, bool kInt8, bool kExactP>
void launch_forward(const MemoryAttentionParams& p, cudaStream_t stream) {
  constexpr int kWarps = 4;
  using Cfg = ForwardConfig<Elem, kD, kWarps, kInt8>;
  const int64_t tiles = (int64_t(p.T) * (p.Hq / p.Hkv) + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t blocks = tiles * p.B * p.Hkv;
  if (blocks == 0) return;
  auto kernel = memory_attention_prefill_kernel<Elem, kD, kWarps, kInt8, kExactP>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
  kernel<<<dim3(unsigned(blocks)), dim3(Cfg::kThreads), Cfg::kSmem, stream>>>(p);
}

// Every head dim of one dtype, float and int8 banks, exact or rounded P (one translation
// unit per dtype).
template <typename Elem, int kD>
void launch_forward_variant(const MemoryAttentionParams& p, bool int8_bank, bool exact_p, cudaStream_t stream) {
  if (int8_bank) exact_p ? launch_forward<Elem, kD, true, true>(p, stream) : launch_forward<Elem, kD, true, false>(p, stream);
  else exact_p ? launch_forward<Elem, kD, false, true>(p, stream) : launch_forward<Elem, kD, false, false>(p, stream);
}

template <typename Elem>
bool launch_forward_dims(const MemoryAttentionParams& p, bool int8_bank, bool exact_p, cudaStream_t stream) {
  switch (p.D) {
    case 32: launch_forward_variant<Elem, 32>(p, int8_bank, exact_p, stream); return true;
    case 64: launch_forward_variant<Elem, 64>(p, int8_bank, exact_p, stream); return true;
    case 80: launch_forward_variant<Elem, 80>(p, int8_bank, exact_p, stream); return true;
    case 96: launch_forward_variant<Elem, 96>(p, int8_bank, exact_p, stream); return true;
    case 128: launch_forward_variant<Elem, 128>(p, int8_bank, exact_p, stream); return true;
    default: return false;
  }
}

}  // namespace memory3::prefill
#endif  // M3_PREFILL_EMULATE
