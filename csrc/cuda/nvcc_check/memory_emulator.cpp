// The CUDA gather and codec kernels (memory3/gather.cuh, quant.cuh, vq.cuh) run on the CPU
// through cuda_emulation.h against the CPU kernels (memory3/gather.h, quant.h, vq.h), which
// tests hold bit-identical to memory3.reference: gather (16-byte and element paths, every
// bank type into bf16/float32/float64, -1 ids, a bad id recorded and read as empty),
// quantize int8/int4 (bit-identical codes and meta) and pq (templated and generic sub-vector
// sizes), dequantize int8/int4/pq with ids (8-wide and element paths), the vq decoder.
// Run by tests/test_cuda_memory_emulated.py, GPU or not. Outputs are NaN before each run.
#include "cuda_emulation.h"
#include "memory3/gather.cuh"
#include "memory3/quant.cuh"
#include "memory3/vq.cuh"
// The CPU kernels, the reference here.
#include "memory3/gather.h"
#include "memory3/quant.h"
#include "memory3/vq.h"

#include <cstdio>
#include <random>
#include <string>

using namespace memory3;

namespace {

int failures = 0;
std::mt19937 rng(7);

void expect(bool ok, const std::string& what) {
  if (!ok && ++failures <= 20) std::printf("FAIL %s\n", what.c_str());
}

// The CPU storage type of a CUDA element type.
template <typename T> struct Cpu { using type = T; };
template <> struct Cpu<__nv_bfloat16> { using type = bf16_t; };
template <> struct Cpu<__half> { using type = fp16_t; };

template <typename T>
std::vector<T> random_values(size_t n, float mul = 1.0f) {
  std::normal_distribution<float> normal;
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_same_v<T, int8_t>) x = int8_t(int(rng() % 255) - 127);
    else x = cuda::from_acc<T>(normal(rng) * mul);
  }
  return v;
}

template <typename T>
std::vector<T> poisoned(size_t n) {
  std::vector<T> v(n);
  memset(static_cast<void*>(v.data()), 0xff, n * sizeof(T));  // NaN in every float type
  return v;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<int64_t> random_ids(int64_t R, int64_t N) {
  std::vector<int64_t> ids(R);
  for (auto& id : ids) id = int64_t(rng() % (N + 1)) - 1;  // -1 .. N-1
  ids[0] = -1, ids[R - 1] = N - 1;
  return ids;
}

// ---------------------------------------------------------------- gather

template <typename In, typename Out, bool kVec>
void gather_case(int64_t N, int64_t Hkv, int64_t M, int64_t D) {
  const std::string name = "gather " + std::to_string(sizeof(In)) + "->" + std::to_string(sizeof(Out)) +
                           " bytes, D " + std::to_string(D) + (kVec ? " (16-byte)" : " (element)");
  const int64_t row = Hkv * M * D, R = 9;
  auto bk = random_values<In>(N * row, 3.0f), bv = random_values<In>(N * row);
  std::vector<float> sk(N * Hkv * M), sv(N * Hkv * M);
  for (size_t i = 0; i < sk.size(); ++i) sk[i] = float(rng() % 1000) / 64000.0f, sv[i] = float(rng() % 1000) / 32000.0f;
  const bool int8 = std::is_same_v<In, int8_t>;
  std::vector<int64_t> ids = random_ids(R, N), cpu_ids = ids;
  ids[3] = N + 2, cpu_ids[3] = -1;  // a bad id: recorded, zeros
  auto out_k = poisoned<Out>(R * row), out_v = poisoned<Out>(R * row);
  std::vector<int64_t> words(cuda::kRangeWords, 0);
  GatherParams p{};
  p.k = {bk.data(), row, int8 ? sk.data() : nullptr, Hkv * M};
  p.v = {bv.data(), row, int8 ? sv.data() : nullptr, Hkv * M};
  p.ids = ids.data(), p.out_k = out_k.data(), p.out_v = out_v.data(), p.vectors = Hkv * M, p.D = D;
  p.range_error = words.data();
  m3_emulation::launch(dim3(unsigned(2 * R)), dim3(cuda::kGatherThreads), 0,
                       [&] { cuda::gather_memory_kernel<In, Out, kVec>(p, N); });
  using CIn = typename Cpu<In>::type;
  using COut = typename Cpu<Out>::type;
  using Acc = std::conditional_t<std::is_same_v<Out, double>, double, float>;
  auto ref_k = poisoned<Out>(R * row), ref_v = poisoned<Out>(R * row);
  GatherParams c = p;
  c.ids = cpu_ids.data(), c.out_k = ref_k.data(), c.out_v = ref_v.data(), c.range_error = nullptr;
  cpu::gather_rows<CIn, COut, Acc>(c, 0, R);
  expect(same_bytes(out_k, ref_k) && same_bytes(out_v, ref_v), name + ": rows differ from the CPU kernel");
  expect(uint64_t(words[0]) >> 56 == cuda::kRangeGatherIds && words[1] == N + 2, name + ": bad id not recorded");
  std::printf("%-48s ok\n", name.c_str());
}

// ---------------------------------------------------------------- codecs

template <typename T>
void quantize_case(Codec codec, int64_t N, int64_t Hkv, int64_t M, int D, int dsub) {
  const std::string name = std::string("quantize ") + (codec == Codec::int8 ? "int8" : codec == Codec::int4 ? "int4" : "pq") +
                           " from " + std::to_string(sizeof(T)) + "-byte floats, D " + std::to_string(D) +
                           (codec == Codec::pq ? ", d_sub " + std::to_string(dsub) : "");
  const int64_t R = N * Hkv * M;
  auto x = random_values<T>(R * D, 2.0f);
  if (codec != Codec::pq) memset(static_cast<void*>(x.data()), 0, D * sizeof(T));  // a zero vector: scale 0
  const int64_t code_len = codec == Codec::int8 ? D : codec == Codec::int4 ? D / 2 : D / dsub;
  const int64_t meta_len = codec == Codec::int8 ? 1 : codec == Codec::int4 ? 2 * ((D + 31) / 32) : 0;
  std::vector<float> codebook = random_values<float>(Hkv * D * kPqCentroids);
  std::vector<uint8_t> codes(R * code_len, 0xee), ref_codes(R * code_len, 0xee);
  std::vector<float> meta = poisoned<float>(R * meta_len), ref_meta = poisoned<float>(R * meta_len);
  QuantizeParams p{};
  p.x = x.data(), p.codes = codes.data(), p.meta = meta.data(), p.codebook = codebook.data();
  p.N = N, p.Hkv = Hkv, p.M = M, p.D = D, p.dsub = dsub;
  if (codec == Codec::pq) {
    const dim3 grid(unsigned(cuda::ceil_div(N * M, cuda::kQuantThreads)), unsigned(Hkv * (D / dsub)));
    if (dsub == 8) m3_emulation::launch(grid, dim3(cuda::kQuantThreads), 0, [&] { cuda::quantize_pq_kernel<T, 8>(p); });
    else m3_emulation::launch(grid, dim3(cuda::kQuantThreads), 0, [&] { cuda::quantize_pq_kernel<T, 0>(p); });
  } else {
    const dim3 grid(unsigned(cuda::ceil_div(R, cuda::kQuantWarps)));
    if (codec == Codec::int8) m3_emulation::launch(grid, dim3(cuda::kQuantThreads), 0, [&] { cuda::quantize_int8_kernel<T>(p); });
    else m3_emulation::launch(grid, dim3(cuda::kQuantThreads), 0, [&] { cuda::quantize_int4_kernel<T>(p); });
  }
  QuantizeParams c = p;
  c.codes = ref_codes.data(), c.meta = ref_meta.data();
  cpu::quantize_range<typename Cpu<T>::type>(codec, c, 0, cpu::quantize_items(codec, c));
  if (codec == Codec::pq) {
    int64_t differ = 0;
    for (size_t i = 0; i < codes.size(); ++i) differ += codes[i] != ref_codes[i];
    expect(differ * 100 <= int64_t(codes.size()), name + ": more than 1% of pq codes differ");
  } else {
    expect(same_bytes(codes, ref_codes) && same_bytes(meta, ref_meta), name + ": codes or meta differ");
  }
  std::printf("%-48s ok\n", name.c_str());
}

template <typename Out, int kP>
void dequantize_case(Codec codec, int64_t N, int64_t Hkv, int64_t M, int D, int dsub) {
  const std::string name = std::string("dequantize ") + (codec == Codec::int8 ? "int8" : codec == Codec::int4 ? "int4" : "pq") +
                           " to " + std::to_string(sizeof(Out)) + "-byte floats, D " + std::to_string(D) +
                           (kP > 1 ? " (8-wide)" : " (element)");
  const int64_t R = N * Hkv * M;
  auto x = random_values<float>(R * D, 2.0f);
  std::vector<float> codebook = random_values<float>(Hkv * D * kPqCentroids);
  const int64_t code_len = codec == Codec::int8 ? D : codec == Codec::int4 ? D / 2 : D / dsub;
  const int64_t meta_len = codec == Codec::int8 ? 1 : 2 * ((D + 31) / 32);
  std::vector<uint8_t> codes(R * code_len);
  std::vector<float> meta(R * meta_len);
  QuantizeParams qp{};
  qp.x = x.data(), qp.codes = codes.data(), qp.meta = meta.data(), qp.codebook = codebook.data();
  qp.N = N, qp.Hkv = Hkv, qp.M = M, qp.D = D, qp.dsub = dsub;
  cpu::quantize_range<float>(codec, qp, 0, cpu::quantize_items(codec, qp));
  std::vector<Out> cb(codebook.size());  // the codebook in the output type, as the launchers pass it
  for (size_t i = 0; i < cb.size(); ++i) cb[i] = cuda::from_acc<Out>(codebook[i]);
  std::vector<int64_t> ids = random_ids(7, N), cpu_ids = ids;
  ids[2] = -5, cpu_ids[2] = -1;  // a bad id: recorded, zeros
  const int64_t row = Hkv * M * D;
  auto out = poisoned<Out>(7 * row), ref = poisoned<Out>(7 * row);
  std::vector<int64_t> words(cuda::kRangeWords, 0);
  DequantizeParams p{};
  p.codes = codes.data(), p.codes_stride_n = Hkv * M * code_len;
  p.meta = codec == Codec::pq ? nullptr : meta.data(), p.meta_stride_n = Hkv * M * meta_len;
  p.codebook = codec == Codec::pq ? cb.data() : nullptr;
  p.ids = ids.data(), p.out = out.data(), p.Hkv = Hkv, p.M = M, p.D = D, p.dsub = dsub, p.range_error = words.data();
  auto run = [&](auto codec_tag) {
    m3_emulation::launch(dim3(7), dim3(cuda::kQuantThreads), 0,
                         [&] { cuda::dequantize_kernel<decltype(codec_tag)::value, Out, kP>(p, N); });
  };
  if (codec == Codec::int8) run(std::integral_constant<Codec, Codec::int8>{});
  else if (codec == Codec::int4) run(std::integral_constant<Codec, Codec::int4>{});
  else run(std::integral_constant<Codec, Codec::pq>{});
  DequantizeParams c = p;
  c.ids = cpu_ids.data(), c.out = ref.data(), c.range_error = nullptr;
  cpu::dequantize_rows<typename Cpu<Out>::type>(codec, c, 0, 7);
  expect(same_bytes(out, ref), name + ": values differ from the CPU kernel");
  expect(uint64_t(words[0]) >> 56 == cuda::kRangeDecodeIds && words[1] == -5, name + ": bad id not recorded");
  std::printf("%-48s ok\n", name.c_str());
}

template <typename Out>
void vq_case(int D, int coarse_bits, int pq_m, int pq_bits) {
  const std::string name = "vq decode D " + std::to_string(D) + " to " + std::to_string(sizeof(Out)) + "-byte floats";
  const int64_t N = 6, Hkv = 2, M = 3, rows = 1 + D + (int64_t(1) << coarse_bits) + (int64_t(1) << pq_bits);
  std::vector<float> meta = random_values<float>(rows * D);
  std::fill(meta.begin(), meta.begin() + D, 0.0f);
  meta[0] = 1, meta[1] = float(coarse_bits), meta[2] = float(pq_m), meta[3] = float(pq_bits);
  const int code_size = vq_code_size(coarse_bits, pq_m, pq_bits);
  std::vector<uint8_t> codes(N * Hkv * M * code_size);
  for (auto& b : codes) b = uint8_t(rng());
  std::vector<int64_t> ids = random_ids(5, N);
  auto out = poisoned<Out>(5 * Hkv * M * D), ref = poisoned<Out>(5 * Hkv * M * D);
  cuda::VqCudaParams p{};
  p.codes = codes.data(), p.codes_stride_n = Hkv * M * code_size, p.meta = meta.data(), p.meta_rows = rows;
  p.ids = ids.data(), p.out = out.data(), p.N = N, p.Hkv = Hkv, p.M = M, p.vectors = 5 * Hkv * M;
  p.D = D, p.code_size = code_size;
  std::vector<int64_t> words(cuda::kRangeWords, 0);
  p.range_error = words.data();
  m3_emulation::launch(dim3(unsigned(cuda::ceil_div(p.vectors, cuda::kVqTile))), dim3(cuda::kVqThreads),
                       size_t(cuda::vq_smem_bytes(D)), [&] { cuda::dequantize_vq_kernel<Out>(p); });
  VqDequantizeParams c{};
  c.codes = codes.data(), c.codes_stride_n = p.codes_stride_n, c.rotation = meta.data() + D;
  c.coarse = c.rotation + D * D, c.fine = c.coarse + (int64_t(1) << coarse_bits) * D;
  c.ids = ids.data(), c.out = ref.data(), c.Hkv = Hkv, c.M = M, c.D = D, c.code_size = code_size;
  c.coarse_bits = coarse_bits, c.pq_m = pq_m, c.pq_bits = pq_bits;
  cpu::dequantize_vq_rows<typename Cpu<Out>::type>(c, 0, 5);
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double a = double(cuda::to_acc<float>(out[i])), b = double(cuda::to_acc<float>(ref[i]));
    const double err = std::abs(a - b) / (1e-3 + std::abs(b));
    worst = std::isnan(err) ? 1e9 : std::max(worst, err);
  }
  expect(worst <= (sizeof(Out) == 2 ? 1e-2 : 1e-5), name + ": differs from the CPU kernel, " + std::to_string(worst));
  expect(words[0] == 0, name + ": a range error was recorded");
  std::printf("%-48s ok (worst relative difference %.2g)\n", name.c_str(), worst);
}

}  // namespace

int main() {
  gather_case<__nv_bfloat16, __nv_bfloat16, true>(20, 8, 8, 80);
  gather_case<float, __nv_bfloat16, true>(20, 2, 8, 64);
  gather_case<int8_t, __nv_bfloat16, true>(20, 8, 8, 80);
  gather_case<int8_t, double, true>(11, 2, 3, 16);
  gather_case<double, __half, true>(11, 2, 3, 16);
  gather_case<__nv_bfloat16, float, false>(9, 3, 5, 7);
  gather_case<int8_t, float, false>(9, 3, 5, 7);
  for (Codec codec : {Codec::int8, Codec::int4}) {
    quantize_case<float>(codec, 6, 8, 8, 80, 0);
    quantize_case<__nv_bfloat16>(codec, 5, 3, 3, 46, 0);
    quantize_case<double>(codec, 3, 2, 2, 128, 0);
  }
  quantize_case<float>(Codec::pq, 30, 2, 8, 80, 8);
  quantize_case<__half>(Codec::pq, 30, 2, 8, 80, 10);
  for (Codec codec : {Codec::int8, Codec::int4, Codec::pq}) {
    dequantize_case<__nv_bfloat16, 8>(codec, 9, 2, 8, 80, 2);
    dequantize_case<float, 8>(codec, 9, 2, 8, 64, 8);
    dequantize_case<double, 1>(codec, 9, 2, 3, 46, 2);
  }
  vq_case<float>(80, 14, 8, 10);
  vq_case<__nv_bfloat16>(64, 6, 8, 5);
  vq_case<double>(18, 5, 2, 6);  // D % 4 != 0: the one-row-at-a-time rotation
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("gather and codec kernels emulated on the CPU match the CPU kernels: ok\n");
  return 0;
}
