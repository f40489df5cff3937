// The index arithmetic of the CUDA decode kernel (memory3/decode_attention.cuh), in plain
// C++ that the host compiler reads too: which packed rows a block owns, each row's position
// and chunk, the split of the context (chosen on the host from shapes only), the tiles a
// block walks and which row sees which key, and the shared-memory layout.
// csrc/cuda/nvcc_check/decode_schedule_check.cpp runs these on the CPU against the
// reference's definition of which keys each query sees (tests/test_cuda_decode_schedule.py).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define M3_SCHEDULE __host__ __device__ __forceinline__
#else
#define M3_SCHEDULE inline
#endif

namespace memory3::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeRows = 16;           // packed query rows (query * G + head of group) per block
constexpr int kDecodeKeys = 32;           // keys per tile: one per lane in the softmax
constexpr int kDecodeMaxSplits = 64;      // context splits per row block
constexpr int kDecodeMaxD = 256;          // head dims the kernels take
constexpr int kDecodeMaxQueries = 16;     // T the split path is built for (decode, short blocks)
constexpr int kDecodeMinSplitKeys = 128;  // keys a split gets at least

M3_SCHEDULE constexpr int64_t sched_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
M3_SCHEDULE constexpr int sched_round_up16(int bytes) { return (bytes + 15) / 16 * 16; }

// Row blocks of one (sequence, KV head): T * G rows in blocks of kDecodeRows.
M3_SCHEDULE constexpr int64_t decode_row_blocks(int64_t T, int64_t G) { return sched_ceil_div(T * G, kDecodeRows); }

// Context splits per row block, from shapes and the SM count only (graph-capturable, no data
// read): enough blocks for ~8 per SM, each split at least kDecodeMinSplitKeys keys.
// blocks = B * Hkv * row blocks; S = context capacity (kv_lens may be shorter).
M3_SCHEDULE int decode_split_count(int64_t blocks, int64_t S, int sm_count) {
  const int64_t target = int64_t(sm_count) * 8;
  if (blocks <= 0 || blocks >= target) return 1;
  int64_t splits = sched_ceil_div(target, blocks);
  const int64_t by_len = S / kDecodeMinSplitKeys;
  splits = splits < by_len ? splits : by_len;
  splits = splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits;
  return splits < 1 ? 1 : int(splits);
}

// Keys of each split: the capacity cut in `splits` whole tiles; the last split may be short
// or empty (a ragged sequence leaves later splits empty: they write lse = -inf).
M3_SCHEDULE int64_t decode_split_len(int64_t S, int splits) {
  return sched_ceil_div(sched_ceil_div(S, splits), kDecodeKeys) * kDecodeKeys;
}

// The sequence length the kernel uses: kv_lens[b] (or S), an out-of-range one as 0 (an
// empty sequence; the kernel records it).
M3_SCHEDULE int decode_length(int len, int S) { return len < 0 || len > S ? 0 : len; }

// Position of packed row `row` (query row / G) of a sequence of length L, and its chunk:
// -1 for no memories (inside the prefix, padded, or past a too-short table of C chunks).
struct DecodeRow {
  int pos;
  int chunk;
};

M3_SCHEDULE DecodeRow decode_row(int L, int T, int G, int64_t row, int chunk_start, int chunk_size, int C) {
  DecodeRow r{int(L - T + row / G), -1};
  if (r.pos >= chunk_start) {  // chunk_start >= 0, so pos >= 0 too
    const int64_t c = (int64_t(r.pos) - chunk_start) / chunk_size;
    r.chunk = c < C ? int(c) : -1;
  }
  return r;
}

// The tiles of one block: n_mem memory tiles (split 0 only: tpc tiles for each chunk c_lo,
// c_lo + 1, ..) then n_ctx context tiles covering [ctx_lo, ctx_hi).
struct DecodeTiles {
  int n_mem, n_ctx, c_lo, tpc, ctx_lo, ctx_hi;
};

// chunks[r], r < nrows: the rows' chunks (a run of valid ones, non-decreasing); last_pos:
// the position of the block's last row (its furthest); RM = R * M memory keys per chunk.
M3_SCHEDULE DecodeTiles decode_tiles(const int* chunks, int nrows, int last_pos, int split, int64_t split_len,
                                     int64_t RM) {
  DecodeTiles t{};
  const int64_t key_end = last_pos + 1 > 0 ? last_pos + 1 : 0;
  const int64_t lo = int64_t(split) * split_len, hi = lo + split_len;
  t.ctx_lo = int(lo < key_end ? lo : key_end);
  t.ctx_hi = int(hi < key_end ? hi : key_end);
  t.n_ctx = int(sched_ceil_div(t.ctx_hi - t.ctx_lo, kDecodeKeys));
  t.c_lo = -1;
  int c_hi = -1;
  if (split == 0)
    for (int r = 0; r < nrows; ++r)
      if (chunks[r] >= 0) c_hi = chunks[r], t.c_lo = t.c_lo < 0 ? chunks[r] : t.c_lo;
  t.tpc = int(sched_ceil_div(RM, kDecodeKeys));
  t.n_mem = t.c_lo >= 0 ? (c_hi - t.c_lo + 1) * t.tpc : 0;
  return t;
}

// Tile `tile` of a block: a memory tile (chunk, first memory key n0) or a context tile
// (first context key j0).
struct DecodeTile {
  bool memory;
  int chunk, first;
};

M3_SCHEDULE DecodeTile decode_tile(const DecodeTiles& t, int tile) {
  if (tile < t.n_mem) return {true, t.c_lo + tile / t.tpc, (tile % t.tpc) * kDecodeKeys};
  return {false, -1, t.ctx_lo + (tile - t.n_mem) * kDecodeKeys};
}

// Whether a row (position pos, chunk) sees key `key` (0..kDecodeKeys-1) of a tile: a memory
// key when it exists (n < RM; the kernel also drops empty slots) and the tile is the row's
// chunk; a context key when it is inside the split and causal for the row.
M3_SCHEDULE bool decode_sees(const DecodeTile& tile, const DecodeTiles& t, int key, int pos, int chunk, int64_t RM) {
  if (tile.memory) return tile.first + key < RM && chunk == tile.chunk;
  const int j = tile.first + key;
  return j < t.ctx_hi && j <= pos;
}

// Bytes between key rows of a tile in shared memory: D elements rounded up to 16 bytes, plus
// 16 when that is an even number of 16-byte pieces (odd pieces: 8 lanes loading 16 bytes
// each from 8 rows hit 32 distinct banks).
M3_SCHEDULE int decode_tile_stride(int D, int elem_bytes) {
  int bytes = sched_round_up16(D * elem_bytes);
  if ((bytes / 16) % 2 == 0) bytes += 16;
  return bytes;
}

// Shared memory of a block, in bytes from the dynamic base (every part 16-byte aligned).
struct DecodeLayout {
  int q;       // Acc [kDecodeRows][D]: pre-scaled queries (rows past the block: zero)
  int s;       // Acc [kDecodeRows][kDecodeKeys]: scores, then probabilities
  int stat;    // Acc m[kDecodeRows], l[kDecodeRows], alpha[kDecodeRows]
  int rows;    // int pos[kDecodeRows], chunk[kDecodeRows]
  int stage;   // first stage; stage i at stage + i * stage_bytes
  int stage_bytes;
  int stride;  // bytes between key rows of a tile (for the dtype of q)
  int v_off, scale_k, scale_v, ok;  // within a stage: V tile, float scales[kDecodeKeys] x2, int ok[kDecodeKeys]
  int total;
};

M3_SCHEDULE DecodeLayout decode_layout(int D, int t_bytes, int acc_bytes, int stages) {
  DecodeLayout L{};
  int off = 0;
  L.q = off, off += sched_round_up16(kDecodeRows * D * acc_bytes);
  L.s = off, off += sched_round_up16(kDecodeRows * kDecodeKeys * acc_bytes);
  L.stat = off, off += sched_round_up16(3 * kDecodeRows * acc_bytes);
  L.rows = off, off += sched_round_up16(2 * kDecodeRows * 4);
  L.stride = decode_tile_stride(D, t_bytes);
  L.v_off = kDecodeKeys * L.stride;
  L.scale_k = 2 * kDecodeKeys * L.stride;
  L.scale_v = L.scale_k + 4 * kDecodeKeys;
  L.ok = L.scale_v + 4 * kDecodeKeys;
  L.stage_bytes = sched_round_up16(L.ok + 4 * kDecodeKeys);
  L.stage = off;
  L.total = off + stages * L.stage_bytes;
  return L;
}

// Stages of the cp.async ring: 2, or 1 for 8-byte elements (double: shared memory).
M3_SCHEDULE constexpr int decode_stages(int t_bytes) { return t_bytes == 8 ? 1 : 2; }

}  // namespace memory3::cuda
