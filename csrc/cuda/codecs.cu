// CUDA launchers of the memory codecs: quantize_memory (int8, int4, pq) and
// dequantize_memory (int8, int4, pq, vq; with ids = gather + decode in one pass). Checks and
// messages follow the CPU launchers (csrc/cpu/quantize_memory.cpp, dequantize_vq.cpp); ids
// are checked on the device (range_check.h), and so is vq's header row (no host copy).
// Kernels: memory3/quant.cuh (csrc/cuda/quant_kernels.cu), memory3/vq.cuh (vq_kernels.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "checks.h"
#include "memory3/quant.cuh"
#include "memory3/vq.cuh"
#include "range_check.h"

M3_QUANTIZE_INSTANCE(extern, float)
M3_QUANTIZE_INSTANCE(extern, double)
M3_QUANTIZE_INSTANCE(extern, __nv_bfloat16)
M3_QUANTIZE_INSTANCE(extern, __half)
M3_DEQUANTIZE_INSTANCE(extern, float)
M3_DEQUANTIZE_INSTANCE(extern, double)
M3_DEQUANTIZE_INSTANCE(extern, __nv_bfloat16)
M3_DEQUANTIZE_INSTANCE(extern, __half)
M3_VQ_INSTANCE(extern, float)
M3_VQ_INSTANCE(extern, double)
M3_VQ_INSTANCE(extern, __nv_bfloat16)
M3_VQ_INSTANCE(extern, __half)

namespace memory3 {
namespace {

template <typename F>
void dispatch_float_type(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    default: TORCH_CHECK(false, name, " must be float32/float64/bfloat16/float16, got ", t);
  }
}

Codec parse_codec(std::string_view codec) {
  if (codec == "int8") return Codec::int8;
  if (codec == "int4") return Codec::int4;
  if (codec == "pq") return Codec::pq;
  TORCH_CHECK(codec != "vq", "quantize_memory: vq encodes with FAISS, in Python (memory3.ops.quantize_memory); ",
              "the op decodes vq only");
  TORCH_CHECK(false, "codec must be one of int8, int4, pq; got '", codec, "'");
}

void check_on(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, " (CUDA kernel): ", name, " must be on ", device, ", got ", t.device());
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

std::tuple<at::Tensor, at::Tensor> quantize_memory_cuda(const at::Tensor& x, std::string_view codec_name,
                                                        const std::optional<at::Tensor>& codebook) {
  const Codec codec = parse_codec(codec_name);
  TORCH_CHECK(x.dim() == 4, "x must be [N, Hkv, M, D], got ", x.sizes());
  float_type_of(x.scalar_type(), "x");
  TORCH_CHECK(x.is_cuda(), "quantize_memory (CUDA kernel): x must be on a CUDA device, got ", x.device());
  const int64_t N = x.size(0), Hkv = x.size(1), M = x.size(2), D = x.size(3);
  TORCH_CHECK(D > 0 && D < (int64_t(1) << 24), "x must have a head dim D in [1, 2^24), got ", x.sizes());
  TORCH_CHECK(codec != Codec::int4 || D % 2 == 0, "int4 packs two values per byte: x needs an even head dim D, got ",
              x.sizes());
  TORCH_CHECK(codec == Codec::pq || !codebook.has_value(), "codebook is only for codec pq, not ", codec_name);
  TORCH_CHECK(codec != Codec::pq || codebook.has_value(),
              "codec pq needs a codebook [Hkv, D / d_sub, 256, d_sub] (memory3.ops.train_pq_codebook)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

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
      check_on(*codebook, x.device(), "quantize_memory", "codebook");
      TORCH_CHECK(Hkv * (D / p.dsub) <= 65535, "quantize_memory (CUDA kernel): Hkv * D / d_sub = ",
                  Hkv * (D / p.dsub), " sub-spaces, more than 65535");
      codes = at::empty({N, Hkv, M, D / p.dsub}, u8);
      meta = codebook->clone(at::MemoryFormat::Contiguous);  // a copy: outputs may not alias inputs
      p.codebook = meta.data_ptr<float>();
      break;
  }
  p.codes = codes.data_ptr();
  p.meta = codec == Codec::pq ? nullptr : meta.data_ptr<float>();
  TORCH_CHECK(N * Hkv * M / cuda::kQuantWarps < kIndexMax && N * M / cuda::kQuantThreads < kIndexMax,
              "quantize_memory (CUDA kernel): x holds too many vectors for one launch, got ", x.sizes());
  dispatch_float_type(x.scalar_type(), "x",
                      [&](auto t) { C10_CUDA_CHECK(cuda::run_quantize_memory<decltype(t)>(codec, p, stream)); });
  return {codes, meta};
}

// ---------------------------------------------------------------- dequantize_memory

// Checks codes and meta against the codec; returns D and sets dsub (pq).
int64_t check_codes(Codec codec, const at::Tensor& codes, const at::Tensor& meta, int64_t& dsub) {
  TORCH_CHECK(codes.dim() == 4, "codes must be [N, Hkv, M, *], got ", codes.sizes());
  const bool int8 = codec == Codec::int8;
  TORCH_CHECK(codes.scalar_type() == (int8 ? at::kChar : at::kByte), "codes must be ", int8 ? "int8" : "uint8",
              " for codec ", int8 ? "int8" : codec == Codec::int4 ? "int4" : "pq", ", got ", codes.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kFloat, "meta must be float32, got ", meta.scalar_type());
  TORCH_CHECK(codes.is_cuda(), "dequantize_memory (CUDA kernel): codes must be on a CUDA device, got ", codes.device());
  check_on(meta, codes.device(), "dequantize_memory", "meta");
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

// Rows to decode: every memory, or ids (any shape, int32/int64 on the device of codes,
// flattened to int64; their values are checked by the kernel). out [rows.., Hkv, M, D].
struct Rows {
  at::Tensor flat;  // undefined without ids
  at::Tensor out;
  int64_t count;
};

Rows decode_rows(const at::Tensor& codes, const std::optional<at::Tensor>& ids, int64_t D, at::ScalarType out_type) {
  Rows rows;
  std::vector<int64_t> shape{codes.size(0)};
  if (ids) {
    TORCH_CHECK(is_index_dtype(ids->scalar_type()), "ids must be int32 or int64, got ", ids->scalar_type());
    check_on(*ids, codes.device(), "dequantize_memory", "ids");
    rows.flat = ids->reshape({-1}).to(at::kLong).contiguous();
    shape = ids->sizes().vec();
  }
  shape.insert(shape.end(), {codes.size(1), codes.size(2), D});
  rows.out = at::empty(shape, codes.options().dtype(out_type));
  rows.count = ids ? rows.flat.numel() : codes.size(0);
  TORCH_CHECK(rows.count <= kIndexMax, "dequantize_memory (CUDA kernel): ", rows.count, " rows, more than 2^31 - 1");
  return rows;
}

at::Tensor dequantize_vq_cuda(const at::Tensor& codes, const at::Tensor& meta, const std::optional<at::Tensor>& ids,
                              at::ScalarType out_type, cudaStream_t stream) {
  TORCH_CHECK(codes.dim() == 4, "codes must be [N, Hkv, M, code_size], got ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8 for codec vq, got ", codes.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kFloat,
              "meta must be the vq meta float32 [1 + D + 2^coarse_bits + 2^pq_bits, D], got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(codes.is_cuda(), "dequantize_memory (CUDA kernel): codes must be on a CUDA device, got ", codes.device());
  check_on(meta, codes.device(), "dequantize_memory", "meta");
  const int64_t D = meta.size(1);
  TORCH_CHECK(D >= 8 && D <= cuda::kVqMaxDim && D % 2 == 0, "vq meta has head dim D = ", D,
              "; vq decodes even D in [8, ", cuda::kVqMaxDim, "]");
  TORCH_CHECK(meta.size(0) > 1 + D, "vq meta has no room for its header, rotation and tables, got ", meta.sizes());
  TORCH_CHECK(codes.size(3) >= 1 && codes.size(3) <= 64, "codes must be [N, Hkv, M, code_size] with a vq code size ",
              "in [1, 64], got ", codes.sizes());
  const at::Tensor m = meta.contiguous();
  Rows rows = decode_rows(codes, ids, D, out_type);
  const at::Tensor c = rows_contiguous(codes);
  cuda::VqCudaParams p{};
  p.codes = c.data_ptr<uint8_t>(), p.codes_stride_n = c.stride(0);
  p.meta = m.data_ptr<float>(), p.meta_rows = m.size(0);
  p.ids = ids ? rows.flat.data_ptr<int64_t>() : nullptr;
  p.out = rows.out.data_ptr();
  p.N = codes.size(0), p.Hkv = codes.size(1), p.M = codes.size(2);
  p.vectors = rows.count * p.Hkv * p.M;
  p.D = int(D), p.code_size = int(codes.size(3));
  p.range_error = cuda_launch::range_error_words();
  TORCH_CHECK(p.vectors / cuda::kVqTile < kIndexMax, "dequantize_memory (CUDA kernel): too many vq vectors, ",
              p.vectors);
  dispatch_float_type(out_type, "out_dtype",
                      [&](auto o) { C10_CUDA_CHECK(cuda::run_dequantize_vq<decltype(o)>(p, stream)); });
  return rows.out;
}

at::Tensor dequantize_memory_cuda(const at::Tensor& codes, const at::Tensor& meta, std::string_view codec_name,
                                  const std::optional<at::Tensor>& ids, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_type = out_dtype.value_or(at::kBFloat16);
  float_type_of(out_type, "out_dtype");
  TORCH_CHECK(codes.is_cuda(), "dequantize_memory (CUDA kernel): codes must be on a CUDA device, got ", codes.device());
  const c10::cuda::CUDAGuard guard(codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool deferred = cuda_launch::range_check_deferred(stream);
  if (codec_name == "vq") {
    at::Tensor out = dequantize_vq_cuda(codes, meta, ids, out_type, stream);
    cuda_launch::finish_range_check(stream, deferred);
    return out;
  }
  TORCH_CHECK(codec_name == "int8" || codec_name == "int4" || codec_name == "pq",
              "codec must be one of int8, int4, pq, vq; got '", codec_name, "'");
  const Codec codec = parse_codec(codec_name);
  int64_t dsub = 1;
  const int64_t D = check_codes(codec, codes, meta, dsub);
  TORCH_CHECK(D > 0 && D < (int64_t(1) << 24), "codes decode to a head dim D = ", D, ", outside [1, 2^24)");
  Rows rows = decode_rows(codes, ids, D, out_type);

  const at::Tensor c = rows_contiguous(codes);
  DequantizeParams p{};
  p.codes = c.data_ptr(), p.codes_stride_n = c.stride(0);
  at::Tensor m;
  if (codec == Codec::pq) {  // decoding copies centroids: the codebook in the output dtype, as the CPU
    m = meta.to(out_type).contiguous();
    p.codebook = m.data_ptr();
  } else {
    m = rows_contiguous(meta);
    p.meta = m.data_ptr<float>(), p.meta_stride_n = m.stride(0);
  }
  p.ids = ids ? rows.flat.data_ptr<int64_t>() : nullptr;
  p.out = rows.out.data_ptr();
  p.Hkv = codes.size(1), p.M = codes.size(2), p.D = int(D), p.dsub = int(dsub);
  p.range_error = cuda_launch::range_error_words();
  // 8 outputs per step: D a multiple of 8 and codes rows on 16 bytes (int8 loads 8 codes at once).
  const bool wide = D % cuda::kDecodePiece == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 &&
                    c.stride(0) % 16 == 0;
  dispatch_float_type(out_type, "out_dtype", [&](auto o) {
    C10_CUDA_CHECK(cuda::run_dequantize_memory<decltype(o)>(codec, p, codes.size(0), rows.count, wide, stream));
  });
  cuda_launch::finish_range_check(stream, deferred);
  return rows.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CUDA, m) {
  m.impl("quantize_memory", &quantize_memory_cuda);
  m.impl("dequantize_memory", &dequantize_memory_cuda);
}

}  // namespace memory3
