// CUDA launcher of memory_attention, forward: the CPU launcher's shape checks (checks.h), ids
// and lengths narrowed and range-checked on the device (range_check.h), outputs and split
// scratch from the caching allocator, the split chosen on the host from shapes and the SM
// count, launches on the current stream. Kernels: memory3/decode_attention.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "memory3/decode_attention.cuh"
#include "memory3/index_narrow.cuh"
#include "memory_attention_prefill.h"
#include "range_check.h"

// Kernels compiled in csrc/cuda/decode_attention_*.cu.
#define M3_DECODE_EXTERN(T) \
  M3_DECODE_INSTANCES(extern, T, 64) M3_DECODE_INSTANCES(extern, T, 80) M3_DECODE_INSTANCES(extern, T, 96) \
  M3_DECODE_INSTANCES(extern, T, 128) M3_DECODE_INSTANCES(extern, T, 0) M3_DECODE_MERGE_INSTANCE(extern, T)
M3_DECODE_EXTERN(__nv_bfloat16)
M3_DECODE_EXTERN(__half)
M3_DECODE_EXTERN(float)
M3_DECODE_INSTANCES(extern, double, 0)

namespace memory3 {
namespace {

using cuda::DecodeSplit;

// Streaming multiprocessors of the current device (cached: an attribute query, no sync).
int sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 64) return 132;
  int n = cache[device].load();
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n);
  }
  return n;
}

int max_dynamic_smem() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

// Every row of t (dims before the last) starts on 16 bytes: base and strides of dims 0..2.
bool rows_aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t.stride(d) * int64_t(t.element_size()) % 16 != 0) return false;
  return t.size(3) * int64_t(t.element_size()) % 16 == 0;
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// An index tensor as contiguous int32 on the device: int64 values are narrowed by a kernel
// that records (and empties) any value outside [lo, hi).
at::Tensor device_int32(const at::Tensor& t, int64_t lo, int64_t hi, int32_t bad, int code, cudaStream_t stream) {
  if (t.scalar_type() == at::kInt) return t.contiguous();
  const at::Tensor in = t.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kInt));
  cuda::NarrowParams np{in.data_ptr<int64_t>(), out.data_ptr<int32_t>(), in.numel(), lo, hi, bad, code,
                        cuda_launch::range_error_words()};
  C10_CUDA_CHECK(cuda::run_narrow_index(np, stream));
  return out;
}

template <typename T>
cudaError_t run_head_dim(const MemoryAttentionParams& p, const DecodeSplit& sp, bool int8, bool vec,
                         cudaStream_t stream) {
  using cuda::run_decode_attention;
  if constexpr (std::is_same_v<T, double>) {
    return int8 ? run_decode_attention<T, int8_t, 0>(p, sp, stream) : run_decode_attention<T, T, 0>(p, sp, stream);
  } else {
    switch (vec ? p.D : 0) {
      case 64: return int8 ? run_decode_attention<T, int8_t, 64>(p, sp, stream) : run_decode_attention<T, T, 64>(p, sp, stream);
      case 80: return int8 ? run_decode_attention<T, int8_t, 80>(p, sp, stream) : run_decode_attention<T, T, 80>(p, sp, stream);
      case 96: return int8 ? run_decode_attention<T, int8_t, 96>(p, sp, stream) : run_decode_attention<T, T, 96>(p, sp, stream);
      case 128:
        return int8 ? run_decode_attention<T, int8_t, 128>(p, sp, stream) : run_decode_attention<T, T, 128>(p, sp, stream);
      default: return int8 ? run_decode_attention<T, int8_t, 0>(p, sp, stream) : run_decode_attention<T, T, 0>(p, sp, stream);
    }
  }
}

// The decode kernel over every query row (split as `sp` says), then the merge of the splits.
template <typename T>
void run_decode(const MemoryAttentionParams& p, const DecodeSplit& sp, bool int8, bool vec, cudaStream_t stream) {
  C10_CUDA_CHECK(run_head_dim<T>(p, sp, int8, vec, stream));
  if constexpr (!std::is_same_v<T, double>) {
    if (sp.splits > 1) C10_CUDA_CHECK(cuda::run_decode_merge<T>(p, sp, stream));
  }
}

// Calls f(T{}) with the CUDA element type of q.
template <typename F>
void dispatch_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kHalf: return f(__half{});
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK(false, "q must be float32/float64/bfloat16/float16, got ", t);
  }
}

// Shared memory the decode kernel needs at head dim D for q's dtype.
int decode_smem(at::ScalarType t, int D) {
  int bytes = 0;
  dispatch_dtype(t, [&](auto x) { bytes = cuda::decode_smem_bytes<decltype(x)>(D); });
  return bytes;
}

// Every row, one split: the path of query blocks longer than kDecodeMaxQueries.
void run_long_queries(const MemoryAttentionParams& p, at::ScalarType t, bool int8, bool vec, cudaStream_t stream) {
  const DecodeSplit sp{1, int(cuda::decode_split_len(p.S, 1)), nullptr, nullptr};
  dispatch_dtype(t, [&](auto x) { run_decode<decltype(x)>(p, sp, int8, vec, stream); });
}

std::tuple<at::Tensor, at::Tensor> memory_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mem_k,
    const at::Tensor& mem_v, const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
    int64_t chunk_size, int64_t chunk_start, std::optional<double> scale,
    const std::optional<at::Tensor>& mem_k_scale, const std::optional<at::Tensor>& mem_v_scale) {
  const AttentionShape s = check_memory_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start,
                                                  mem_k_scale, mem_v_scale);
  TORCH_CHECK(q.is_cuda(), "memory_attention (CUDA kernel): q must be on a CUDA device, got ", q.device());
  TORCH_CHECK(s.D >= 1 && s.D <= cuda::kDecodeMaxD, "memory_attention (CUDA kernel): head dim D = ", s.D,
              " must be in [1, ", cuda::kDecodeMaxD, "]");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = at::empty({s.B, s.T, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.T}, q.options().dtype(at::kFloat));
  if (s.B == 0 || s.T == 0 || s.Hq == 0) return {out, lse};

  const bool deferred = cuda_launch::range_check_deferred(stream);
  const at::Tensor qc = last_dim_contiguous(q), kc = last_dim_contiguous(k), vc = last_dim_contiguous(v);
  const at::Tensor mk = last_dim_contiguous(mem_k), mv = last_dim_contiguous(mem_v);
  // Out-of-range int64 values become -2 (ids) or -1 (lengths): empty, and already recorded.
  const at::Tensor ids = device_int32(mem_ids, -1, s.N, -2, cuda::kRangeMemIds, stream);
  std::optional<at::Tensor> lens;
  if (kv_lens) lens = device_int32(*kv_lens, 0, s.S + 1, -1, cuda::kRangeKvLens, stream);
  std::optional<at::Tensor> mks, mvs;
  if (s.int8_bank) mks = mem_k_scale->contiguous(), mvs = mem_v_scale->contiguous();

  MemoryAttentionParams p{};
  p.q = qc.data_ptr(), p.q_stride_b = qc.stride(0), p.q_stride_t = qc.stride(1), p.q_stride_h = qc.stride(2);
  p.k = kc.data_ptr(), p.k_stride_b = kc.stride(0), p.k_stride_s = kc.stride(1), p.k_stride_h = kc.stride(2);
  p.v = vc.data_ptr(), p.v_stride_b = vc.stride(0), p.v_stride_s = vc.stride(1), p.v_stride_h = vc.stride(2);
  p.mem_k = mk.data_ptr(), p.mk_stride_n = mk.stride(0), p.mk_stride_h = mk.stride(1), p.mk_stride_m = mk.stride(2);
  p.mem_v = mv.data_ptr(), p.mv_stride_n = mv.stride(0), p.mv_stride_h = mv.stride(1), p.mv_stride_m = mv.stride(2);
  p.mem_k_scale = mks ? mks->data_ptr<float>() : nullptr;
  p.mem_v_scale = mvs ? mvs->data_ptr<float>() : nullptr;
  p.mem_ids = ids.data_ptr<int32_t>();
  p.kv_lens = lens ? lens->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.B = int(s.B), p.T = int(s.T), p.S = int(s.S), p.Hq = int(s.Hq), p.Hkv = int(s.Hkv), p.D = int(s.D);
  p.N = int(s.N), p.M = int(s.M), p.C = int(s.C), p.R = int(s.R);
  p.chunk_size = int(chunk_size), p.chunk_start = int(chunk_start);
  p.scale = scale.value_or(1.0 / std::sqrt(double(s.D)));
  p.range_error = cuda_launch::range_error_words();

  const int64_t blocks = s.B * s.Hkv * cuda::decode_row_blocks(s.T, s.Hq / s.Hkv);
  TORCH_CHECK(blocks <= kIndexMax, "memory_attention (CUDA kernel): B * Hkv * ceil(T * Hq / Hkv / ",
              cuda::kDecodeRows, ") = ", blocks, " blocks, more than 2^31 - 1");
  const int elem = int(q.element_size());
  TORCH_CHECK(
      decode_smem(q.scalar_type(), int(s.D)) <= max_dynamic_smem(), "memory_attention (CUDA kernel): head dim ",
      s.D, " in ", q.scalar_type(), " needs more shared memory than this device has");
  // The 16-byte path: every context and bank row aligned (else element loads, same answers).
  const bool vec = rows_aligned16(kc) && rows_aligned16(vc) && rows_aligned16(mk) && rows_aligned16(mv) &&
                   s.D * elem % 16 == 0;

  if (s.T > cuda::kDecodeMaxQueries) {
    // Prefill-length query blocks: the tensor-core prefill kernel (memory_attention_prefill.h:
    // bf16/fp16, head dims 32-128, aligned rows), else the decode kernel over every row.
    const bool half = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
    const PrefillDtype pd = q.scalar_type() == at::kBFloat16 ? PrefillDtype::bf16 : PrefillDtype::fp16;
    if (half && launch_memory_attention_prefill(p, pd, s.int8_bank, stream)) C10_CUDA_KERNEL_LAUNCH_CHECK();
    else run_long_queries(p, q.scalar_type(), s.int8_bank, vec, stream);
  } else {
    // Decode and short blocks: split the context when (sequence, KV head, row block) items
    // alone would leave SMs idle (float accumulation only: the merge is float).
    DecodeSplit sp{1, int(cuda::decode_split_len(s.S, 1)), nullptr, nullptr};
    at::Tensor part_o, part_lse;
    if (q.scalar_type() != at::kDouble) {
      sp.splits = cuda::decode_split_count(blocks, s.S, sm_count());
      sp.split_len = int(cuda::decode_split_len(s.S, sp.splits));
    }
    if (sp.splits > 1) {
      part_o = at::empty({sp.splits, s.B, s.T, s.Hq, s.D}, q.options().dtype(at::kFloat));
      part_lse = at::empty({sp.splits, s.B, s.Hq, s.T}, q.options().dtype(at::kFloat));
      sp.part_o = part_o.data_ptr(), sp.part_lse = part_lse.data_ptr<float>();
    }
    dispatch_dtype(q.scalar_type(), [&](auto t) { run_decode<decltype(t)>(p, sp, s.int8_bank, vec, stream); });
  }
  cuda_launch::finish_range_check(stream, deferred);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(memory3, CUDA, m) { m.impl("memory_attention", &memory_attention_cuda); }

}  // namespace memory3
