// Host check of the prefill kernel's index arithmetic (include/memory3/prefill_schedule.h),
// built with the host compiler and run by tests/test_cuda_prefill_schedule.py, so the tile
// plan, the block order and the masks are tested on every machine, GPU or not.
//
// For random shapes, every tile's plan is walked block by block as the kernel does, and the
// (row, key) pairs it finds visible are compared with the reference's definition
// (memory3.reference: query i at position L - T + i sees context keys 0..pos and, when pos >=
// chunk_start, the memories of chunk (pos - chunk_start) / chunk_size): each visible pair
// exactly once, nothing else. Also: the tile order covers every (tile, b, kvh) once, the
// shared-memory pitch is free of ldmatrix bank conflicts, and the shared memory fits.
// Prints "ok" and exits 0, or prints the first mismatch and exits 1.
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "memory3/prefill_schedule.h"

using namespace memory3::prefill;

namespace {

int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      if (failures++ < 10) {                              \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

struct Shape {
  int G, T, L, chunk_size, chunk_start, C, R, M, rows;
};

// A key: (memory?, chunk or -1, index: key j of the chunk's R * M list, or context position).
using Key = std::tuple<bool, int, int>;
using Pair = std::tuple<int64_t, Key>;  // (packed row, key)

std::set<Pair> reference_pairs(const Shape& s, int64_t m0) {
  std::set<Pair> out;
  for (int64_t gr = m0; gr < m0 + s.rows && gr < int64_t(s.T) * s.G; ++gr) {
    const int pos = s.L - s.T + int(gr / s.G);
    if (pos < 0) continue;
    for (int j = 0; j <= pos; ++j) out.insert({gr, Key{false, -1, j}});
    if (pos >= s.chunk_start) {
      const int c = (pos - s.chunk_start) / s.chunk_size;
      if (c < s.C)
        for (int j = 0; j < s.R * s.M; ++j) out.insert({gr, Key{true, c, j}});
    }
  }
  return out;
}

void check_tile(const Shape& s, int64_t m0) {
  const TilePlan plan = plan_tile(m0, s.rows, s.G, s.T, s.L, s.chunk_size, s.chunk_start, s.C, s.R, s.M);
  std::set<Pair> got;
  for (int idx = 0; idx < plan.blocks(); ++idx) {
    const KeyBlock kb = key_block(plan, idx);
    if (kb.memory) CHECK(kb.chunk >= 0 && kb.chunk < s.C, "chunk %d of %d", kb.chunk, s.C);
    const bool needs_mask = kb.memory || context_block_needs_mask(plan, kb.j0);
    for (int r = 0; r < s.rows; ++r) {
      const int64_t gr = m0 + r;
      if (gr >= int64_t(s.T) * s.G) continue;  // past the last query: computed on zeros, never written
      const int pos = row_position(gr, s.G, s.T, s.L);
      const int chunk = row_chunk(pos, s.chunk_size, s.chunk_start);
      for (int col = 0; col < kBlockN; ++col) {
        const int j = kb.j0 + col;
        // Keys the kernel zero-fills (context past the tile's last position, memory keys past
        // R * M) must be masked or invisible: the mask covers them below.
        const bool exists = kb.memory ? j < s.R * s.M : j <= plan.p_hi;
        const bool vis = needs_mask ? visible(kb, col, pos, chunk) : true;
        if (!needs_mask) {
          // An unmasked block: every row of the tile must really see every key of it.
          CHECK(pos >= 0 && j <= pos, "unmasked block j0=%d has row %lld at pos %d", kb.j0, (long long)gr, pos);
        }
        if (vis && exists) {
          const Pair pr{gr, Key{kb.memory, kb.memory ? kb.chunk : -1, j}};
          CHECK(got.insert(pr).second, "pair visited twice (row %lld, key %d)", (long long)gr, j);
        }
        if (vis && !exists) CHECK(kb.memory, "context key %d past p_hi %d is visible to row %lld", j, plan.p_hi,
                                  (long long)gr);
      }
    }
  }
  const std::set<Pair> want = reference_pairs(s, m0);
  CHECK(got == want, "G=%d T=%d L=%d cs=%d c0=%d C=%d R=%d M=%d rows=%d m0=%lld: %zu pairs, want %zu", s.G, s.T,
        s.L, s.chunk_size, s.chunk_start, s.C, s.R, s.M, s.rows, (long long)m0, got.size(), want.size());
}

void check_shape(const Shape& s) {
  const int64_t packed = int64_t(s.T) * s.G;
  for (int64_t m0 = 0; m0 < packed; m0 += s.rows) check_tile(s, m0);
}

// ldmatrix reads 8 rows of 16 bytes at once: with the padded pitch they must fall in 8
// distinct 16-byte bank groups (128 bytes = 32 banks of 4 bytes).
void check_pitch() {
  for (int D : {32, 64, 80, 96, 128}) {
    std::set<int> groups;
    for (int r = 0; r < 8; ++r) groups.insert((r * smem_pitch(D) * 2) % 128 / 16);
    CHECK(groups.size() == 8, "D=%d pitch %d: ldmatrix rows share bank groups", D, smem_pitch(D));
    CHECK(smem_pitch(D) * 2 % 16 == 0, "D=%d: rows not 16-byte aligned", D);
    CHECK(forward_smem_bytes(D, 64, 2) <= 227 * 1024, "D=%d: %d bytes of shared memory", D,
          forward_smem_bytes(D, 64, 2));
  }
}

void check_tile_order() {
  for (int64_t BH : {1, 3, 40})
    for (int tiles : {1, 2, 7}) {
      std::set<std::pair<int, int64_t>> seen;
      for (int64_t block = 0; block < BH * tiles; ++block) {
        const TileIndex t = tile_of_block(block, BH, tiles);
        CHECK(t.tile >= 0 && t.tile < tiles && t.bh >= 0 && t.bh < BH, "block %lld", (long long)block);
        seen.insert({t.tile, t.bh});
        if (block == 0) CHECK(t.tile == tiles - 1, "the last tile (longest context) goes first");
      }
      CHECK(int64_t(seen.size()) == BH * tiles, "tile order is not a bijection");
    }
}

}  // namespace

int main() {
  check_pitch();
  check_tile_order();
  // The paper's shape, chunk boundaries inside tiles, chunked prefill, padded queries.
  const std::vector<Shape> fixed = {
      {5, 200, 200, 64, 0, 4, 5, 8, 64},   // GQA 5, prefill: tiles straddle chunks
      {5, 37, 150, 64, 3, 3, 5, 8, 64},    // chunked prefill, chunk_start > 0
      {1, 130, 130, 64, 0, 3, 5, 8, 64},   // G = 1: 64 queries per tile, two chunks
      {4, 40, 25, 16, 5, 2, 3, 3, 64},     // 15 padded queries (L < T)
      {8, 70, 130, 1, 0, 130, 3, 3, 64},   // chunk_size 1: a chunk per query
      {2, 70, 130, 7, 0, 19, 9, 8, 64},    // R * M = 72 > kBlockN: two memory blocks per chunk
      {5, 17, 20, 64, 30, 1, 5, 8, 64},    // chunk_start past some queries
      {3, 9, 9, 4, 0, 2, 5, 8, 128},       // table shorter than the queries need (never read past)
      {5, 1, 7, 64, 0, 1, 0, 8, 64},       // R = 0: no memory blocks
  };
  for (const Shape& s : fixed) check_shape(s);
  std::mt19937 rng(2026);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int n = 0; n < 300; ++n) {
    Shape s{};
    s.G = pick(1, 8);
    s.T = pick(1, 150);
    s.L = pick(0, 1) ? s.T + pick(0, 150) : pick(0, s.T);
    s.chunk_size = pick(0, 2) ? 64 : pick(1, 40);
    s.chunk_start = pick(0, 1) ? 0 : pick(0, 70);
    const int need = s.L - 1 >= s.chunk_start ? (s.L - 1 - s.chunk_start) / s.chunk_size + 1 : 1;
    s.C = pick(0, 4) ? need : pick(1, need + 1);
    s.R = pick(0, 6);
    s.M = pick(1, 9);
    s.rows = pick(0, 1) ? 64 : 128;
    check_shape(s);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
