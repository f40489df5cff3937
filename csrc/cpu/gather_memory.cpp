// CPU launcher of gather_memory: checks, id validation, dtype dispatch and the
// ISA-multiversioned worker that runs the kernel of include/memory3/gather.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "row_ids.h"
#include "thread_pool.h"
#include "memory3/gather.h"

namespace memory3 {
namespace {

struct GatherTypes {
  bool int8;        // the bank is int8 (then `bank` is unused)
  FloatType bank;   // dtype of a float bank
  FloatType out;
};

// Compiled once per ISA level; the kernel templates are inlined into each clone.
M3_CPU_MULTIVERSION void gather_range(const GatherParams& p, const GatherTypes& t, int64_t r0, int64_t r1) {
  dispatch_float(t.out, [&](auto o) M3_LAMBDA_INLINE {
    using Out = decltype(o);
    using Acc = std::conditional_t<std::is_same_v<Out, double>, double, float>;
    if (t.int8) return cpu::gather_rows<int8_t, Out, Acc>(p, r0, r1);
    dispatch_float(t.bank, [&](auto b) M3_LAMBDA_INLINE { cpu::gather_rows<decltype(b), Out, Acc>(p, r0, r1); });
  });
}

BankRows bank_rows(const at::Tensor& bank, const std::optional<at::Tensor>& scale) {
  return {bank.data_ptr(), bank.stride(0), scale ? scale->data_ptr<float>() : nullptr, scale ? scale->stride(0) : 0};
}

std::tuple<at::Tensor, at::Tensor> gather_memory_cpu(const at::Tensor& mem_k, const at::Tensor& mem_v,
                                                     const at::Tensor& ids, std::optional<at::ScalarType> out_dtype,
                                                     const std::optional<at::Tensor>& mem_k_scale,
                                                     const std::optional<at::Tensor>& mem_v_scale) {
  const bool int8 = check_bank(mem_k, mem_v, mem_k_scale, mem_v_scale, std::nullopt);
  TORCH_CHECK(mem_k.device().is_cpu(), "gather_memory (CPU kernel): mem_k must be on the CPU, got ", mem_k.device());
  const at::ScalarType out_type = out_dtype.value_or(int8 ? at::kBFloat16 : mem_k.scalar_type());
  const GatherTypes types{int8, int8 ? FloatType::f32 : float_type_of(mem_k.scalar_type(), "mem_k"),
                          float_type_of(out_type, "out_dtype")};
  const int64_t N = mem_k.size(0), Hkv = mem_k.size(1), M = mem_k.size(2), D = mem_k.size(3);
  at::Tensor flat = flat_cpu_ids(ids, N, "gather_memory");

  std::vector<int64_t> out_shape = ids.sizes().vec();
  out_shape.insert(out_shape.end(), {Hkv, M, D});
  at::Tensor k = at::empty(out_shape, mem_k.options().dtype(out_type));
  at::Tensor v = at::empty(out_shape, mem_k.options().dtype(out_type));

  const at::Tensor bank_k = rows_contiguous(mem_k), bank_v = rows_contiguous(mem_v);
  std::optional<at::Tensor> scale_k, scale_v;
  if (int8) scale_k = rows_contiguous(*mem_k_scale), scale_v = rows_contiguous(*mem_v_scale);
  GatherParams p{};
  p.k = bank_rows(bank_k, scale_k);
  p.v = bank_rows(bank_v, scale_v);
  p.ids = flat.data_ptr<int64_t>();
  p.out_k = k.data_ptr(), p.out_v = v.data_ptr();
  p.vectors = Hkv * M, p.D = D;

  // Tasks of at least ~64 KB of output, so small gathers stay on one thread.
  const int64_t row_bytes = 2 * Hkv * M * D * k.element_size();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
  cpu_launch::parallel_ranges(flat.numel(), grain, [&](int64_t r0, int64_t r1) { gather_range(p, types, r0, r1); });
  return {k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CPU, m) { m.impl("gather_memory", &gather_memory_cpu); }

}  // namespace memory3
