// Picks the tensor-core prefill kernel for a memory_attention call, or says it cannot serve
// it (the caller falls back). Torch-free: the checks read only params.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "env_choice.h"
#include "memory_attention_prefill.h"

namespace memory3 {
namespace {

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Rows of `elems`-element 16-byte units: base and every stride a multiple of `elems`.
bool rows_aligned(const void* ptr, int elem_bytes, std::initializer_list<int64_t> strides) {
  if (!aligned(ptr, 16)) return false;
  for (int64_t s : strides)
    if (s * elem_bytes % 16 != 0) return false;
  return true;
}

}  // namespace

bool prefill_supports(const MemoryAttentionParams& p, bool int8_bank) {
  if (p.D != 32 && p.D != 64 && p.D != 80 && p.D != 96 && p.D != 128) return false;
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.chunk_size < 1 || p.chunk_start < 0) return false;
  if (int8_bank && (p.mem_k_scale == nullptr || p.mem_v_scale == nullptr)) return false;
  // Grids of one CTA per 64 rows (query tiles, key blocks, memory key blocks per chunk) of
  // each (sequence, KV head) must fit gridDim.x (forward and backward kernels).
  const int64_t bh = int64_t(p.B) * p.Hkv, grid_max = (int64_t(1) << 31) - 1;
  const int64_t q_tiles = (int64_t(p.T) * (p.Hq / p.Hkv) + 63) / 64, k_tiles = (int64_t(p.S) + 63) / 64;
  const int64_t m_tiles = (int64_t(p.R) * p.M + 63) / 64 * p.C;
  if (q_tiles * bh > grid_max || k_tiles * bh > grid_max || m_tiles * bh > grid_max) return false;
  const int e = 2;  // bf16 / fp16
  const int be = int8_bank ? 1 : 2;
  return rows_aligned(p.q, e, {p.q_stride_b, p.q_stride_t, p.q_stride_h}) &&
         rows_aligned(p.k, e, {p.k_stride_b, p.k_stride_s, p.k_stride_h}) &&
         rows_aligned(p.v, e, {p.v_stride_b, p.v_stride_s, p.v_stride_h}) &&
         rows_aligned(p.mem_k, be, {p.mk_stride_n, p.mk_stride_h, p.mk_stride_m}) &&
         rows_aligned(p.mem_v, be, {p.mv_stride_n, p.mv_stride_h, p.mv_stride_m}) && aligned(p.out, 4);
}

bool launch_memory_attention_prefill(const MemoryAttentionParams& p, PrefillDtype dtype, bool int8_bank,
                                     cudaStream_t stream) {
  if (!prefill_supports(p, int8_bank)) return false;
  // P V takes FlashAttention's one-term rounded P by default (held to the 2x rule; emulated
  // max error 0.12-0.27x the same computation's in bf16/fp16); MEMORY3_PREFILL_P=exact feeds P
  // as two terms (~1.5x the MMA work) and meets the float32-accumulation cap (emulated: 0.92-
  // 0.99x of it) that the rounded P misses by 7-90x. The backward rounds P and dS in every
  // mode, as FlashAttention does.
  const bool exact_p = env_choice("MEMORY3_PREFILL_P", {"rounded", "exact"}, "rounded") == "exact";
  return dtype == PrefillDtype::bf16 ? launch_prefill_bf16(p, int8_bank, exact_p, stream)
                                     : launch_prefill_fp16(p, int8_bank, exact_p, stream);
}

}  // namespace memory3
