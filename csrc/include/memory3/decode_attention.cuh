// memory_attention forward on the GPU for decode and short query blocks: one softmax over the
// causal context and the memories of each query's chunk, memories read by id from the bank
// in place (int8 dequantized in registers). Torch-free; the launcher is
// csrc/cuda/memory_attention.cu, the instantiations csrc/cuda/decode_attention_*.cu.
//
// Work: a block owns kDecodeRows packed query rows (row = query * G + head of the GQA group,
// so a KV head's context row is read once for the whole group) of one (sequence, KV head),
// and one split of the context (split-K: the host picks the split count from the shapes and
// the SM count, never from data). Keys arrive in tiles of kDecodeKeys rows: first the
// memories of every chunk the block's rows touch (split 0 only), then the split's context.
// Tiles go global -> shared by cp.async (16-byte pieces, rows padded to an odd number of
// 16-byte pieces, so 8 lanes reading 8 rows hit 32 distinct banks) in a ring of kStages.
// Per tile: scores S = q k (one lane per key, each warp four rows), an online softmax (one
// warp per row, lane = key; base-2 exponentials on pre-scaled q), O += P V (each thread owns
// 16-byte column pieces of a few rows). Splits > 1 write normalized partial rows and their
// lse; decode_merge_kernel combines them by log-sum-exp. Accumulation is float (double for
// double inputs).
//
// Rows are any query rows, so T > kDecodeMaxQueries is served correctly too (each row block
// reads its context again: the prefill kernel of "CUDA, part 2" replaces that path).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "memory3/cuda_common.cuh"
#include "memory3/decode_schedule.h"
#include "memory3/params.h"

namespace memory3::cuda {

// The split of one call: partial rows o [splits, B, T, Hq, D] (Acc, normalized) and their
// lse [splits, B, Hq, T] (natural log), both unused when splits == 1.
struct DecodeSplit {
  int splits;
  int split_len;
  void* part_o;
  float* part_lse;
};

template <typename T, typename MT, int kD>
struct DecodeTraits {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  static constexpr bool kVec = kD > 0;                     // 16-byte path (host checked alignment)
  static constexpr int kVW = kVec ? 16 / int(sizeof(T)) : 1;  // columns per owned piece of O
  static constexpr int kStages = decode_stages(int(sizeof(T)));
  static constexpr int kMaxD = kVec ? kD : kDecodeMaxD;
  static constexpr int kOwned = int(ceil_div(kDecodeRows * (kMaxD / kVW), kDecodeThreads));
  static_assert(!kVec || kD % kVW == 0, "a head dim of the 16-byte path fills whole pieces");
};

// The softmax's exponential: base 2 on base-2-scaled scores (float), natural (double).
M3_DEV float exp_base(float x) { return exp2f(x); }
M3_DEV double exp_base(double x) { return exp(x); }

// n values of Acc from shared memory at q (aligned to min(16, n * sizeof(Acc)) bytes).
template <typename Acc, int n>
M3_DEV void load_acc(Acc (&dst)[n], const Acc* q) {
  constexpr int kPer = (16 / int(sizeof(Acc))) < n ? (16 / int(sizeof(Acc))) : n;
#pragma unroll
  for (int i = 0; i < n; i += kPer) {
    Acc part[kPer];
    load_vec<Acc, kPer>(part, q + i);
#pragma unroll
    for (int e = 0; e < kPer; ++e) dst[i + e] = part[e];
  }
}

// ---------------------------------------------------------------- the block's state

template <typename T, typename MT, int kD>
struct DecodeBlock {
  using Tr = DecodeTraits<T, MT, kD>;
  using Acc = typename Tr::Acc;

  const MemoryAttentionParams& p;
  const DecodeLayout& lay;
  unsigned char* smem;
  int D, G, b, kvh, row0, nrows, L;

  M3_DEV Acc* q_s() const { return reinterpret_cast<Acc*>(smem + lay.q); }
  M3_DEV Acc* s_s() const { return reinterpret_cast<Acc*>(smem + lay.s); }
  M3_DEV Acc* m_s() const { return reinterpret_cast<Acc*>(smem + lay.stat); }
  M3_DEV Acc* l_s() const { return m_s() + kDecodeRows; }
  M3_DEV Acc* alpha_s() const { return m_s() + 2 * kDecodeRows; }
  M3_DEV int* pos_s() const { return reinterpret_cast<int*>(smem + lay.rows); }
  M3_DEV int* chunk_s() const { return pos_s() + kDecodeRows; }
  M3_DEV unsigned char* stage(int st) const { return smem + lay.stage + st * lay.stage_bytes; }
  M3_DEV float* kscale_s(int st) const { return reinterpret_cast<float*>(stage(st) + lay.scale_k); }
  M3_DEV float* vscale_s(int st) const { return reinterpret_cast<float*>(stage(st) + lay.scale_v); }
  M3_DEV int* ok_s(int st) const { return reinterpret_cast<int*>(stage(st) + lay.ok); }

  // Memory key n of chunk c: its bank id if the slot holds a valid one, else -1 (a bad id
  // is recorded when `record`).
  M3_DEV int64_t memory_id(int c, int n, bool record) const {
    const int r = n / p.M;
    const int64_t flat = (int64_t(b) * p.C + c) * p.R + r;
    const int64_t id = p.mem_ids[flat];
    if (id >= 0 && id < p.N) return id;
    if (record && id != -1) record_range_error(p.range_error, kRangeMemIds, flat, id, p.N);
    return -1;
  }

  // Copies tile rows (keys key0.. of one source) into a stage: row(key) gives the source row
  // or null (the row is zero-filled). E is the element type of the source.
  template <typename E, typename RowFn>
  M3_DEV void copy_rows(unsigned char* dst, int stride, RowFn row) const {
    if constexpr (Tr::kVec) {
      const int pieces = D * int(sizeof(E)) / 16;
      for (int idx = threadIdx.x; idx < kDecodeKeys * pieces; idx += kDecodeThreads) {
        const int key = idx / pieces, piece = idx % pieces;
        const E* src = row(key);
        cp_async16(dst + key * stride + piece * 16,
                   src ? static_cast<const void*>(src + piece * (16 / int(sizeof(E)))) : p.q, src != nullptr);
      }
    } else {
      for (int idx = threadIdx.x; idx < kDecodeKeys * D; idx += kDecodeThreads) {
        const int key = idx / D, d = idx % D;
        const E* src = row(key);
        reinterpret_cast<E*>(dst + key * stride)[d] = src ? src[d] : E(0);
      }
    }
  }

  // A tile (memory keys n0.. of chunk c, or context keys j0..) into stage st.
  M3_DEV void load_tile(const DecodeTile& tile, int st, int ctx_hi) const {
    unsigned char* kt = stage(st);
    unsigned char* vt = kt + lay.v_off;
    if (tile.memory) {
      const int c = tile.chunk, n0 = tile.first;
      const int stride = decode_tile_stride(D, int(sizeof(MT)));
      if (threadIdx.x < kDecodeKeys) {
        const int n = n0 + threadIdx.x;
        const int64_t id = n < p.R * p.M ? memory_id(c, n, true) : -1;
        float ks = 1.0f, vs = 1.0f;
        if (id >= 0 && p.mem_k_scale) {
          const int64_t srow = (id * p.Hkv + kvh) * p.M + n % p.M;
          ks = p.mem_k_scale[srow], vs = p.mem_v_scale[srow];
        }
        ok_s(st)[threadIdx.x] = id >= 0;
        kscale_s(st)[threadIdx.x] = ks, vscale_s(st)[threadIdx.x] = vs;
      }
      auto mem_row = [&](const void* bank, int64_t sn, int64_t sh, int64_t sm) {
        return [=](int key) -> const MT* {
          const int n = n0 + key;
          if (n >= p.R * p.M) return nullptr;
          const int64_t id = memory_id(c, n, false);
          if (id < 0) return nullptr;
          return static_cast<const MT*>(bank) + id * sn + kvh * sh + (n % p.M) * sm;
        };
      };
      copy_rows<MT>(kt, stride, mem_row(p.mem_k, p.mk_stride_n, p.mk_stride_h, p.mk_stride_m));
      copy_rows<MT>(vt, stride, mem_row(p.mem_v, p.mv_stride_n, p.mv_stride_h, p.mv_stride_m));
    } else {
      const int j0 = tile.first;
      if (threadIdx.x < kDecodeKeys) {
        ok_s(st)[threadIdx.x] = j0 + int(threadIdx.x) < ctx_hi;
        kscale_s(st)[threadIdx.x] = 1.0f, vscale_s(st)[threadIdx.x] = 1.0f;
      }
      auto ctx_row = [&](const void* base, int64_t sb, int64_t ss, int64_t sh) {
        return [=](int key) -> const T* {
          const int j = j0 + key;
          if (j >= ctx_hi) return nullptr;
          return static_cast<const T*>(base) + b * sb + int64_t(j) * ss + kvh * sh;
        };
      };
      copy_rows<T>(kt, lay.stride, ctx_row(p.k, p.k_stride_b, p.k_stride_s, p.k_stride_h));
      copy_rows<T>(vt, lay.stride, ctx_row(p.v, p.v_stride_b, p.v_stride_s, p.v_stride_h));
    }
  }

  // S = q k for the tile in stage st, masked (decode_sees; keys of empty slots are not ok):
  // lane = key, warp w rows w, w + 4, w + 8, w + 12.
  template <typename E>
  M3_DEV void scores(int st, const DecodeTile& tile, const DecodeTiles& tiles) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int stride = decode_tile_stride(D, int(sizeof(E)));
    const E* krow = reinterpret_cast<const E*>(stage(st) + lane * stride);
    constexpr int kRowsPerWarp = kDecodeRows / kDecodeWarps;
    Acc acc[kRowsPerWarp];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) acc[k] = Acc(0);
    const Acc* q = q_s();
    if constexpr (Tr::kVec) {
      constexpr int kEV = 16 / int(sizeof(E));
#pragma unroll 2
      for (int d0 = 0; d0 < kD; d0 += kEV) {
        E kv[kEV];
        load_vec<E, kEV>(kv, krow + d0);
        Acc kf[kEV];
#pragma unroll
        for (int e = 0; e < kEV; ++e) kf[e] = to_acc<Acc>(kv[e]);
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
          Acc qv[kEV];
          load_acc<Acc, kEV>(qv, q + (warp + k * kDecodeWarps) * kD + d0);
#pragma unroll
          for (int e = 0; e < kEV; ++e) acc[k] += qv[e] * kf[e];
        }
      }
    } else {
      for (int d = 0; d < D; ++d) {
        const Acc kf = to_acc<Acc>(krow[d]);
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) acc[k] += q[(warp + k * kDecodeWarps) * D + d] * kf;
      }
    }
    const bool key_ok = ok_s(st)[lane] != 0;
    const Acc ks = Acc(kscale_s(st)[lane]);
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const int r = warp + k * kDecodeWarps;
      const bool seen =
          key_ok && r < nrows && decode_sees(tile, tiles, lane, pos_s()[r], chunk_s()[r], int64_t(p.R) * p.M);
      s_s()[r * kDecodeKeys + lane] = seen ? acc[k] * ks : Acc(-INFINITY);
    }
  }

  // Online softmax over the tile's scores: one warp per row, lane = key.
  M3_DEV void softmax() const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = warp; r < nrows; r += kDecodeWarps) {
      const Acc s = s_s()[r * kDecodeKeys + lane];
      const Acc m_old = m_s()[r];
      const Acc m_new = max(m_old, warp_max(s));
      Acc prob = Acc(0), alpha = Acc(1);
      if (m_new != Acc(-INFINITY)) {  // else the row has seen no key yet: O stays zero
        prob = exp_base(s - m_new);
        alpha = exp_base(m_old - m_new);
      }
      const Acc sum = warp_sum(prob);
      s_s()[r * kDecodeKeys + lane] = prob;
      if (lane == 0) m_s()[r] = m_new, l_s()[r] = l_s()[r] * alpha + sum, alpha_s()[r] = alpha;
    }
  }

  // O = alpha O + P V for the owned pieces (piece = kVW columns of one row). V rows of keys
  // nobody sees are zero (zero-filled copies), so their P = 0 adds nothing.
  template <typename E, bool kScaled>
  M3_DEV void accumulate(int st, Acc (&o)[Tr::kOwned][Tr::kVW]) const {
    constexpr int kVW = Tr::kVW;
    const int pieces = D / kVW;
    const int stride = decode_tile_stride(D, int(sizeof(E)));
    const unsigned char* vt = stage(st) + lay.v_off;
    const float* vscale = vscale_s(st);
#pragma unroll
    for (int w = 0; w < Tr::kOwned; ++w) {
      const int idx = threadIdx.x + w * kDecodeThreads;
      const int r = idx / pieces, piece = idx % pieces;
      if (r >= nrows) continue;
      const Acc alpha = alpha_s()[r];
#pragma unroll
      for (int e = 0; e < kVW; ++e) o[w][e] *= alpha;
      const Acc* prob = s_s() + r * kDecodeKeys;
#pragma unroll 4
      for (int j = 0; j < kDecodeKeys; ++j) {
        Acc pj = prob[j];
        if constexpr (kScaled) pj *= Acc(vscale[j]);
        const E* vrow = reinterpret_cast<const E*>(vt + j * stride) + piece * kVW;
        E vv[kVW];
        if constexpr (Tr::kVec) load_vec<E, kVW>(vv, vrow);
        else vv[0] = vrow[0];
#pragma unroll
        for (int e = 0; e < kVW; ++e) o[w][e] += pj * to_acc<Acc>(vv[e]);
      }
    }
  }
};

// ---------------------------------------------------------------- kernels

template <typename T, typename MT, int kD>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(const MemoryAttentionParams p, const DecodeSplit sp) {
  using Tr = DecodeTraits<T, MT, kD>;
  using Acc = typename Tr::Acc;
  M3_DYNAMIC_SMEM(smem);
  const int D = kD > 0 ? kD : p.D;
  const DecodeLayout lay = decode_layout(D, int(sizeof(T)), int(sizeof(Acc)), Tr::kStages);
  const int G = p.Hq / p.Hkv;
  const int64_t row_blocks = decode_row_blocks(p.T, G);
  const int rb = int(blockIdx.x % row_blocks);
  const int64_t bh = blockIdx.x / row_blocks;
  const int kvh = int(bh % p.Hkv), b = int(bh / p.Hkv);
  const int split = blockIdx.y;
  const int tid = threadIdx.x;
  const int row0 = rb * kDecodeRows;
  const int nrows = int(min(int64_t(kDecodeRows), int64_t(p.T) * G - row0));

  // The sequence's length, checked: a bad one is an empty sequence (and recorded).
  const int len = p.kv_lens ? p.kv_lens[b] : p.S;
  const int L = decode_length(len, p.S);
  if (L != len && tid == 0) record_range_error(p.range_error, kRangeKvLens, b, len, p.S);
  if (tid == 0 && kvh == 0 && rb == 0 && split == 0 && int64_t(L) - 1 >= p.chunk_start) {
    const int64_t need = (int64_t(L) - 1 - p.chunk_start) / p.chunk_size + 1;
    if (need > p.C) record_range_error(p.range_error, kRangeChunks, b, L, p.C, need);
  }
  // Every id of the sequence, read below or not (the CPU op checks them all; int64 ids were
  // checked by the narrowing kernel already): one block per sequence.
  if (kvh == 0 && rb == 0 && split == 0 && p.range_error != nullptr) {
    const int64_t base = int64_t(b) * p.C * p.R, n = int64_t(p.C) * p.R;
    for (int64_t i = tid; i < n; i += kDecodeThreads) {
      const int id = p.mem_ids[base + i];
      if (id < -1 || id >= p.N) record_range_error(p.range_error, kRangeMemIds, base + i, id, p.N);
    }
  }

  DecodeBlock<T, MT, kD> blk{p, lay, smem, D, G, b, kvh, row0, nrows, L};
  if (tid < kDecodeRows) {
    DecodeRow row{-1, -1};  // rows past the block see nothing
    if (tid < nrows) row = decode_row(L, p.T, G, row0 + tid, p.chunk_start, p.chunk_size, p.C);
    blk.pos_s()[tid] = row.pos, blk.chunk_s()[tid] = row.chunk;
    blk.m_s()[tid] = Acc(-INFINITY), blk.l_s()[tid] = Acc(0), blk.alpha_s()[tid] = Acc(1);
  }
  // Queries, pre-scaled (base 2 for float: exp2 of scores is the softmax's exp).
  const Acc qmul = std::is_same_v<Acc, float> ? Acc(p.scale * 1.4426950408889634) : Acc(p.scale);
  const T* q = static_cast<const T*>(p.q);
  for (int idx = tid; idx < kDecodeRows * D; idx += kDecodeThreads) {
    const int r = idx / D, d = idx % D;
    Acc x = Acc(0);
    if (r < nrows) {
      const int row = row0 + r, i = row / G, h = kvh * G + row % G;
      x = to_acc<Acc>(q[b * p.q_stride_b + int64_t(i) * p.q_stride_t + h * p.q_stride_h + d]) * qmul;
    }
    blk.q_s()[idx] = x;
  }
  __syncthreads();

  // The block's tiles: memories of chunks c_lo.. (split 0), then context [ctx_lo, ctx_hi).
  const DecodeTiles tiles = decode_tiles(blk.chunk_s(), nrows, blk.pos_s()[nrows - 1], split, sp.split_len,
                                         int64_t(p.R) * p.M);
  const int n_tiles = tiles.n_mem + tiles.n_ctx;

  Acc o[Tr::kOwned][Tr::kVW];
#pragma unroll
  for (int w = 0; w < Tr::kOwned; ++w)
#pragma unroll
    for (int e = 0; e < Tr::kVW; ++e) o[w][e] = Acc(0);

  constexpr int kStages = Tr::kStages;
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) blk.load_tile(decode_tile(tiles, t), t, tiles.ctx_hi);
    cp_async_commit();
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int ahead = t + kStages - 1;
    if (ahead < n_tiles) blk.load_tile(decode_tile(tiles, ahead), ahead % kStages, tiles.ctx_hi);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // tile t has landed (this thread's copies) ...
    __syncthreads();               // ... and everyone's
    const int st = t % kStages;
    const DecodeTile tile = decode_tile(tiles, t);
    const bool mem = tile.memory;
    const bool scaled = mem && p.mem_k_scale != nullptr;
    if (mem) blk.template scores<MT>(st, tile, tiles);
    else blk.template scores<T>(st, tile, tiles);
    __syncthreads();
    blk.softmax();
    __syncthreads();
    if (scaled) blk.template accumulate<MT, true>(st, o);
    else if (mem) blk.template accumulate<MT, false>(st, o);
    else blk.template accumulate<T, false>(st, o);
    __syncthreads();  // the stage is free for the load of tile t + kStages
  }
  cp_async_wait<0>();

  // Normalized rows and lse: to out/lse, or to this split's partial slots.
  const int pieces = D / Tr::kVW;
#pragma unroll
  for (int w = 0; w < Tr::kOwned; ++w) {
    const int idx = tid + w * kDecodeThreads;
    const int r = idx / pieces, piece = idx % pieces;
    if (r >= nrows) continue;
    const int row = row0 + r, i = row / G, h = kvh * G + row % G;
    const Acc l = blk.l_s()[r];
    const Acc inv = l > Acc(0) ? Acc(1) / l : Acc(0);
    const int64_t off = ((int64_t(b) * p.T + i) * p.Hq + h) * D + piece * Tr::kVW;
    if (sp.splits == 1) {
      T vals[Tr::kVW];
#pragma unroll
      for (int e = 0; e < Tr::kVW; ++e) vals[e] = from_acc<T>(o[w][e] * inv);
      if constexpr (Tr::kVec) store_vec<T, Tr::kVW>(static_cast<T*>(p.out) + off, vals);
      else static_cast<T*>(p.out)[off] = vals[0];
    } else {
      Acc vals[Tr::kVW];
#pragma unroll
      for (int e = 0; e < Tr::kVW; ++e) vals[e] = o[w][e] * inv;
      Acc* part = static_cast<Acc*>(sp.part_o) + int64_t(split) * p.B * p.T * p.Hq * D + off;
      if constexpr (Tr::kVec) store_vec<Acc, Tr::kVW>(part, vals);
      else part[0] = vals[0];
    }
  }
  if (tid < nrows) {
    const int row = row0 + tid, i = row / G, h = kvh * G + row % G;
    const Acc l = blk.l_s()[tid], m = blk.m_s()[tid];
    float lse = -INFINITY;
    if (l > Acc(0)) {
      if constexpr (std::is_same_v<Acc, float>) lse = (m + log2f(l)) * 0.6931471805599453f;
      else lse = float(m + log(l));
    }
    const int64_t off = (int64_t(b) * p.Hq + h) * p.T + i;
    if (sp.splits == 1) p.lse[off] = lse;
    else sp.part_lse[int64_t(split) * p.B * p.Hq * p.T + off] = lse;
  }
}

// out and lse of every (b, i, h) row from the splits' partial rows: one warp per row.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_merge_kernel(const MemoryAttentionParams p, const DecodeSplit sp) {
  M3_SHARED float weight[kDecodeWarps][kDecodeMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * kDecodeWarps + warp;  // (b, i, h)
  if (row >= int64_t(p.B) * p.T * p.Hq) return;  // whole warps
  const int h = int(row % p.Hq);
  const int64_t bt = row / p.Hq;
  const int i = int(bt % p.T), b = int(bt / p.T);
  const int64_t lse_off = (int64_t(b) * p.Hq + h) * p.T + i, lse_step = int64_t(p.B) * p.Hq * p.T;
  const int64_t o_off = row * p.D, o_step = int64_t(p.B) * p.T * p.Hq * p.D;
  float mx = -INFINITY;
  for (int s = lane; s < sp.splits; s += 32) mx = fmaxf(mx, sp.part_lse[s * lse_step + lse_off]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int s = lane; s < sp.splits; s += 32) {
    const float w = mx == -INFINITY ? 0.0f : __expf(sp.part_lse[s * lse_step + lse_off] - mx);
    weight[warp][s] = w;
    sum += w;
  }
  sum = warp_sum(sum);
  __syncwarp();
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const float* part = static_cast<const float*>(sp.part_o);
  for (int d = lane; d < p.D; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < sp.splits; ++s) acc += weight[warp][s] * part[s * o_step + o_off + d];
    static_cast<T*>(p.out)[o_off + d] = from_acc<T>(acc * inv);
  }
  if (lane == 0) p.lse[lse_off] = sum > 0.0f ? mx + logf(sum) : -INFINITY;
}

// ---------------------------------------------------------------- host entry points
#ifndef M3_EMULATE_CUDA

// Launches the decode kernel on `stream` (grid: B * Hkv * row blocks, splits). Instantiated
// per (T, MT, kD) in csrc/cuda/decode_attention_*.cu; returns the launch status.
template <typename T, typename MT, int kD>
cudaError_t run_decode_attention(const MemoryAttentionParams& p, const DecodeSplit& sp, cudaStream_t stream) {
  using Tr = DecodeTraits<T, MT, kD>;
  const int D = kD > 0 ? kD : p.D;
  const DecodeLayout lay = decode_layout(D, int(sizeof(T)), int(sizeof(typename Tr::Acc)), Tr::kStages);
  auto kernel = decode_attention_kernel<T, MT, kD>;
  if (lay.total > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, lay.total);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(unsigned(int64_t(p.B) * p.Hkv * decode_row_blocks(p.T, p.Hq / p.Hkv)), unsigned(sp.splits));
  kernel<<<grid, kDecodeThreads, lay.total, stream>>>(p, sp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_decode_merge(const MemoryAttentionParams& p, const DecodeSplit& sp, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.T * p.Hq;
  decode_merge_kernel<T><<<unsigned(ceil_div(rows, kDecodeWarps)), kDecodeThreads, 0, stream>>>(p, sp);
  return cudaGetLastError();
}

// Shared memory a (T, MT, kD) instantiation needs at head dim D: the launcher checks it
// against the device's opt-in limit.
template <typename T>
M3_HD int decode_smem_bytes(int D) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  return decode_layout(D, int(sizeof(T)), int(sizeof(Acc)), decode_stages(int(sizeof(T)))).total;
}

#endif  // M3_EMULATE_CUDA

}  // namespace memory3::cuda

// Explicit instantiations (PREFIX empty) and their extern declarations (PREFIX extern) for
// the launcher: both bank types of one (dtype, head dim).
#define M3_DECODE_INSTANCES(PREFIX, T, KD)                                                            \
  PREFIX template cudaError_t memory3::cuda::run_decode_attention<T, T, KD>(                          \
      const memory3::MemoryAttentionParams&, const memory3::cuda::DecodeSplit&, cudaStream_t);        \
  PREFIX template cudaError_t memory3::cuda::run_decode_attention<T, int8_t, KD>(                     \
      const memory3::MemoryAttentionParams&, const memory3::cuda::DecodeSplit&, cudaStream_t);
#define M3_DECODE_MERGE_INSTANCE(PREFIX, T)                                                           \
  PREFIX template cudaError_t memory3::cuda::run_decode_merge<T>(const memory3::MemoryAttentionParams&, \
                                                                 const memory3::cuda::DecodeSplit&, cudaStream_t);
