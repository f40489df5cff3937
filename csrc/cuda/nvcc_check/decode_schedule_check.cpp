// Host check of the CUDA decode kernel's schedule (memory3/decode_schedule.h), run by
// tests/test_cuda_decode_schedule.py with the host compiler, GPU or not. For random shapes
// (GQA ratios up to 40, T up to 40, ragged, zero, padded and out-of-range lengths, chunk
// sizes from 1, prefixes, short chunk tables, SM counts that force splits) it walks every
// block (sequence, row block, split) and tile as the kernel does and checks that each packed
// row sees exactly the keys the reference gives its query, each once: context keys 0..pos and
// the R*M memory keys of its chunk (none inside the prefix or past the table). It also checks
// the split plan (covers the capacity, whole tiles, at most kDecodeMaxSplits), that no key
// read lies outside the sequence, and the shared-memory layout (16-byte parts, odd 16-byte
// row pieces, what fits a block).
#include <cstdio>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "memory3/decode_schedule.h"

using namespace memory3::cuda;
using Key = std::tuple<int, int64_t, int64_t>;  // (0, j, 0) context key j; (1, chunk, n) memory key

namespace {

int failures = 0;

void fail(const char* what, int a, int b) {
  if (++failures <= 20) std::printf("FAIL %s (%d, %d)\n", what, a, b);
}

struct Case {
  int B, T, S, Hq, Hkv, R, M, C, chunk_size, chunk_start, sm;
  std::vector<int> lens;
};

void check_case(const Case& c) {
  const int G = c.Hq / c.Hkv;
  const int64_t rows = int64_t(c.T) * G, row_blocks = decode_row_blocks(c.T, G);
  const int64_t blocks = int64_t(c.B) * c.Hkv * row_blocks;
  const int splits = c.T <= kDecodeMaxQueries ? decode_split_count(blocks, c.S, c.sm) : 1;
  const int64_t split_len = decode_split_len(c.S, splits);
  if (splits < 1 || splits > kDecodeMaxSplits) fail("split count", splits, c.S);
  if (split_len % kDecodeKeys != 0 || int64_t(splits) * split_len < c.S) fail("split covers", splits, int(split_len));
  const int64_t RM = int64_t(c.R) * c.M;
  for (int b = 0; b < c.B; ++b) {
    const int L = decode_length(c.lens[b], c.S);
    std::vector<std::multiset<Key>> seen(rows);
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t row0 = rb * kDecodeRows;
      const int nrows = int(rows - row0 < kDecodeRows ? rows - row0 : kDecodeRows);
      if (nrows < 1) fail("empty row block", int(rb), nrows);
      DecodeRow rr[kDecodeRows];
      int chunks[kDecodeRows];
      for (int r = 0; r < nrows; ++r) {
        rr[r] = decode_row(L, c.T, G, row0 + r, c.chunk_start, c.chunk_size, c.C);
        chunks[r] = rr[r].chunk;
      }
      for (int split = 0; split < splits; ++split) {
        const DecodeTiles t = decode_tiles(chunks, nrows, rr[nrows - 1].pos, split, split_len, RM);
        if (t.ctx_hi > L || t.ctx_lo < 0 || t.ctx_lo > t.ctx_hi) fail("context range outside the sequence", t.ctx_lo, t.ctx_hi);
        for (int k = 0; k < t.n_mem + t.n_ctx; ++k) {
          const DecodeTile tile = decode_tile(t, k);
          if (tile.memory && (tile.chunk < 0 || tile.chunk >= c.C)) fail("memory tile chunk", tile.chunk, c.C);
          for (int key = 0; key < kDecodeKeys; ++key)
            for (int r = 0; r < nrows; ++r) {
              if (!decode_sees(tile, t, key, rr[r].pos, rr[r].chunk, RM)) continue;
              const int64_t idx = tile.first + key;
              if (!tile.memory && (idx < 0 || idx >= L)) fail("context key read outside the sequence", int(idx), L);
              seen[row0 + r].insert(tile.memory ? Key{1, tile.chunk, idx} : Key{0, idx, 0});
            }
        }
      }
    }
    for (int64_t row = 0; row < rows; ++row) {  // the reference: query row / G at L - T + i
      const int64_t pos = L - c.T + row / G;
      std::multiset<Key> want;
      for (int64_t j = 0; j <= pos; ++j) want.insert(Key{0, j, 0});
      if (pos >= c.chunk_start) {
        const int64_t chunk = (pos - c.chunk_start) / c.chunk_size;
        if (chunk < c.C)
          for (int64_t n = 0; n < RM; ++n) want.insert(Key{1, chunk, n});
      }
      if (seen[row] != want) fail("keys seen by a row differ from the reference", int(row), int(seen[row].size()));
    }
  }
}

void check_layouts() {
  const int types[][3] = {{2, 4, 2}, {4, 4, 2}, {8, 8, 1}};  // (element, accumulator bytes, stages)
  for (const auto& ty : types)
    for (int D = 1; D <= kDecodeMaxD; ++D) {
      const DecodeLayout L = decode_layout(D, ty[0], ty[1], ty[2]);
      for (int off : {L.q, L.s, L.stat, L.rows, L.stage, L.stage_bytes, L.v_off, L.scale_k, L.scale_v, L.ok})
        if (off % 16 != 0) fail("layout part not 16-byte aligned", D, off);
      for (int e : {1, ty[0]}) {
        const int stride = decode_tile_stride(D, e);
        if ((stride / 16) % 2 != 1 || stride < D * e || stride > L.stride) fail("tile stride", D, stride);
      }
      if (L.total > 227 * 1024) fail("shared memory over the Hopper limit", D, L.total);
      if (decode_stages(ty[0]) != ty[2]) fail("stages", ty[0], ty[2]);
    }
}

}  // namespace

int main() {
  std::mt19937 rng(12);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int groups[][2] = {{1, 1}, {4, 1}, {5, 1}, {40, 8}, {10, 2}, {32, 1}, {40, 1}, {3, 3}, {17, 1}};
  int cases = 0;
  for (int it = 0; it < 600; ++it) {
    Case c{};
    const auto& g = groups[pick(0, 8)];
    c.Hq = g[0], c.Hkv = g[1];
    c.B = pick(1, 3);
    c.T = pick(0, 4) == 0 ? pick(17, 40) : pick(1, 16);
    c.S = c.T + pick(0, 300);
    c.R = pick(1, 6), c.M = pick(1, 9);
    c.chunk_size = pick(0, 3) == 0 ? pick(1, 3) : pick(4, 70);
    c.chunk_start = pick(0, 2) == 0 ? 0 : pick(0, 20);
    const int need = c.S > c.chunk_start ? (c.S - 1 - c.chunk_start) / c.chunk_size + 1 : 1;
    c.C = pick(0, 4) == 0 ? pick(1, need) : need;  // sometimes too short: those rows see no memories
    const int sms[] = {1, 8, 108, 132};
    c.sm = sms[pick(0, 3)];
    for (int b = 0; b < c.B; ++b) {
      const int kind = pick(0, 6);
      c.lens.push_back(kind == 0 ? 0 : kind == 1 ? pick(0, c.T) : kind == 2 ? -1 : kind == 3 ? c.S + 1 : pick(c.T, c.S));
    }
    check_case(c);
    ++cases;
  }
  // The split path at decode shapes of the benchmarks (long contexts, many splits).
  for (int S : {2048, 4096, 5000})
    for (int B : {1, 2, 32}) {
      Case c{B, 1, S, 40, 8, 5, 8, (S - 1) / 64 + 1, 64, 0, 132, std::vector<int>(B, S)};
      c.lens[0] = S / 3;
      check_case(c);
      ++cases;
    }
  check_layouts();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("decode schedule: %d random cases and the layouts match the reference: ok\n", cases);
  return 0;
}
