// CPU launcher of the vq decoder: checks codes and meta (its header row is read here, on the
// host), validates ids, dispatches the output dtype and runs memory3/vq.h over memories.
#include "dequantize_vq.h"

#include <cmath>
#include <vector>

#include "checks.h"
#include "row_ids.h"
#include "thread_pool.h"
#include "memory3/vq.h"

namespace memory3 {
namespace {

M3_CPU_MULTIVERSION void dequantize_vq_range(FloatType out_type, const VqDequantizeParams& p, int64_t r0, int64_t r1) {
  dispatch_float(out_type, [&](auto o) M3_LAMBDA_INLINE { cpu::dequantize_vq_rows<decltype(o)>(p, r0, r1); });
}

// An integer header field of meta row 0 in [lo, hi].
int header_field(const float* head, int col, const char* name, int lo, int hi) {
  const float v = head[col];
  TORCH_CHECK(std::floor(v) == v && v >= float(lo) && v <= float(hi), "vq meta header (row 0) column ", col, " is ",
              name, ", which must be an integer in [", lo, ", ", hi, "], got ", v);
  return int(v);
}

}  // namespace

at::Tensor dequantize_vq_cpu(const at::Tensor& codes, const at::Tensor& meta, const std::optional<at::Tensor>& ids,
                             std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(codes.dim() == 4, "codes must be [N, Hkv, M, code_size], got ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "codes must be uint8 for codec vq, got ", codes.scalar_type());
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kFloat,
              "meta must be the vq meta float32 [1 + D + 2^coarse_bits + 2^pq_bits, D], got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(codes.device().is_cpu() && meta.device().is_cpu(),
              "dequantize_memory (CPU kernel): codes and meta must be on the CPU, got ", codes.device(), " and ",
              meta.device());
  const int64_t D = meta.size(1);
  TORCH_CHECK(D >= 8 && D <= kVqMaxD && D % 2 == 0, "vq meta has head dim D = ", D, "; vq decodes even D in [8, ",
              kVqMaxD, "]");
  TORCH_CHECK(meta.size(0) > 0, "vq meta has no header row, got ", meta.sizes());
  const at::Tensor m = meta.contiguous();
  const float* head = m.data_ptr<float>();
  TORCH_CHECK(head[0] == float(kVqFormat), "vq meta header (row 0) column 0 must be the format ", kVqFormat, ", got ",
              head[0]);
  VqDequantizeParams p{};
  p.coarse_bits = header_field(head, 1, "coarse_bits", 1, 16);
  p.pq_m = header_field(head, 2, "pq_m", 1, kVqMaxPqM);
  p.pq_bits = header_field(head, 3, "pq_bits", 1, 16);
  TORCH_CHECK(D % p.pq_m == 0, "vq meta: pq_m = ", p.pq_m, " must divide the head dim D = ", D);
  const int64_t ncoarse = int64_t(1) << p.coarse_bits, nfine = int64_t(1) << p.pq_bits;
  TORCH_CHECK(meta.size(0) == 1 + D + ncoarse + nfine, "vq meta for D = ", D, ", coarse_bits = ", p.coarse_bits,
              ", pq_bits = ", p.pq_bits, " must have 1 + D + 2^coarse_bits + 2^pq_bits = ", 1 + D + ncoarse + nfine,
              " rows, got ", meta.sizes());
  p.code_size = vq_code_size(p.coarse_bits, p.pq_m, p.pq_bits);
  TORCH_CHECK(codes.size(3) == p.code_size, "codes must be [N, Hkv, M, ", p.code_size, "] for this vq meta, got ",
              codes.sizes());
  const at::ScalarType out_type = out_dtype.value_or(at::kBFloat16);
  const FloatType out_elem = float_type_of(out_type, "out_dtype");
  const int64_t N = codes.size(0), Hkv = codes.size(1), M = codes.size(2);

  const auto [flat, out] = decode_rows(codes, ids, D, out_type);

  const at::Tensor c = rows_contiguous(codes);
  p.codes = c.data_ptr<uint8_t>(), p.codes_stride_n = c.stride(0);
  p.rotation = head + D;
  p.coarse = p.rotation + D * D;
  p.fine = p.coarse + ncoarse * D;
  p.ids = ids ? flat.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.Hkv = Hkv, p.M = M, p.D = int(D);

  const int64_t rows = ids ? flat.numel() : N;
  // A vector costs about D^2 multiply-adds (the rotation).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(Hkv * M * D * D, 1));
  cpu_launch::parallel_ranges(rows, grain, [&](int64_t r0, int64_t r1) { dequantize_vq_range(out_elem, p, r0, r1); });
  return out;
}

}  // namespace memory3
