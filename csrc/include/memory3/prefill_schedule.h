// The index arithmetic of the CUDA prefill kernel (prefill_attention.cuh), kept apart from it
// so that the host compiler can test it (csrc/cuda/nvcc_check/prefill_schedule_test.cpp, run
// by tests/test_cuda_prefill_schedule.py with g++): which rows a tile holds, the positions
// they sit at, which memory chunks and context key blocks the tile visits, and which
// (row, key) pairs are visible. Torch-free and CUDA-free.
//
// Rows. A CTA owns one (sequence b, KV head) and kRows consecutive "packed rows" of it:
// packed row r is query r / G, head r % G of the GQA group (G = Hq / Hkv), so each key and
// memory row in shared memory serves the whole group (FA3's pack_gqa).
// Keys. A tile first visits the memories of every chunk its queries fall in (R * M keys per
// chunk, read by id, in blocks of kBlockN), then the causal context in blocks of kBlockN,
// all in one online softmax.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define M3_PREFILL_HD __host__ __device__ __forceinline__
#else
#define M3_PREFILL_HD inline
#endif

namespace memory3::prefill {

constexpr int kBlockN = 64;  // keys per block (memory or context)

// Elements between two rows of a shared-memory tile: 16 bytes of padding make the 8 row
// addresses of one ldmatrix land in 8 distinct 16-byte bank groups for D = 32, 64, 80, 96, 128.
constexpr M3_PREFILL_HD int smem_pitch(int D) { return D + 8; }

// Dynamic shared memory of the forward kernel: Q tile, two stages of K and V, and per stage
// the per-key memory scales and validity flags.
constexpr M3_PREFILL_HD int forward_smem_bytes(int D, int rows, int elem_bytes) {
  return (rows + 4 * kBlockN) * smem_pitch(D) * elem_bytes + 2 * kBlockN * (2 * 4 + 4);
}

// First position of chunk c, in int64: chunk_start + c * chunk_size may pass int32.
constexpr M3_PREFILL_HD int64_t chunk_begin(int c, int chunk_size, int chunk_start) {
  return chunk_start + int64_t(c) * chunk_size;
}

// Context position of packed row gr (kNone when the row is past the last query or its query
// is padding, position < 0): such rows see no key at all.
constexpr int kNone = -1;
constexpr M3_PREFILL_HD int row_position(int64_t gr, int G, int T, int L) {
  return gr >= int64_t(T) * G ? kNone : (L - T + int(gr / G) < 0 ? kNone : L - T + int(gr / G));
}

// The chunk whose memories a query at `pos` sees, or -1 (before chunk_start, or no query).
constexpr M3_PREFILL_HD int row_chunk(int pos, int chunk_size, int chunk_start) {
  return pos < 0 || pos < chunk_start ? -1 : (pos - chunk_start) / chunk_size;
}

// What one tile visits. Blocks 0 .. memory_blocks() - 1 are memory blocks, chunk by chunk;
// the rest are context blocks from key 0.
struct TilePlan {
  int p_lo, p_hi;        // positions of the tile's first and last query (p_hi < 0: nothing seen)
  int c_lo, c_hi;        // chunks whose memories the tile sees (c_hi < c_lo: none)
  int blocks_per_chunk;  // ceil(R * M / kBlockN)
  int ctx_blocks;        // context keys 0 .. p_hi in blocks of kBlockN
  M3_PREFILL_HD int memory_blocks() const { return c_hi < c_lo ? 0 : (c_hi - c_lo + 1) * blocks_per_chunk; }
  M3_PREFILL_HD int blocks() const { return memory_blocks() + ctx_blocks; }
};

// Tile of packed rows [m0, m0 + rows) of a sequence with L context tokens (its T queries at
// positions L - T .. L - 1). Chunks past the table (c >= C) are not visited: the launcher
// checks the table covers every query, so this only keeps a bad table from being read past.
M3_PREFILL_HD TilePlan plan_tile(int64_t m0, int rows, int G, int T, int L, int chunk_size, int chunk_start, int C,
                         int R, int M) {
  TilePlan t{};
  const int i_lo = int(m0 / G);
  const int64_t last_row = m0 + rows - 1 < int64_t(T) * G - 1 ? m0 + rows - 1 : int64_t(T) * G - 1;
  const int i_hi = int(last_row / G);
  t.p_lo = L - T + i_lo;
  t.p_hi = L - T + i_hi;
  t.ctx_blocks = t.p_hi < 0 ? 0 : t.p_hi / kBlockN + 1;
  t.blocks_per_chunk = (R * M + kBlockN - 1) / kBlockN;
  int first = t.p_lo > chunk_start ? t.p_lo : chunk_start;
  if (first < 0) first = 0;
  t.c_lo = 0;
  t.c_hi = -1;
  if (t.p_hi >= first && t.blocks_per_chunk > 0) {
    t.c_lo = (first - chunk_start) / chunk_size;
    t.c_hi = (t.p_hi - chunk_start) / chunk_size;
    if (t.c_hi > C - 1) t.c_hi = C - 1;
  }
  return t;
}

// Block `idx` of a plan: a memory block (chunk, first key j0 of the chunk's R * M) or a
// context block (chunk = -1, first context key j0).
struct KeyBlock {
  bool memory;
  int chunk;
  int j0;
};

M3_PREFILL_HD KeyBlock key_block(const TilePlan& t, int idx) {
  const int nm = t.memory_blocks();
  if (idx < nm) return {true, t.c_lo + idx / t.blocks_per_chunk, (idx % t.blocks_per_chunk) * kBlockN};
  return {false, -1, (idx - nm) * kBlockN};
}

// A context block needs the per-element mask unless every row of the tile sees all its keys.
M3_PREFILL_HD bool context_block_needs_mask(const TilePlan& t, int j0) { return j0 + kBlockN - 1 > t.p_lo; }

// Is key `col` of block kb visible to a row at `pos` (row_position) in chunk `chunk`
// (row_chunk)? For memory blocks the caller also drops empty slots (id -1) and keys past
// R * M (memory_key_valid).
M3_PREFILL_HD bool visible(const KeyBlock& kb, int col, int pos, int chunk) {
  return kb.memory ? (chunk >= 0 && chunk == kb.chunk) : (pos >= 0 && kb.j0 + col <= pos);
}

// Slot and token of key j of a chunk's memory list (j = slot * M + token).
struct MemoryKey {
  int slot, token;
};
constexpr M3_PREFILL_HD MemoryKey memory_key(int j, int M) { return {j / M, j % M}; }

// Work order: tile-major from the last tile (the longest context) down, so the heaviest CTAs
// start first; blockIdx.x = tile_rev * BH + bh.
struct TileIndex {
  int tile;   // query tile, m0 = tile * rows
  int64_t bh; // b * Hkv + kvh
};
constexpr M3_PREFILL_HD TileIndex tile_of_block(int64_t block, int64_t BH, int tiles) {
  return {tiles - 1 - int(block / BH), block % BH};
}

}  // namespace memory3::prefill
