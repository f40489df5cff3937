// The CUDA decode kernel and its split merge (memory3/decode_attention.cuh) run on the CPU
// through cuda_emulation.h, against a float64 reference written here from the op's
// definition (README, "The ops"). Run by tests/test_cuda_decode_emulated.py (host compiler,
// AddressSanitizer when available), GPU or not. Cases: the 16-byte path at head dims 64, 80,
// 96 and 128 and the element path (D = 7, 16), float32/bf16/fp16/float64, float and int8
// banks, split-K with the merge (including splits a short sequence leaves empty), T > 16,
// a block of 16 queries over 16 chunks, GQA 1/3/4/5/32, padded queries, empty slots and a bad
// id (recorded in the range-error words, read as empty). Outputs are NaN before each run.
#include "cuda_emulation.h"
#include "memory3/decode_attention.cuh"

#include <cstdio>
#include <limits>
#include <random>
#include <string>

using namespace memory3;
using namespace memory3::cuda;

namespace {

int failures = 0;

struct Case {
  std::string name;
  int B, T, S, Hq, Hkv, D, N, M, R, chunk_size, chunk_start, sm;
  std::vector<int> lens;
  bool int8 = false;
  double empty = 0.2;  // fraction of empty slots
  bool bad_id = false;
  bool bad_unread = false;  // the bad id sits in chunk 0, which no query of the case reads
};

template <typename T>
double as_double(T x) {
  return double(to_acc<float>(x));
}
template <>
double as_double(double x) {
  return x;
}
template <>
double as_double(int8_t x) {
  return double(x);
}
template <typename T>
T from_float(float x) {
  return from_acc<T>(x);
}
template <>
int8_t from_float(float x) {
  return int8_t(x);
}

template <typename T, typename MT, int kD>
void run_case(const Case& c) {
  using Acc = typename DecodeTraits<T, MT, kD>::Acc;
  std::mt19937 rng(std::hash<std::string>{}(c.name) & 0xffffffu);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> unit;
  const int G = c.Hq / c.Hkv, C = c.S > c.chunk_start ? (c.S - 1 - c.chunk_start) / c.chunk_size + 1 : 1;
  auto fill = [&](std::vector<T>& v, size_t n) {
    v.resize(n);
    for (auto& x : v) x = from_float<T>(normal(rng));
  };
  std::vector<T> q, k, v;
  fill(q, size_t(c.B) * c.T * c.Hq * c.D);
  fill(k, size_t(c.B) * c.S * c.Hkv * c.D);
  fill(v, size_t(c.B) * c.S * c.Hkv * c.D);
  const size_t bank = size_t(c.N) * c.Hkv * c.M * c.D;
  std::vector<MT> mk(bank), mv(bank);
  std::vector<float> ks(size_t(c.N) * c.Hkv * c.M, 1.0f), vs(ks.size(), 1.0f);
  for (size_t i = 0; i < bank; ++i) {
    if constexpr (std::is_same_v<MT, int8_t>) {
      mk[i] = int8_t(int(unit(rng) * 254) - 127), mv[i] = int8_t(int(unit(rng) * 254) - 127);
    } else {
      mk[i] = from_float<MT>(normal(rng)), mv[i] = from_float<MT>(normal(rng));
    }
  }
  if (c.int8)
    for (size_t i = 0; i < ks.size(); ++i) ks[i] = unit(rng) / 64, vs[i] = unit(rng) / 64;
  std::vector<int32_t> ids(size_t(c.B) * C * c.R);
  for (auto& id : ids) id = unit(rng) < c.empty ? -1 : int(unit(rng) * c.N) % c.N;
  std::vector<int32_t> lens = c.lens.empty() ? std::vector<int32_t>(c.B, c.S) : std::vector<int32_t>(c.lens.begin(), c.lens.end());
  if (c.bad_id) {  // in the chunk of sequence 0's last query, or in one no query reads
    const int pos = lens[0] - 1;
    ids[size_t(c.bad_unread ? 0 : (pos - c.chunk_start) / c.chunk_size) * c.R] = c.N + 3;
  }
  std::vector<T> out(q.size());
  std::vector<float> lse(size_t(c.B) * c.Hq * c.T, std::numeric_limits<float>::quiet_NaN());
  for (auto& x : out) x = from_float<T>(std::numeric_limits<float>::quiet_NaN());
  std::vector<int64_t> words(kRangeWords, 0);

  MemoryAttentionParams p{};
  p.q = q.data(), p.q_stride_b = int64_t(c.T) * c.Hq * c.D, p.q_stride_t = int64_t(c.Hq) * c.D, p.q_stride_h = c.D;
  p.k = k.data(), p.k_stride_b = int64_t(c.S) * c.Hkv * c.D, p.k_stride_s = int64_t(c.Hkv) * c.D, p.k_stride_h = c.D;
  p.v = v.data(), p.v_stride_b = p.k_stride_b, p.v_stride_s = p.k_stride_s, p.v_stride_h = p.k_stride_h;
  p.mem_k = mk.data(), p.mk_stride_n = int64_t(c.Hkv) * c.M * c.D, p.mk_stride_h = int64_t(c.M) * c.D, p.mk_stride_m = c.D;
  p.mem_v = mv.data(), p.mv_stride_n = p.mk_stride_n, p.mv_stride_h = p.mk_stride_h, p.mv_stride_m = p.mk_stride_m;
  p.mem_k_scale = c.int8 ? ks.data() : nullptr, p.mem_v_scale = c.int8 ? vs.data() : nullptr;
  p.mem_ids = ids.data(), p.kv_lens = lens.data();
  p.out = out.data(), p.lse = lse.data();
  p.B = c.B, p.T = c.T, p.S = c.S, p.Hq = c.Hq, p.Hkv = c.Hkv, p.D = c.D, p.N = c.N, p.M = c.M, p.C = C, p.R = c.R;
  p.chunk_size = c.chunk_size, p.chunk_start = c.chunk_start;
  p.scale = 1.0 / std::sqrt(double(c.D));
  p.range_error = words.data();

  // The launcher's plan (csrc/cuda/memory_attention.cu).
  const int64_t blocks = int64_t(c.B) * c.Hkv * decode_row_blocks(c.T, G);
  DecodeSplit sp{1, int(decode_split_len(c.S, 1)), nullptr, nullptr};
  std::vector<Acc> part_o;
  std::vector<float> part_lse;
  if (c.T <= kDecodeMaxQueries && !std::is_same_v<T, double>) {
    sp.splits = decode_split_count(blocks, c.S, c.sm);
    sp.split_len = int(decode_split_len(c.S, sp.splits));
  }
  if (sp.splits > 1) {
    part_o.assign(size_t(sp.splits) * out.size(), Acc(std::numeric_limits<float>::quiet_NaN()));
    part_lse.assign(size_t(sp.splits) * lse.size(), std::numeric_limits<float>::quiet_NaN());
    sp.part_o = part_o.data(), sp.part_lse = part_lse.data();
  }
  const int D = kD > 0 ? kD : c.D;
  const DecodeLayout lay = decode_layout(D, int(sizeof(T)), int(sizeof(Acc)), DecodeTraits<T, MT, kD>::kStages);
  m3_emulation::launch(dim3(unsigned(blocks), unsigned(sp.splits)), dim3(kDecodeThreads), size_t(lay.total),
                       [&] { decode_attention_kernel<T, MT, kD>(p, sp); });
  if constexpr (!std::is_same_v<T, double>) {
    if (sp.splits > 1) {
      const int64_t rows = int64_t(c.B) * c.T * c.Hq;
      m3_emulation::launch(dim3(unsigned(sched_ceil_div(rows, kDecodeWarps))), dim3(kDecodeThreads), 0,
                           [&] { decode_merge_kernel<T>(p, sp); });
    }
  }

  // The reference, in float64 on the stored values.
  double worst = 0;
  for (int b = 0; b < c.B; ++b)
    for (int i = 0; i < c.T; ++i)
      for (int h = 0; h < c.Hq; ++h) {
        const int kvh = h / G, pos = lens[b] - c.T + i;
        std::vector<std::vector<double>> keys, vals;
        auto row = [&](const auto& src, int64_t off, double mul) {
          std::vector<double> r(c.D);
          for (int d = 0; d < c.D; ++d) r[d] = as_double(src[off + d]) * mul;
          return r;
        };
        if (pos >= c.chunk_start) {
          const int chunk = (pos - c.chunk_start) / c.chunk_size;
          for (int r = 0; r < c.R && chunk < C; ++r) {
            const int id = ids[(size_t(b) * C + chunk) * c.R + r];
            if (id < 0 || id >= c.N) continue;
            for (int t = 0; t < c.M; ++t) {
              const int64_t srow = (int64_t(id) * c.Hkv + kvh) * c.M + t;
              keys.push_back(row(mk, srow * c.D, c.int8 ? ks[srow] : 1.0));
              vals.push_back(row(mv, srow * c.D, c.int8 ? vs[srow] : 1.0));
            }
          }
        }
        for (int j = 0; j <= pos; ++j) {
          const int64_t off = ((int64_t(b) * c.S + j) * c.Hkv + kvh) * c.D;
          keys.push_back(row(k, off, 1.0));
          vals.push_back(row(v, off, 1.0));
        }
        const std::vector<double> qr = row(q, ((int64_t(b) * c.T + i) * c.Hq + h) * c.D, 1.0);
        std::vector<double> s(keys.size()), o(c.D, 0.0);
        double mx = -INFINITY, l = 0;
        for (size_t j = 0; j < keys.size(); ++j) {
          double dot = 0;
          for (int d = 0; d < c.D; ++d) dot += qr[d] * keys[j][d];
          s[j] = dot * p.scale;
          mx = std::max(mx, s[j]);
        }
        for (size_t j = 0; j < keys.size(); ++j) {
          const double w = std::exp(s[j] - mx);
          l += w;
          for (int d = 0; d < c.D; ++d) o[d] += w * vals[j][d];
        }
        const int64_t orow = ((int64_t(b) * c.T + i) * c.Hq + h) * c.D;
        const double ref_lse = keys.empty() ? -INFINITY : mx + std::log(l);
        const double got_lse = lse[(int64_t(b) * c.Hq + h) * c.T + i];
        if (keys.empty() ? !(std::isinf(got_lse) && got_lse < 0) : !(std::abs(got_lse - ref_lse) <= 1e-4 * (1 + std::abs(ref_lse)))) {
          if (++failures <= 10) std::printf("FAIL %s: lse (b %d, i %d, h %d) %g, want %g\n", c.name.c_str(), b, i, h, got_lse, ref_lse);
        }
        for (int d = 0; d < c.D; ++d) {
          const double want = keys.empty() ? 0.0 : o[d] / l;
          const double got = as_double(out[orow + d]);
          double cap = 2e-5 * (1 + std::abs(want));
          if constexpr (std::is_same_v<T, double>) cap = 1e-10 * (1 + std::abs(want));
          if constexpr (std::is_same_v<T, __nv_bfloat16>) cap = 0.5 * 0.0078125 * std::abs(want) * (1 + 1e-3) + 1e-5;
          if constexpr (std::is_same_v<T, __half>) cap = 0.5 * 0.0009765625 * std::abs(want) * (1 + 1e-3) + 1e-5;
          const double err = std::abs(got - want);
          if (!(err <= cap)) {  // NaN fails too: an element nobody wrote
            if (++failures <= 10)
              std::printf("FAIL %s: out (b %d, i %d, h %d, d %d) %g, want %g\n", c.name.c_str(), b, i, h, d, got, want);
          } else {
            worst = std::max(worst, err / cap);
          }
        }
      }
  const bool recorded = words[0] != 0;
  if (recorded != c.bad_id || (recorded && int(uint64_t(words[0]) >> 56) != kRangeMemIds)) {
    if (++failures <= 10) std::printf("FAIL %s: range-error words %lld %lld\n", c.name.c_str(), (long long)words[0], (long long)words[1]);
  }
  std::printf("%-44s splits %2d  tiles ok  worst error / cap %.3f\n", c.name.c_str(), sp.splits, worst);
}

}  // namespace

int main() {
  // name, B, T, S, Hq, Hkv, D, N, M, R, chunk_size, chunk_start, sm, lens
  run_case<float, float, 64>({"fp32 D64 split + merge, ragged", 2, 1, 300, 8, 2, 64, 40, 8, 5, 64, 5, 132, {300, 77}});
  run_case<__nv_bfloat16, int8_t, 80>(
      {"bf16 D80 int8 bank, T=3, G=5, split", 2, 3, 500, 10, 2, 80, 30, 8, 5, 64, 0, 8, {500, 3}, true});
  run_case<float, float, 0>({"fp32 D7 element path, T=20 (long path)", 1, 20, 45, 5, 1, 7, 9, 3, 2, 3, 2, 132, {}});
  run_case<double, int8_t, 0>({"fp64 D16 int8 bank, padded query", 2, 2, 30, 4, 2, 16, 6, 2, 3, 4, 1, 132, {30, 1}, true});
  run_case<__half, __half, 128>({"fp16 D128 G=32 (two row blocks), empty seq", 2, 1, 200, 32, 1, 128, 12, 4, 2, 64, 0, 132, {0, 200}});
  Case bad{"bf16 D96 G=3 seven splits, bad id", 1, 1, 1000, 6, 2, 96, 50, 8, 5, 64, 3, 132, {}};
  bad.empty = 0.5, bad.bad_id = true;
  run_case<__nv_bfloat16, __nv_bfloat16, 96>(bad);
  bad.name = "bf16 D96 bad id in a chunk nobody reads", bad.bad_unread = true;  // the CPU op raises on it too
  run_case<__nv_bfloat16, __nv_bfloat16, 96>(bad);
  run_case<float, float, 128>({"fp32 D128 16 queries over 16 chunks", 1, 16, 40, 4, 4, 128, 10, 2, 3, 1, 0, 132, {}});
  run_case<float, float, 64>({"fp32 D64 T=4 G=1 split rows", 1, 4, 700, 8, 8, 64, 20, 8, 5, 64, 0, 132, {650}});
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("decode kernel emulated on the CPU matches the float64 reference: ok\n");
  return 0;
}
