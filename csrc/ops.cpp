// The memory3 torch library: every op's schema, in one place. Backends register their
// kernels in csrc/cpu/ and csrc/cuda/; fake (meta) kernels and autograd live in
// python/memory3/ops.py; kernel parameters in include/memory3/params.h. Contracts: README,
// "The ops", and python/memory3/reference.py (the executable spec).
#include <torch/library.h>

TORCH_LIBRARY(memory3, m) {
  // out [B, T, Hq, D] (dtype of q), lse [B, Hq, T] float32 (natural log, scale included).
  // mem_ids [B, C, R] and kv_lens [B] are int32 or int64, checked before narrowing to int32.
  m.def(
      "memory_attention(Tensor q, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, Tensor mem_ids, "
      "Tensor? kv_lens=None, int chunk_size=64, int chunk_start=0, float? scale=None, "
      "Tensor? mem_k_scale=None, Tensor? mem_v_scale=None) -> (Tensor out, Tensor lse)");
  // Gradients of memory_attention from out, lse and their gradients. dmem_k/dmem_v are
  // [N, Hkv, M, D] when mem_grad is true, else empty; repeated ids accumulate.
  m.def(
      "memory_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, "
      "Tensor mem_k, Tensor mem_v, Tensor mem_ids, Tensor out, Tensor lse, Tensor? kv_lens, "
      "int chunk_size, int chunk_start, float scale, Tensor? mem_k_scale, Tensor? mem_v_scale, "
      "bool mem_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmem_k, Tensor dmem_v)");
  // Rows `ids` of a bank, dense, on the device of ids; -1 gives zero rows. Dequantizes an
  // int8 bank (out_dtype defaults to the bank's dtype, or bfloat16 for int8).
  m.def(
      "gather_memory(Tensor mem_k, Tensor mem_v, Tensor ids, ScalarType? out_dtype=None, "
      "Tensor? mem_k_scale=None, Tensor? mem_v_scale=None) -> (Tensor k, Tensor v)");
  // codec: int8 | int4 | pq. pq needs its codebook [Hkv, D / d_sub, 256, d_sub] (trained by
  // memory3.ops.train_pq_codebook); meta is the scale (int8), scale+zero (int4) or codebook.
  m.def("quantize_memory(Tensor x, str codec, Tensor? codebook=None) -> (Tensor codes, Tensor meta)");
  // Inverse of quantize_memory; with ids, gathers rows first (-1 gives zero rows). Also decodes
  // codec vq (FAISS OPQ,Residual2x14,PQ8x10, encoded in Python): meta float32
  // [1 + D + 2^coarse_bits + 2^pq_bits, D], layout in python/memory3/vq.py.
  m.def(
      "dequantize_memory(Tensor codes, Tensor meta, str codec, Tensor? ids=None, "
      "ScalarType? out_dtype=None) -> Tensor");
}
