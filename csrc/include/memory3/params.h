// The parameters of every memory3 kernel, one struct per call, shared by the CPU and CUDA
// backends: plain pointers, sizes, and strides in elements. Torch-free and free of compiler
// vector extensions, so the host compiler and nvcc read the same layout (the CUDA launchers
// pass these structs to kernels by value). Layouts are given per field.
//
// Index types. Sizes, ids, lengths and chunk arguments are int32 in the kernels: the
// launchers check every one against 2^31 - 1 before narrowing (csrc/checks.h), never wrap,
// and kernels form products of them in int64 (offsets, chunk bounds).
//
// Data range checks (ids in [-1, N), kv_lens in [0, S]).
//   CPU: the launchers read ids and kv_lens on the host before any kernel runs and raise a
//   RuntimeError naming the argument and the first offender.
//   CUDA (planned with the CUDA kernels): reading them on the host would cost a copy and a
//   stream sync per call, which CUDA graph capture forbids. So the checks move into the
//   kernels, behind a switch:
//     - `int64_t* range_error` in MemoryAttentionParams, GatherParams and DequantizeParams
//       points at 4 device words per device (csrc/cuda/range_check.cu: zero at load, zeroed
//       again whenever they are read). A kernel that reads an id or a length outside its
//       range treats it as an empty slot (-1) or an empty sequence, never dereferences it,
//       and records the first offender with atomicCAS (memory3/cuda_common.cuh: code and
//       flat index + 1, value, bound). Null on the CPU.
//     - the switch is the op's `check` mode, decided by the launcher per call: "sync"
//       (default in eager mode) copies the word back after the kernel and raises the same
//       RuntimeError as the CPU; "deferred" is forced while the current stream is capturing
//       a CUDA graph (cudaStreamIsCapturing), and can be chosen for eager hot loops with
//       MEMORY3_RANGE_CHECK=deferred: nothing syncs, the word persists, and
//       memory3.ops.check_range_errors() reads it and raises after the graph's replay.
//     Either way a bad id never reads outside the bank.
#pragma once

#include <cstdint>

namespace memory3 {

// ---------------------------------------------------------------- memory_attention

// One memory_attention call, forward. The head dim of every tensor is contiguous.
struct MemoryAttentionParams {
  const void* q;  // [B, T, Hq, D], dtype T (float32/float64/bfloat16/float16)
  int64_t q_stride_b, q_stride_t, q_stride_h;
  const void* k;  // [B, S, Hkv, D], dtype T
  int64_t k_stride_b, k_stride_s, k_stride_h;
  const void* v;  // [B, S, Hkv, D], dtype T
  int64_t v_stride_b, v_stride_s, v_stride_h;
  const void* mem_k;  // [N, Hkv, M, D], dtype T, or int8 with mem_k_scale
  int64_t mk_stride_n, mk_stride_h, mk_stride_m;
  const void* mem_v;  // [N, Hkv, M, D], like mem_k
  int64_t mv_stride_n, mv_stride_h, mv_stride_m;
  const float* mem_k_scale;  // [N, Hkv, M] contiguous; null unless the bank is int8
  const float* mem_v_scale;  // [N, Hkv, M] contiguous; null unless the bank is int8
  const int32_t* mem_ids;    // [B, C, R] contiguous, each in [-1, N); -1 = empty slot
  const int32_t* kv_lens;    // [B] contiguous, each in [0, S]; null = all S
  void* out;                 // [B, T, Hq, D] contiguous, dtype T (read by the backward)
  float* lse;                // [B, Hq, T] contiguous: written by the forward, read by the backward
  int B, T, S, Hq, Hkv, D, N, M, C, R;
  int chunk_size, chunk_start;  // chunk_size >= 1, chunk_start >= 0
  double scale;                 // softmax scale (default D^-0.5, chosen by the launcher)
  int64_t* range_error;         // CUDA: device range-error words (see above); null on the CPU
};

// One memory_attention call, backward: the forward's parameters (out and lse as the forward
// wrote them) plus the gradients, as FlashAttention's Flash_bwd_params extends its forward
// struct. Acc is the accumulation type: float, or double for float64 inputs.
struct MemoryAttentionBwdParams : MemoryAttentionParams {
  const void* dout;   // [B, T, Hq, D] contiguous, dtype T
  const float* dlse;  // [B, Hq, T] contiguous, or null when lse got no gradient
  void* dq;           // [B, T, Hq, D] contiguous, dtype T
  void* dk;           // [B, S, Hkv, D] contiguous, dtype T, zero-filled by the launcher
  void* dv;           // [B, S, Hkv, D] contiguous, dtype T, zero-filled by the launcher
  void* dmem_k;       // [N, Hkv, M, D] contiguous Acc, zero-filled; repeated ids add up.
  void* dmem_v;       //   Both null when the bank gets no gradient (int8 banks never do).
};

// ---------------------------------------------------------------- gather_memory

// One side (keys or values) of a bank.
struct BankRows {
  const void* data;        // [N, Hkv, M, D], (Hkv, M, D) contiguous; any stride between memories
  int64_t stride_n;        // elements between memories
  const float* scale;      // [N, Hkv, M], (Hkv, M) contiguous; null unless the bank is int8
  int64_t scale_stride_n;  // elements between memories of scale
};

// One gather_memory call: out_k/out_v[r] = bank[ids[r]], or zeros where ids[r] == -1.
struct GatherParams {
  BankRows k, v;
  const int64_t* ids;  // [R] contiguous, each in [-1, N)
  void* out_k;         // [R, Hkv, M, D] contiguous
  void* out_v;         // [R, Hkv, M, D] contiguous
  int64_t vectors;     // Hkv * M: vectors of D per row
  int64_t D;
  int64_t* range_error;  // CUDA: device range-error words; null on the CPU
};

// ---------------------------------------------------------------- memory codecs

enum class Codec { int8, int4, pq };

constexpr int kInt4Group = 32;     // int4: values per (scale, zero) group along D
constexpr int kPqCentroids = 256;  // pq: centroids per (head, sub-space), one uint8 code

// One quantize_memory call over R = N * Hkv * M vectors of D values.
struct QuantizeParams {
  const void* x;          // [R, D] contiguous, float32/float64/bfloat16/float16
  void* codes;            // int8 [R, D] | uint8 [R, D / 2] | uint8 [R, D / dsub], contiguous
  float* meta;            // int8: scale [R]; int4: (scale, zero) [R, ceil(D / 32), 2]; pq: unused
  const float* codebook;  // pq: [Hkv, D / dsub, 256, dsub] contiguous
  int64_t N, Hkv, M;      // vector r is (memory, head, token) = (r / (Hkv M), r / M % Hkv, r % M)
  int D, dsub;
};

// One dequantize_memory call: out[r] = decode(memory ids[r]), or zeros where ids[r] == -1.
struct DequantizeParams {
  const void* codes;      // [N, Hkv, M, Dc], (Hkv, M, Dc) contiguous; Dc = D | D / 2 | D / dsub
  int64_t codes_stride_n;
  const float* meta;      // int8 scale [N, Hkv, M] | int4 [N, Hkv, M, ceil(D / 32), 2], inner dims
  int64_t meta_stride_n;  //   contiguous; pq: null
  const void* codebook;   // pq: [Hkv, D / dsub, 256, dsub] contiguous, in the output dtype
  const int64_t* ids;     // [R] contiguous, each in [-1, N); null: row r is memory r
  void* out;              // [R, Hkv, M, D] contiguous
  int64_t Hkv, M;
  int D, dsub;
  int64_t* range_error;   // CUDA: device range-error words; null on the CPU
};

}  // namespace memory3
