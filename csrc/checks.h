// Input checks shared by the CPU and CUDA launchers. Every failure is a RuntimeError that
// names the argument and shows the shape it expected and the one it got. Checks here read
// shapes, dtypes, devices and scalar arguments only; checks that read data (ids in range,
// kv_lens) live in the launchers (see memory3/params.h for the CUDA plan).
//
// The kernels index with int32 (params.h): every size, id, length and chunk argument must
// fit, and is checked here against kIndexMax before any narrowing, so a value past int32 is
// refused instead of wrapping. python/memory3/ops.py repeats these checks as ValueErrors;
// tests/test_range_checks.py holds the two faces to the same cases.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "memory3/numeric.h"

namespace memory3 {

constexpr int64_t kIndexMax = (int64_t(1) << 31) - 1;  // the largest int32 index

inline void check_index_range(int64_t x, int64_t lo, const char* name) {
  TORCH_CHECK(x >= lo && x <= kIndexMax, name, " must be in [", lo, ", 2^31 - 1], got ", x);
}

inline bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

inline bool is_attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like q, got ", t.device());
}

// A bank of one layer: mem_k/mem_v [N, Hkv, M, D], float like `dtype`, or int8 with float32
// scales [N, Hkv, M]. Returns true when the bank is int8.
inline bool check_bank(const at::Tensor& mem_k, const at::Tensor& mem_v,
                       const std::optional<at::Tensor>& mem_k_scale,
                       const std::optional<at::Tensor>& mem_v_scale,
                       std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(mem_k.dim() == 4, "mem_k must be [N, Hkv, M, D], got ", mem_k.sizes());
  TORCH_CHECK(mem_v.sizes() == mem_k.sizes(), "mem_v must have the shape of mem_k ", mem_k.sizes(),
              ", got ", mem_v.sizes());
  TORCH_CHECK(mem_v.scalar_type() == mem_k.scalar_type(), "mem_v must have the dtype of mem_k (",
              mem_k.scalar_type(), "), got ", mem_v.scalar_type());
  TORCH_CHECK(mem_v.device() == mem_k.device(), "mem_v must be on the device of mem_k");
  TORCH_CHECK(mem_k.size(0) <= kIndexMax, "mem_k holds ", mem_k.size(0), " memories, more than 2^31 - 1");
  const bool int8 = mem_k.scalar_type() == at::kChar;
  TORCH_CHECK(mem_k_scale.has_value() == int8 && mem_v_scale.has_value() == int8,
              int8 ? "an int8 bank needs mem_k_scale and mem_v_scale [N, Hkv, M]"
                   : "mem_k_scale/mem_v_scale are only for an int8 bank, but mem_k is ",
              int8 ? "" : c10::toString(mem_k.scalar_type()));
  if (int8) {
    const auto want = mem_k.sizes().slice(0, 3);
    for (const auto* s : {&*mem_k_scale, &*mem_v_scale}) {
      const char* name = s == &*mem_k_scale ? "mem_k_scale" : "mem_v_scale";
      TORCH_CHECK(s->sizes() == want, name, " must be [N, Hkv, M] = ", want, ", got ", s->sizes());
      TORCH_CHECK(s->scalar_type() == at::kFloat, name, " must be float32, got ", s->scalar_type());
      TORCH_CHECK(s->device() == mem_k.device(), name, " must be on the device of mem_k");
    }
  } else if (dtype.has_value()) {
    TORCH_CHECK(mem_k.scalar_type() == *dtype, "mem_k must have the dtype of q (", *dtype,
                ") or be int8, got ", mem_k.scalar_type());
  } else {
    TORCH_CHECK(is_attention_dtype(mem_k.scalar_type()),
                "mem_k must be float32/float64/bfloat16/float16 or int8, got ", mem_k.scalar_type());
  }
  return int8;
}

inline FloatType float_type_of(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return FloatType::f32;
    case at::kDouble: return FloatType::f64;
    case at::kBFloat16: return FloatType::bf16;
    case at::kHalf: return FloatType::f16;
    default: TORCH_CHECK(false, name, " must be float32/float64/bfloat16/float16, got ", t);
  }
}

// Every id in [-1, N); the message names the argument and the first offender.
template <typename Id>
inline void check_ids_in_range(const Id* ids, int64_t n, int64_t N, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ids[i] >= -1 && ids[i] < N, name, " holds ", int64_t(ids[i]), " at flat index ", i,
                ", outside [-1, N=", N, ")");
}

// A bank or codes tensor with its dims after the first contiguous: kernels copy whole
// memories, and the first dim may have any stride (a layer sliced out of a bigger bank is
// read in place, with no copy).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(0) == 0 || t.select(0, 0).is_contiguous() ? t : t.contiguous();
}

struct AttentionShape {
  int64_t B, T, S, Hq, Hkv, D, N, M, C, R;
  bool int8_bank;
};

inline AttentionShape check_memory_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& mem_k, const at::Tensor& mem_v,
                                             const at::Tensor& mem_ids, const std::optional<at::Tensor>& kv_lens,
                                             int64_t chunk_size, int64_t chunk_start,
                                             const std::optional<at::Tensor>& mem_k_scale,
                                             const std::optional<at::Tensor>& mem_v_scale) {
  // Scalars first: later messages compute with them.
  check_index_range(chunk_size, 1, "chunk_size");
  check_index_range(chunk_start, 0, "chunk_start");
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, Hq, D], got ", q.sizes());
  TORCH_CHECK(is_attention_dtype(q.scalar_type()), "q must be float32/float64/bfloat16/float16, got ",
              q.scalar_type());
  TORCH_CHECK(k.dim() == 4, "k must be [B, S, Hkv, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B, "k must have batch ", B, " like q, got ", k.sizes());
  TORCH_CHECK(k.size(3) == D, "k must have head dim ", D, " like q, got ", k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "q heads (", Hq, ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(T <= S, "q has T=", T, " new tokens but k/v hold only S=", S, " (k/v must include them)");
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), t == &k ? "k" : "v", " must have the dtype of q (",
                q.scalar_type(), "), got ", t->scalar_type());
    check_same_device(q, *t, t == &k ? "k" : "v");
  }
  const bool int8 = check_bank(mem_k, mem_v, mem_k_scale, mem_v_scale, q.scalar_type());
  TORCH_CHECK(mem_k.size(1) == Hkv, "mem_k must have Hkv=", Hkv, " heads like k, got ", mem_k.sizes());
  TORCH_CHECK(mem_k.size(3) == D, "mem_k must have head dim ", D, " like q, got ", mem_k.sizes());
  check_same_device(q, mem_k, "mem_k");
  TORCH_CHECK(mem_ids.dim() == 3 && mem_ids.size(0) == B, "mem_ids must be [B=", B, ", C, R], got ",
              mem_ids.sizes());
  TORCH_CHECK(is_index_dtype(mem_ids.scalar_type()), "mem_ids must be int32 or int64, got ", mem_ids.scalar_type());
  check_same_device(q, mem_ids, "mem_ids");
  const std::pair<const char*, int64_t> sizes[] = {{"B", B}, {"T", T}, {"S", S}, {"Hq", Hq}, {"D", D},
                                                   {"M", mem_k.size(2)}, {"C", mem_ids.size(1)},
                                                   {"R", mem_ids.size(2)}};
  for (const auto& [name, x] : sizes)
    TORCH_CHECK(x <= kIndexMax, "memory_attention: ", name, " = ", x, " is more than 2^31 - 1");
  if (kv_lens.has_value()) {
    TORCH_CHECK(kv_lens->dim() == 1 && kv_lens->size(0) == B, "kv_lens must be [B=", B, "], got ",
                kv_lens->sizes());
    TORCH_CHECK(is_index_dtype(kv_lens->scalar_type()), "kv_lens must be int32 or int64, got ",
                kv_lens->scalar_type());
    check_same_device(q, *kv_lens, "kv_lens");
  } else if (S > chunk_start) {
    // Without kv_lens every sequence fills S: the table must cover the chunk of position S-1.
    const int64_t need = (S - 1 - chunk_start) / chunk_size + 1;
    TORCH_CHECK(mem_ids.size(1) >= need, "mem_ids has ", mem_ids.size(1), " chunks but the context of ", S,
                " tokens (chunk_start ", chunk_start, ", chunk_size ", chunk_size, ") needs ", need);
  }
  return {B, T, S, Hq, Hkv, D, mem_k.size(0), mem_k.size(2), mem_ids.size(1), mem_ids.size(2), int8};
}

}  // namespace memory3
