"""The Python face of the memory3 ops (`torch.ops.memory3.*`).

Each op has a typed wrapper that checks its arguments and raises a ValueError naming the
argument, a fake (meta) kernel so `torch.compile(fullgraph=True)` traces models that call
it, and, where it is differentiable, autograd. The kernels live in csrc/ (CPU, CUDA); the
executable spec is memory3.reference; the contracts are in README ("The ops").
"""
from __future__ import annotations

import torch
from torch import Tensor

from memory3 import _extension
from memory3.pq import train_pq_codebook
from memory3.vq import VQSpec, encode_vq, spec_from_meta, train_vq

CODECS = ("int8", "int4", "pq", "vq")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
INDEX_MAX = 2**31 - 1  # the kernels index with int32 (csrc/checks.h kIndexMax)

__all__ = [
    "CODECS",
    "memory_attention",
    "gather_memory",
    "quantize_memory",
    "dequantize_memory",
    "train_pq_codebook",
    "check_range_errors",
]


# ---------------------------------------------------------------------------- checks


def _expect(cond, msg) -> None:
    """Raise ValueError(msg()) unless cond. The message is built only on failure: formatting
    a symbolic size would specialise a graph compiled with dynamic shapes. Symbolic
    conditions become runtime asserts (their message may be built later, so lambdas in
    loops bind their loop variables)."""
    if isinstance(cond, bool):
        if not cond:
            raise ValueError(msg())
    else:
        torch._check(cond, msg)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_bank(mem_k: Tensor, mem_v: Tensor, mem_k_scale: Tensor | None, mem_v_scale: Tensor | None) -> bool:
    """mem_k/mem_v [N, Hkv, M, D], float, or int8 with float32 scales [N, Hkv, M]. Returns int8?"""
    _expect(mem_k.dim() == 4, lambda: f"mem_k must be [N, Hkv, M, D], got {_shape(mem_k)}")
    _expect(_shape(mem_v) == _shape(mem_k), lambda: f"mem_v must have the shape of mem_k {_shape(mem_k)}, got {_shape(mem_v)}")
    _expect(mem_v.dtype == mem_k.dtype, lambda: f"mem_v must have the dtype of mem_k ({mem_k.dtype}), got {mem_v.dtype}")
    _expect(mem_v.device == mem_k.device, lambda: f"mem_v must be on the device of mem_k ({mem_k.device}), got {mem_v.device}")
    _expect(mem_k.shape[0] <= INDEX_MAX, lambda: f"mem_k holds {mem_k.shape[0]} memories, more than 2^31 - 1")
    int8 = mem_k.dtype == torch.int8
    if not int8:
        _expect(mem_k.dtype in FLOAT_DTYPES, lambda: f"mem_k must be a float dtype or int8, got {mem_k.dtype}")
        _expect(
            mem_k_scale is None and mem_v_scale is None,
            lambda: f"mem_k_scale/mem_v_scale are only for an int8 bank, but mem_k is {mem_k.dtype}",
        )
        return False
    for name, s in (("mem_k_scale", mem_k_scale), ("mem_v_scale", mem_v_scale)):
        _expect(s is not None, lambda name=name, s=s: f"an int8 bank needs {name} [N, Hkv, M] (float32)")
        _expect(_shape(s) == _shape(mem_k)[:3], lambda name=name, s=s: f"{name} must be [N, Hkv, M] = {_shape(mem_k)[:3]}, got {_shape(s)}")
        _expect(s.dtype == torch.float32, lambda name=name, s=s: f"{name} must be float32, got {s.dtype}")
        _expect(s.device == mem_k.device, lambda name=name, s=s: f"{name} must be on the device of mem_k ({mem_k.device}), got {s.device}")
    return True


def _check_index_range(x, lo: int, name: str) -> None:
    """An int argument the kernels hold in int32: in [lo, 2^31 - 1], never wrapped."""
    _expect(x >= lo, lambda: f"{name} must be in [{lo}, 2^31 - 1], got {x}")
    _expect(x <= INDEX_MAX, lambda: f"{name} must be in [{lo}, 2^31 - 1], got {x}")


def _check_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, mem_k_scale, mem_v_scale):
    # The order follows csrc/checks.h check_memory_attention, so both faces report the same
    # first error; ids and kv_lens values are checked by the kernels (they read data).
    _check_index_range(chunk_size, 1, "chunk_size")
    _check_index_range(chunk_start, 0, "chunk_start")
    _expect(q.dim() == 4, lambda: f"q must be [B, T, Hq, D], got {_shape(q)}")
    _expect(q.dtype in FLOAT_DTYPES, lambda: f"q must be float32/float64/bfloat16/float16, got {q.dtype}")
    _expect(k.dim() == 4, lambda: f"k must be [B, S, Hkv, D], got {_shape(k)}")
    _expect(_shape(v) == _shape(k), lambda: f"v must have the shape of k {_shape(k)}, got {_shape(v)}")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    _expect(k.shape[0] == B, lambda: f"k must have batch B={B} like q, got {_shape(k)}")
    _expect(k.shape[3] == D, lambda: f"k must have head dim D={D} like q, got {_shape(k)}")
    _expect(Hkv > 0 and Hq % Hkv == 0, lambda: f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    _expect(T <= S, lambda: f"q has T={T} new tokens but k/v hold only S={S} (k/v must include them)")
    for name, t in (("k", k), ("v", v), ("mem_k", mem_k), ("mem_ids", mem_ids)):
        _expect(t.device == q.device, lambda name=name, t=t: f"{name} must be on the device of q ({q.device}), got {t.device}")
    for name, t in (("k", k), ("v", v)):
        _expect(t.dtype == q.dtype, lambda name=name, t=t: f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    int8 = _check_bank(mem_k, mem_v, mem_k_scale, mem_v_scale)
    if not int8:
        _expect(mem_k.dtype == q.dtype, lambda: f"mem_k must have the dtype of q ({q.dtype}) or be int8, got {mem_k.dtype}")
    _expect(mem_k.shape[1] == Hkv, lambda: f"mem_k must have Hkv={Hkv} heads like k, got {_shape(mem_k)}")
    _expect(mem_k.shape[3] == D, lambda: f"mem_k must have head dim D={D} like q, got {_shape(mem_k)}")
    _expect(mem_ids.dim() == 3 and mem_ids.shape[0] == B, lambda: f"mem_ids must be [B={B}, C, R], got {_shape(mem_ids)}")
    _expect(mem_ids.dtype in INDEX_DTYPES, lambda: f"mem_ids must be int32 or int64, got {mem_ids.dtype}")
    sizes = {"B": B, "T": T, "S": S, "Hq": Hq, "D": D, "M": mem_k.shape[2], "C": mem_ids.shape[1], "R": mem_ids.shape[2]}
    for name, n in sizes.items():
        _expect(n <= INDEX_MAX, lambda name=name, n=n: f"memory_attention: {name} = {n} is more than 2^31 - 1")
    if kv_lens is not None:
        _expect(kv_lens.dim() == 1 and kv_lens.shape[0] == B, lambda: f"kv_lens must be [B={B}], got {_shape(kv_lens)}")
        _expect(kv_lens.dtype in INDEX_DTYPES, lambda: f"kv_lens must be int32 or int64, got {kv_lens.dtype}")
        _expect(kv_lens.device == q.device, lambda: f"kv_lens must be on the device of q ({q.device}), got {kv_lens.device}")
    elif not isinstance(S, int) or S > chunk_start:
        need = (S - 1 - chunk_start) // chunk_size + 1
        _expect(
            mem_ids.shape[1] >= need,
            lambda: f"mem_ids has {mem_ids.shape[1]} chunks but the context of {S} tokens "
            f"(chunk_start {chunk_start}, chunk_size {chunk_size}) needs {need}",
        )


def _as_index(t: Tensor | None, name: str) -> Tensor | None:
    """Index tensors go to the op as int32 or int64 (the op checks their values before it
    narrows them to int32); narrower integer dtypes are widened, other dtypes are errors."""
    if t is None or t.dtype in INDEX_DTYPES:
        return t
    _expect(t.dtype in (torch.int16, torch.int8, torch.uint8), lambda: f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int32)


# ---------------------------------------------------------------------------- memory_attention


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    mem_ids: Tensor,
    kv_lens: Tensor | None = None,
    *,
    chunk_size: int = 64,
    chunk_start: int = 0,
    scale: float | None = None,
    mem_k_scale: Tensor | None = None,
    mem_v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over the causal context and the explicit memories of each query's chunk.

    Args:
        q: [B, T, Hq, D] new queries, rotary applied; float32/float64/bfloat16/float16.
        k, v: [B, S, Hkv, D] context keys/values including the T new tokens; dtype of q.
        mem_k, mem_v: [N, Hkv, M, D] one layer's memory bank, dtype of q, or int8 with
            mem_k_scale/mem_v_scale float32 [N, Hkv, M] (dequantized inside the kernel).
            Rows are read by id; the bank may be far larger than what is used.
        mem_ids: int32/int64 [B, C, R]: the R memories of chunk c of sequence b; -1 = empty
            slot. Every id must be in [-1, N) (checked by the kernel: RuntimeError).
        kv_lens: int32/int64 [B] valid context length per sequence, in [0, S] (default S).
        chunk_size: tokens per chunk (64 in the paper), in [1, 2^31 - 1].
        chunk_start: length of the reference prefix, in [0, 2^31 - 1]; queries inside it see
            no memory.
        scale: softmax scale, default D ** -0.5.

    Query i of sequence b sits at p = kv_lens[b] - T + i; it attends, in one softmax, to
    context keys 0..p and, when p >= chunk_start, to the M tokens of every memory
    mem_ids[b, (p - chunk_start) // chunk_size, r] >= 0, with KV head h // (Hq // Hkv).

    Returns:
        out [B, T, Hq, D] (dtype of q) and lse float32 [B, Hq, T], the natural log of the
        softmax denominator (scale included); a query that sees no key gets out 0, lse -inf.
    """
    _extension.require()
    mem_ids = _as_index(mem_ids, "mem_ids")
    kv_lens = _as_index(kv_lens, "kv_lens")
    _check_attention(q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, mem_k_scale, mem_v_scale)
    return torch.ops.memory3.memory_attention(
        q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, scale, mem_k_scale, mem_v_scale
    )


# Fake kernels and setup_context see the op's arguments with trailing defaults left out,
# so their signatures repeat the schema's defaults. The checks have one home per face: the
# wrappers above (traced too) and the C++ launchers (which run on the real tensors of a
# compiled graph); fake kernels keep only what their output shapes need.
def _attention_fake(
    q, k, v, mem_k, mem_v, mem_ids, kv_lens=None, chunk_size=64, chunk_start=0, scale=None, mem_k_scale=None, mem_v_scale=None
):
    _expect(q.dim() == 4, lambda: f"q must be [B, T, Hq, D], got {_shape(q)}")
    B, T, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, T), dtype=torch.float32)


def _attention_backward_fake(
    dout, dlse, q, k, v, mem_k, mem_v, mem_ids, out, lse, kv_lens, chunk_size, chunk_start, scale,
    mem_k_scale, mem_v_scale, mem_grad,
):
    dmem_shape = mem_k.shape if mem_grad else (0,)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty(dmem_shape, dtype=mem_k.dtype if mem_grad else q.dtype),
        q.new_empty(dmem_shape, dtype=mem_k.dtype if mem_grad else q.dtype),
    )


def _attention_setup_context(ctx, inputs, output):
    defaults = (None, 64, 0, None, None, None)  # kv_lens .. mem_v_scale
    q, k, v, mem_k, mem_v, mem_ids, kv_lens, chunk_size, chunk_start, scale, mem_k_scale, mem_v_scale = (
        tuple(inputs) + defaults[len(inputs) - 6 :]
    )
    out, lse = output
    ctx.save_for_backward(q, k, v, mem_k, mem_v, mem_ids, kv_lens, out, lse, mem_k_scale, mem_v_scale)
    ctx.chunk_size, ctx.chunk_start = chunk_size, chunk_start
    ctx.scale = q.shape[-1] ** -0.5 if scale is None else scale


def _attention_backward(ctx, dout, dlse):
    q, k, v, mem_k, mem_v, mem_ids, kv_lens, out, lse, mem_k_scale, mem_v_scale = ctx.saved_tensors
    # One flag per input the op was called with (trailing defaults may be left out).
    needs = ctx.needs_input_grad
    if any(needs[10:12]):
        raise NotImplementedError("memory_attention: no gradient for mem_k_scale/mem_v_scale (int8 banks are frozen)")
    mem_grad = bool(needs[3] or needs[4])
    grads = torch.ops.memory3.memory_attention_backward(
        dout, dlse, q, k, v, mem_k, mem_v, mem_ids, out, lse, kv_lens, ctx.chunk_size, ctx.chunk_start,
        ctx.scale, mem_k_scale, mem_v_scale, mem_grad,
    )
    return tuple(g if need else None for g, need in zip(grads, needs[:5])) + (None,) * (len(needs) - 5)


# ---------------------------------------------------------------------------- gather_memory


def _check_gather(mem_k, mem_v, ids, out_dtype, mem_k_scale, mem_v_scale):
    _check_bank(mem_k, mem_v, mem_k_scale, mem_v_scale)
    _expect(ids.dtype in INDEX_DTYPES, lambda: f"ids must be int32 or int64, got {ids.dtype}")
    _expect(out_dtype is None or out_dtype in FLOAT_DTYPES, lambda: f"out_dtype must be a float dtype, got {out_dtype}")


def _gather_out_dtype(mem_k: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.bfloat16 if mem_k.dtype == torch.int8 else mem_k.dtype


def gather_memory(
    mem_k: Tensor,
    mem_v: Tensor,
    ids: Tensor,
    out_dtype: torch.dtype | None = None,
    mem_k_scale: Tensor | None = None,
    mem_v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows `ids` of a bank as dense tensors on the device of ids.

    Args:
        mem_k, mem_v: [N, Hkv, M, D] bank, float, or int8 with float32 scales [N, Hkv, M].
        ids: int32/int64, any shape; -1 gives zero rows.
        out_dtype: default the bank's dtype, or bfloat16 for an int8 bank.

    Returns:
        k, v [*ids.shape, Hkv, M, D]. Differentiable with respect to a float bank (gradients
        of repeated ids add up).
    """
    _extension.require()
    _check_gather(mem_k, mem_v, ids, out_dtype, mem_k_scale, mem_v_scale)
    return torch.ops.memory3.gather_memory(mem_k, mem_v, ids, out_dtype, mem_k_scale, mem_v_scale)


def _gather_fake(mem_k, mem_v, ids, out_dtype=None, mem_k_scale=None, mem_v_scale=None):
    _expect(mem_k.dim() == 4, lambda: f"mem_k must be [N, Hkv, M, D], got {_shape(mem_k)}")
    shape = (*ids.shape, *mem_k.shape[1:])
    dtype = _gather_out_dtype(mem_k, out_dtype)
    return ids.new_empty(shape, dtype=dtype), ids.new_empty(shape, dtype=dtype)


def _gather_setup_context(ctx, inputs, output):
    mem_k, ids = inputs[0], inputs[2]
    ctx.save_for_backward(ids)
    ctx.bank_shape, ctx.bank_dtype, ctx.bank_device = mem_k.shape, mem_k.dtype, mem_k.device


def _gather_backward(ctx, dk, dv):
    (ids,) = ctx.saved_tensors
    flat = ids.reshape(-1).to(ctx.bank_device).long()
    valid = flat >= 0

    def scatter(g: Tensor) -> Tensor:
        g = g.reshape(flat.shape[0], *ctx.bank_shape[1:]).to(ctx.bank_device, ctx.bank_dtype)
        g = torch.where(valid[:, None, None, None], g, torch.zeros_like(g))
        zeros = torch.zeros(ctx.bank_shape, dtype=ctx.bank_dtype, device=ctx.bank_device)
        return zeros.index_add(0, flat.clamp(min=0), g)

    needs = ctx.needs_input_grad
    return (scatter(dk) if needs[0] else None, scatter(dv) if needs[1] else None) + (None,) * (len(needs) - 2)


# ---------------------------------------------------------------------------- codecs


def _check_codec(codec: str) -> None:
    _expect(codec in CODECS, lambda: f"codec must be one of {', '.join(CODECS)}; got {codec!r}")


def _check_quantize(x: Tensor, codec: str, codebook: Tensor | None) -> None:
    _check_codec(codec)
    _expect(x.dim() == 4, lambda: f"x must be [N, Hkv, M, D], got {_shape(x)}")
    _expect(x.dtype in FLOAT_DTYPES, lambda: f"x must be a float tensor, got {x.dtype}")
    D = x.shape[3]
    if codec == "int4":
        _expect(D % 2 == 0, lambda: f"int4 packs two values per byte: the head dim D must be even, got {D}")
    if codec == "pq":
        _expect(codebook is not None, lambda: "pq needs a codebook [Hkv, D / d_sub, 256, d_sub] (train_pq_codebook)")
        _expect(codebook.dim() == 4, lambda: f"codebook must be [Hkv, D / d_sub, 256, d_sub], got {_shape(codebook)}")
        _expect(codebook.dtype == torch.float32, lambda: f"codebook must be float32, got {codebook.dtype}")
        _expect(
            codebook.shape[0] == x.shape[1] and codebook.shape[1] * codebook.shape[3] == D and codebook.shape[2] == 256,
            lambda: f"codebook {_shape(codebook)} does not fit x {_shape(x)}: want [Hkv={x.shape[1]}, D/d_sub, 256, d_sub] "
            f"with (D/d_sub) * d_sub = {D}",
        )
    if codec == "vq":
        _check_vq_meta(codebook, D)


def _check_vq_meta(meta: Tensor, D) -> None:
    """Shapes only (fake tensors have no data); the header is read by _check_vq_header."""
    _expect(meta is not None, lambda: "vq needs its meta [1 + D + 2^coarse_bits + 2^pq_bits, D] (memory3.vq.train_vq)")
    _expect(meta.dim() == 2 and meta.shape[1] == D, lambda: f"vq meta must be [1 + D + 2^coarse_bits + 2^pq_bits, D={D}], got {_shape(meta)}")
    _expect(meta.dtype == torch.float32, lambda: f"vq meta must be float32, got {meta.dtype}")


def _check_vq_header(codes: Tensor, meta: Tensor) -> None:
    """Eager calls read vq meta's header row (memory3.vq) and match the code size to it."""
    if torch.compiler.is_compiling():
        return
    spec = spec_from_meta(meta)
    _expect(codes.shape[3] == spec.code_size, lambda: f"codes must be [N, Hkv, M, {spec.code_size}] for {spec.factory}, got {_shape(codes)}")


def quantize_memory(
    x: Tensor,
    codec: str,
    *,
    codebook: Tensor | None = None,
    pq_sub_dim: int = 8,
    pq_iters: int = 20,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Compress one layer's keys or values, x [N, Hkv, M, D] float, with a memory codec.

    Returns (codes, meta):
        int8: codes int8 [N, Hkv, M, D]; meta = scale float32 [N, Hkv, M] (symmetric).
        int4: codes uint8 [N, Hkv, M, D/2]; meta float32 [N, Hkv, M, ceil(D/32), 2] holding
              (scale, zero) per group of 32 along D. D must be even.
        pq:   codes uint8 [N, Hkv, M, D/d_sub]; meta = codebook [Hkv, D/d_sub, 256, d_sub].
              Without `codebook`, one is trained on x by k-means (pq_sub_dim, pq_iters, seed).
        vq:   the paper's FAISS OPQ,Residual2x14,PQ8x10 (memory3.vq): codes uint8
              [N, Hkv, M, 14], encoded by FAISS's sa_encode (not a compiled op); meta =
              `codebook`, the quantizer float32 [1 + D + 2^14 + 2^10, D]. Without it, one is
              trained on x with FAISS (needs N * Hkv * M >= 16384 vectors). D % 8 == 0.
    """
    _extension.require()
    _check_codec(codec)
    if codec == "vq":
        _expect(x.dim() == 4, lambda: f"x must be [N, Hkv, M, D], got {_shape(x)}")
        meta = codebook if codebook is not None else train_vq(x, VQSpec(x.shape[3]), seed=seed)
        _check_quantize(x, codec, meta)
        return encode_vq(x, meta), meta
    if codec == "pq" and codebook is None:
        codebook = train_pq_codebook(x, sub_dim=pq_sub_dim, iters=pq_iters, seed=seed)
    _check_quantize(x, codec, codebook)
    return torch.ops.memory3.quantize_memory(x, codec, codebook)


def _quantize_fake(x, codec, codebook=None):
    _check_codec(codec)
    _expect(x.dim() == 4, lambda: f"x must be [N, Hkv, M, D], got {_shape(x)}")
    _expect(codec != "pq" or codebook is not None, lambda: "pq needs a codebook [Hkv, D / d_sub, 256, d_sub]")
    N, Hkv, M, D = x.shape
    if codec == "int8":
        return x.new_empty((N, Hkv, M, D), dtype=torch.int8), x.new_empty((N, Hkv, M), dtype=torch.float32)
    if codec == "int4":
        groups = (D + 31) // 32
        return x.new_empty((N, Hkv, M, D // 2), dtype=torch.uint8), x.new_empty((N, Hkv, M, groups, 2), dtype=torch.float32)
    return x.new_empty((N, Hkv, M, codebook.shape[1]), dtype=torch.uint8), torch.empty_like(codebook)


def _check_dequantize(codes: Tensor, meta: Tensor, codec: str, ids: Tensor | None, out_dtype) -> None:
    _check_codec(codec)
    _expect(codes.dim() == 4, lambda: f"codes must be [N, Hkv, M, *], got {_shape(codes)}")
    want = {"int8": torch.int8, "int4": torch.uint8, "pq": torch.uint8, "vq": torch.uint8}[codec]
    _expect(codes.dtype == want, lambda: f"{codec} codes must be {want}, got {codes.dtype}")
    _expect(meta.dtype == torch.float32, lambda: f"meta must be float32, got {meta.dtype}")
    if codec == "int8":
        _expect(_shape(meta) == _shape(codes)[:3], lambda: f"int8 meta must be [N, Hkv, M] = {_shape(codes)[:3]}, got {_shape(meta)}")
    elif codec == "int4":
        groups = (2 * codes.shape[3] + 31) // 32
        want_meta = (*_shape(codes)[:3], groups, 2)
        _expect(_shape(meta) == want_meta, lambda: f"int4 meta must be [N, Hkv, M, ceil(D/32), 2] = {want_meta}, got {_shape(meta)}")
    elif codec == "vq":
        _expect(meta.dim() == 2, lambda: f"vq meta must be [1 + D + 2^coarse_bits + 2^pq_bits, D], got {_shape(meta)}")
    else:
        _expect(
            meta.dim() == 4 and meta.shape[0] == codes.shape[1] and meta.shape[1] == codes.shape[3] and meta.shape[2] == 256,
            lambda: f"pq meta must be the codebook [Hkv={codes.shape[1]}, {codes.shape[3]}, 256, d_sub], got {_shape(meta)}",
        )
    if ids is not None:
        _expect(ids.dtype in INDEX_DTYPES, lambda: f"ids must be int32 or int64, got {ids.dtype}")
    _expect(out_dtype is None or out_dtype in FLOAT_DTYPES, lambda: f"out_dtype must be a float dtype, got {out_dtype}")


def dequantize_memory(
    codes: Tensor,
    meta: Tensor,
    codec: str,
    ids: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Decompress codes from quantize_memory: [N, Hkv, M, D], or with ids (int32/int64, any
    shape, -1 = zero row) the rows ids only, [*ids.shape, Hkv, M, D] (gather and decode in
    one pass). vq: our kernel, checked against FAISS's sa_decode (tests/test_vq.py)."""
    _extension.require()
    _check_dequantize(codes, meta, codec, ids, out_dtype)
    if codec == "vq":
        _check_vq_header(codes, meta)
    return torch.ops.memory3.dequantize_memory(codes, meta, codec, ids, out_dtype)


def _dequantize_fake(codes, meta, codec, ids=None, out_dtype=None):
    _check_codec(codec)
    _expect(codes.dim() == 4, lambda: f"codes must be [N, Hkv, M, *], got {_shape(codes)}")
    N, Hkv, M, W = codes.shape
    D = {"int8": W, "int4": 2 * W, "pq": W * meta.shape[-1], "vq": meta.shape[-1]}[codec]
    lead = tuple(ids.shape) if ids is not None else (N,)
    return codes.new_empty((*lead, Hkv, M, D), dtype=out_dtype or torch.bfloat16)


# ---------------------------------------------------------------------------- range checks


def check_range_errors() -> None:
    """Raise the first out-of-range id / kv_lens value a CUDA kernel recorded since the last
    check (RuntimeError, the eager message), and clear it. CUDA kernels check ids and lengths
    on the device; an eager call raises at once, but a call captured in a CUDA graph (or run
    with MEMORY3_RANGE_CHECK=deferred) cannot sync, so it only records: call this after the
    replay. A bad value never reads outside the bank either way. No-op without CUDA kernels."""
    op = getattr(torch.ops.memory3, "check_range_errors", None) if _extension.available() else None
    if op is not None and torch.cuda.is_available():
        op()


# ---------------------------------------------------------------------------- registration


def _register() -> None:
    reg = torch.library.register_fake
    reg("memory3::memory_attention")(_attention_fake)
    reg("memory3::memory_attention_backward")(_attention_backward_fake)
    reg("memory3::gather_memory")(_gather_fake)
    reg("memory3::quantize_memory")(_quantize_fake)
    reg("memory3::dequantize_memory")(_dequantize_fake)
    torch.library.register_autograd(
        "memory3::memory_attention", _attention_backward, setup_context=_attention_setup_context
    )
    torch.library.register_autograd("memory3::gather_memory", _gather_backward, setup_context=_gather_setup_context)


if _extension.available():
    _register()
