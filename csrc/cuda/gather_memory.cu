// CUDA launcher of gather_memory: the bank on this GPU or in pinned host memory (read in
// place by the kernel through unified addressing: no staging copy), ids on the GPU, output on
// the device of ids. Checks as the CPU launcher; ids checked on the device (range_check.h).
// Kernels: memory3/gather.cuh, compiled in csrc/cuda/gather_memory_to_*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "memory3/gather.cuh"
#include "range_check.h"

M3_GATHER_INSTANCES_FOR_OUT(extern, float)
M3_GATHER_INSTANCES_FOR_OUT(extern, double)
M3_GATHER_INSTANCES_FOR_OUT(extern, __nv_bfloat16)
M3_GATHER_INSTANCES_FOR_OUT(extern, __half)

namespace memory3 {
namespace {

template <typename F>
void dispatch_cuda_type(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    case at::kChar: return f(int8_t{});
    default: TORCH_CHECK(false, name, " must be float32/float64/bfloat16/float16 (or an int8 bank), got ", t);
  }
}

// A bank tensor the GPU of `ids` can read: on that GPU, or pinned host memory.
void check_readable(const at::Tensor& t, const at::Tensor& ids, const char* name) {
  if (t.is_cuda()) {
    TORCH_CHECK(t.device() == ids.device(), "gather_memory (CUDA kernel): ", name, " is on ", t.device(),
                " but ids on ", ids.device(), " (a GPU bank must be on the GPU of ids)");
  } else {
    TORCH_CHECK(t.is_cpu() && t.is_pinned(), "gather_memory (CUDA kernel): ", name,
                " must be on the GPU of ids or in pinned host memory (tensor.pin_memory()), got ",
                t.is_cpu() ? "pageable host memory" : t.device().str());
  }
}

BankRows bank_rows(const at::Tensor& bank, const std::optional<at::Tensor>& scale) {
  return {bank.data_ptr(), bank.stride(0), scale ? scale->data_ptr<float>() : nullptr, scale ? scale->stride(0) : 0};
}

// 16-byte pieces: every memory row of the bank starts on 16 bytes and a vector (D elements)
// is whole pieces, so a piece never straddles two vectors (and its int8 scale is one).
bool rows_aligned16(const at::Tensor& bank) {
  const int64_t e = bank.element_size();
  return reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0 && bank.stride(0) * e % 16 == 0 &&
         bank.size(3) * e % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor> gather_memory_cuda(const at::Tensor& mem_k, const at::Tensor& mem_v,
                                                      const at::Tensor& ids, std::optional<at::ScalarType> out_dtype,
                                                      const std::optional<at::Tensor>& mem_k_scale,
                                                      const std::optional<at::Tensor>& mem_v_scale) {
  const bool int8 = check_bank(mem_k, mem_v, mem_k_scale, mem_v_scale, std::nullopt);
  TORCH_CHECK(is_index_dtype(ids.scalar_type()), "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.is_cuda(), "gather_memory (CUDA kernel): ids must be on the GPU (the output goes to the device of ",
              "ids), got ", ids.device());
  check_readable(mem_k, ids, "mem_k");
  check_readable(mem_v, ids, "mem_v");
  if (int8) check_readable(*mem_k_scale, ids, "mem_k_scale"), check_readable(*mem_v_scale, ids, "mem_v_scale");
  const at::ScalarType out_type = out_dtype.value_or(int8 ? at::kBFloat16 : mem_k.scalar_type());
  float_type_of(out_type, "out_dtype");  // a float type, else the op's error
  const c10::cuda::CUDAGuard guard(ids.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t N = mem_k.size(0), Hkv = mem_k.size(1), M = mem_k.size(2), D = mem_k.size(3);

  std::vector<int64_t> out_shape = ids.sizes().vec();
  out_shape.insert(out_shape.end(), {Hkv, M, D});
  const auto out_options = ids.options().dtype(out_type);
  at::Tensor k = at::empty(out_shape, out_options), v = at::empty(out_shape, out_options);
  const int64_t R = ids.numel();
  if (R == 0 || k.numel() == 0) return {k, v};
  TORCH_CHECK(2 * R <= kIndexMax, "gather_memory (CUDA kernel): ", R, " ids, more than 2^30 - 1");

  const bool deferred = cuda_launch::range_check_deferred(stream);
  // A copy of a pinned bank would be a host copy: banks must already have their rows contiguous.
  const bool pinned = !mem_k.is_cuda();
  const at::Tensor bank_k = pinned ? mem_k : rows_contiguous(mem_k), bank_v = pinned ? mem_v : rows_contiguous(mem_v);
  if (pinned)
    TORCH_CHECK(mem_k.select(0, 0).is_contiguous() && mem_v.select(0, 0).is_contiguous(),
                "gather_memory (CUDA kernel): a pinned host bank must have (Hkv, M, D) contiguous");
  std::optional<at::Tensor> scale_k, scale_v;
  if (int8) {
    scale_k = pinned ? *mem_k_scale : rows_contiguous(*mem_k_scale);
    scale_v = pinned ? *mem_v_scale : rows_contiguous(*mem_v_scale);
    if (pinned)
      TORCH_CHECK(scale_k->select(0, 0).is_contiguous() && scale_v->select(0, 0).is_contiguous(),
                  "gather_memory (CUDA kernel): pinned host scales must have (Hkv, M) contiguous");
  }
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();  // widening: exact

  GatherParams p{};
  p.k = bank_rows(bank_k, scale_k);
  p.v = bank_rows(bank_v, scale_v);
  p.ids = flat.data_ptr<int64_t>();
  p.out_k = k.data_ptr(), p.out_v = v.data_ptr();
  p.vectors = Hkv * M, p.D = D;
  p.range_error = cuda_launch::range_error_words();
  const bool vec = rows_aligned16(bank_k) && rows_aligned16(bank_v);
  dispatch_cuda_type(mem_k.scalar_type(), "mem_k", [&](auto in) {
    dispatch_cuda_type(out_type, "out_dtype", [&](auto o) {
      using In = decltype(in);
      using Out = decltype(o);
      if constexpr (std::is_same_v<Out, int8_t>) {
        TORCH_CHECK(false, "out_dtype must be a float dtype");
      } else {
        const cudaError_t err = cuda::run_gather_memory<In, Out>(p, N, R, vec, stream);
        C10_CUDA_CHECK(err);
      }
    });
  });
  cuda_launch::finish_range_check(stream, deferred);
  return {k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CUDA, m) { m.impl("gather_memory", &gather_memory_cuda); }

}  // namespace memory3
