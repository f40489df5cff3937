// CPU launchers of the memory codecs, quantize_memory and dequantize_memory: codec and
// shape checks, id validation, dtype dispatch and the ISA-multiversioned workers that run
// the kernels of include/memory3/quant.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "checks.h"
#include "dequantize_vq.h"
#include "row_ids.h"
#include "thread_pool.h"
#include "memory3/quant.h"

namespace memory3 {
namespace {

Codec parse_codec(std::string_view codec) {
  if (codec == "int8") return Codec::int8;
  if (codec == "int4") return Codec::int4;
  if (codec == "pq") return Codec::pq;
  TORCH_CHECK(codec != "vq", "quantize_memory: vq encodes with FAISS, in Python (memory3.ops.quantize_memory); ",
              "the op decodes vq only");
  TORCH_CHECK(false, "codec must be one of int8, int4, pq; got '", codec, "'");
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): ", name, " must be on the CPU, got ", t.device());
}

// A pq codebook for x [N, Hkv, M, D]: float32 [Hkv, D / d_sub, 256, d_sub]. Returns d_sub.
int64_t check_codebook(const at::Tensor& cb, int64_t Hkv, int64_t D, const char* name) {
  TORCH_CHECK(cb.dim() == 4 && cb.size(0) == Hkv && cb.size(2) == kPqCentroids && cb.size(1) > 0 &&
                  cb.size(3) > 0 && cb.size(1) * cb.size(3) == D,
              name, " must be the pq codebook [Hkv=", Hkv, ", D / d_sub, ", kPqCentroids,
              ", d_sub] with (D / d_sub) * d_sub = D = ", D, ", got ", cb.sizes());
  TORCH_CHECK(cb.scalar_type() == at::kFloat, name, " must be float32, got ", cb.scalar_type());
  return cb.size(3);
}

// ---------------------------------------------------------------- quantize_memory

// Compiled once per ISA level; the kernel templates are inlined into each clone.
M3_CPU_MULTIVERSION void quantize_range(Codec codec, FloatType x_type, const QuantizeParams& p, int64_t i0,
                                        int64_t i1) {
  dispatch_float(x_type, [&](auto t) M3_LAMBDA_INLINE { cpu::quantize_range<decltype(t)>(codec, p, i0, i1); });
}

std::tuple<at::Tensor, at::Tensor> quantize_memory_cpu(const at::Tensor& x, std::string_view codec_name,
                                                       const std::optional<at::Tensor>& codebook) {
  const Codec codec = parse_codec(codec_name);
  TORCH_CHECK(x.dim() == 4, "x must be [N, Hkv, M, D], got ", x.sizes());
  const FloatType x_type = float_type_of(x.scalar_type(), "x");
  check_cpu(x, "quantize_memory", "x");
  const int64_t N = x.size(0), Hkv = x.size(1), M = x.size(2), D = x.size(3);
  TORCH_CHECK(D > 0 && D < (int64_t(1) << 24), "x must have a head dim D in [1, 2^24), got ", x.sizes());
  TORCH_CHECK(codec != Codec::int4 || D % 2 == 0, "int4 packs two values per byte: x needs an even head dim D, got ",
              x.sizes());
  TORCH_CHECK(codec == Codec::pq || !codebook.has_value(), "codebook is only for codec pq, not ", codec_name);
  TORCH_CHECK(codec != Codec::pq || codebook.has_value(),
              "codec pq needs a codebook [Hkv, D / d_sub, 256, d_sub] (memory3.ops.train_pq_codebook)");

  const at::Tensor xc = x.contiguous();
  const auto f32 = x.options().dtype(at::kFloat), u8 = x.options().dtype(at::kByte);
  QuantizeParams p{};
  p.x = xc.data_ptr();
  p.N = N, p.Hkv = Hkv, p.M = M, p.D = int(D);
  at::Tensor codes, meta;
  switch (codec) {
    case Codec::int8:
      codes = at::empty({N, Hkv, M, D}, x.options().dtype(at::kChar));
      meta = at::empty({N, Hkv, M}, f32);
      break;
    case Codec::int4:
      codes = at::empty({N, Hkv, M, D / 2}, u8);
      meta = at::empty({N, Hkv, M, (D + kInt4Group - 1) / kInt4Group, 2}, f32);
      break;
    case Codec::pq:
      p.dsub = int(check_codebook(*codebook, Hkv, D, "codebook"));
      check_cpu(*codebook, "quantize_memory", "codebook");
      codes = at::empty({N, Hkv, M, D / p.dsub}, u8);
      meta = codebook->clone(at::MemoryFormat::Contiguous);  // a copy: outputs may not alias inputs
      p.codebook = meta.data_ptr<float>();
      break;
  }
  p.codes = codes.data_ptr();
  p.meta = codec == Codec::pq ? nullptr : meta.data_ptr<float>();

  // Tasks of roughly equal work: a pq item is 16 vectors, each compared with 256 centroids.
  const int64_t work = codec == Codec::pq ? D * kPqCentroids : D * 8;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work);
  cpu_launch::parallel_ranges(cpu::quantize_items(codec, p), grain,
                              [&](int64_t i0, int64_t i1) { quantize_range(codec, x_type, p, i0, i1); });
  return {codes, meta};
}

// ---------------------------------------------------------------- dequantize_memory

M3_CPU_MULTIVERSION void dequantize_range(Codec codec, FloatType out_type, const DequantizeParams& p, int64_t r0,
                                          int64_t r1) {
  dispatch_float(out_type, [&](auto o) M3_LAMBDA_INLINE { cpu::dequantize_rows<decltype(o)>(codec, p, r0, r1); });
}

// Checks codes and meta against the codec; returns D and sets dsub (pq).
int64_t check_codes(Codec codec, const at::Tensor& codes, const at::Tensor& meta, int64_t& dsub) {
  TORCH_CHECK(codes.dim() == 4, "codes must be [N, Hkv, M, *], got ", codes.sizes());
  const bool int8 = codec == Codec::int8;
  TORCH_CHECK(codes.scalar_type() == (int8 ? at::kChar : at::kByte), "codes must be ", int8 ? "int8" : "uint8",
              " for codec ", int8 ? "int8" : codec == Codec::int4 ? "int4" : "pq", ", got ", codes.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kFloat, "meta must be float32, got ", meta.scalar_type());
  check_cpu(codes, "dequantize_memory", "codes");
  check_cpu(meta, "dequantize_memory", "meta");
  const auto nhm = codes.sizes().slice(0, 3);
  const int64_t Dc = codes.size(3);
  if (codec == Codec::int8) {
    TORCH_CHECK(meta.sizes() == nhm, "meta must be the int8 scales [N, Hkv, M] = ", nhm, ", got ", meta.sizes());
    return Dc;
  }
  if (codec == Codec::int4) {
    std::vector<int64_t> want_meta = nhm.vec();
    want_meta.insert(want_meta.end(), {(2 * Dc + kInt4Group - 1) / kInt4Group, 2});
    TORCH_CHECK(meta.sizes() == want_meta, "meta must be the int4 (scale, zero) [N, Hkv, M, ceil(D / 32), 2] = ",
                want_meta, " for codes ", codes.sizes(), ", got ", meta.sizes());
    return 2 * Dc;
  }
  TORCH_CHECK(meta.dim() == 4 && meta.size(1) == Dc, "meta must be the pq codebook [Hkv, D / d_sub = ", Dc,
              ", 256, d_sub], got ", meta.sizes());
  dsub = check_codebook(meta, codes.size(1), Dc * meta.size(3), "meta");
  return Dc * dsub;
}

at::Tensor dequantize_memory_cpu(const at::Tensor& codes, const at::Tensor& meta, std::string_view codec_name,
                                 const std::optional<at::Tensor>& ids, std::optional<at::ScalarType> out_dtype) {
  if (codec_name == "vq") return dequantize_vq_cpu(codes, meta, ids, out_dtype);  // dequantize_vq.cpp
  TORCH_CHECK(codec_name == "int8" || codec_name == "int4" || codec_name == "pq",
              "codec must be one of int8, int4, pq, vq; got '", codec_name, "'");
  const Codec codec = parse_codec(codec_name);
  int64_t dsub = 1;
  const int64_t D = check_codes(codec, codes, meta, dsub);
  TORCH_CHECK(D > 0 && D < (int64_t(1) << 24), "codes decode to a head dim D = ", D, ", outside [1, 2^24)");
  const at::ScalarType out_type = out_dtype.value_or(at::kBFloat16);
  const FloatType out_elem = float_type_of(out_type, "out_dtype");
  const int64_t N = codes.size(0), Hkv = codes.size(1), M = codes.size(2);

  const auto [flat, out] = decode_rows(codes, ids, D, out_type);

  const at::Tensor c = rows_contiguous(codes);
  DequantizeParams p{};
  p.codes = c.data_ptr(), p.codes_stride_n = c.stride(0);
  at::Tensor m;
  if (codec == Codec::pq) {  // decoding copies centroids: convert the codebook once, as the reference would
    m = meta.to(out_type).contiguous();
    p.codebook = m.data_ptr();
  } else {
    m = rows_contiguous(meta);
    p.meta = m.data_ptr<float>(), p.meta_stride_n = m.stride(0);
  }
  p.ids = ids ? flat.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.Hkv = Hkv, p.M = M, p.D = int(D), p.dsub = int(dsub);

  const int64_t rows = ids ? flat.numel() : N;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(Hkv * M * D, 1));
  cpu_launch::parallel_ranges(rows, grain,
                              [&](int64_t r0, int64_t r1) { dequantize_range(codec, out_elem, p, r0, r1); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CPU, m) {
  m.impl("quantize_memory", &quantize_memory_cpu);
  m.impl("dequantize_memory", &dequantize_memory_cpu);
}

}  // namespace memory3
