"""Pure-PyTorch reference of every memory3 op: the executable spec of the ops (README, "The ops").

Written for clarity, not speed: attention materialises the full score matrix. Every backend
(CPU, CUDA) is tested against these functions; attention here is differentiable by autograd,
which gives the reference gradients too.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT4_GROUP = 32  # int4: values per (scale, zero) group along D


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dequantize_rows(x: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """A float bank as dtype, or an int8 bank times its per-(memory, head, token) scale."""
    if scale is None:
        return x.to(dtype)
    return x.to(dtype) * scale.to(dtype).unsqueeze(-1)


def memory_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mem_k: Tensor,
    mem_v: Tensor,
    mem_ids: Tensor,
    kv_lens: Tensor | None = None,
    chunk_size: int = 64,
    chunk_start: int = 0,
    scale: float | None = None,
    mem_k_scale: Tensor | None = None,
    mem_v_scale: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Memory-aware attention, as one masked softmax over [memories of the chunk | context].

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; mem_k, mem_v [N, Hkv, M, D] (or int8 with scales
    [N, Hkv, M]); mem_ids int [B, C, R] (-1 = empty slot); kv_lens int [B] or None (= S).
    Query i of sequence b sits at p = kv_lens[b] - T + i, sees context keys 0..p and, when
    p >= chunk_start, the memories mem_ids[b, (p - chunk_start) // chunk_size, :].
    Returns out [B, T, Hq, D] (dtype of q) and lse [B, Hq, T] float32 (natural log; -inf for
    a query that sees nothing, whose out is 0).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    N, _, M, _ = mem_k.shape
    C, R = mem_ids.shape[1], mem_ids.shape[2]
    G = Hq // Hkv
    dt = compute_dtype or _compute_dtype(q.dtype)
    scale = D**-0.5 if scale is None else scale
    dev = q.device

    lens = torch.full((B,), S, device=dev) if kv_lens is None else kv_lens.to(dev).long()
    pos = lens[:, None] - T + torch.arange(T, device=dev)  # [B, T]

    qf = q.to(dt).transpose(1, 2)  # [B, Hq, T, D]
    kf = k.to(dt).repeat_interleave(G, dim=2).transpose(1, 2)  # [B, Hq, S, D]
    vf = v.to(dt).repeat_interleave(G, dim=2).transpose(1, 2)
    ctx_mask = torch.arange(S, device=dev)[None, None, :] <= pos[:, :, None]  # [B, T, S]

    # Memories of every slot, laid out as columns (chunk, slot, token).
    ids = mem_ids.long()
    valid = ids >= 0
    safe = ids.clamp(min=0)
    mk = _dequantize_rows(mem_k, mem_k_scale, dt)[safe]  # [B, C, R, Hkv, M, D]
    mv = _dequantize_rows(mem_v, mem_v_scale, dt)[safe]
    mk = mk.permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D).repeat_interleave(G, dim=1)
    mv = mv.permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D).repeat_interleave(G, dim=1)
    col_chunk = torch.arange(C, device=dev).repeat_interleave(R * M)  # [C*R*M]
    col_valid = valid.repeat_interleave(M, dim=2).reshape(B, C * R * M)
    q_chunk = torch.div(pos - chunk_start, chunk_size, rounding_mode="floor")  # [B, T]
    mem_mask = (
        (pos >= chunk_start)[:, :, None]
        & (q_chunk[:, :, None] == col_chunk[None, None, :])
        & col_valid[:, None, :]
    )  # [B, T, C*R*M]

    scores = torch.cat([qf @ mk.transpose(-1, -2), qf @ kf.transpose(-1, -2)], dim=-1) * scale
    mask = torch.cat([mem_mask, ctx_mask], dim=-1)[:, None]  # [B, 1, T, C*R*M + S]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, T]
    seen = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(seen, lse, torch.zeros_like(lse))[..., None])
    out = p @ torch.cat([mv, vf], dim=-2)  # [B, Hq, T, D]
    return out.transpose(1, 2).to(q.dtype), lse.float()


def gather_memory_ref(
    mem_k: Tensor,
    mem_v: Tensor,
    ids: Tensor,
    out_dtype: torch.dtype | None = None,
    mem_k_scale: Tensor | None = None,
    mem_v_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows `ids` (any shape, -1 = zero row) of a bank [N, Hkv, M, D]: k, v [*ids, Hkv, M, D]
    on the device of ids. int8 banks are dequantized; out_dtype defaults to the bank's dtype,
    or bfloat16 for an int8 bank."""
    if out_dtype is None:
        out_dtype = torch.bfloat16 if mem_k.dtype == torch.int8 else mem_k.dtype
    flat = ids.reshape(-1).long().to(mem_k.device)
    valid = (flat >= 0)[:, None, None, None]
    safe = flat.clamp(min=0)

    def rows(x: Tensor, s: Tensor | None) -> Tensor:
        r = _dequantize_rows(x[safe], None if s is None else s[safe], torch.float64 if out_dtype == torch.float64 else torch.float32)
        r = torch.where(valid, r, torch.zeros_like(r)).to(out_dtype)
        return r.reshape(*ids.shape, *x.shape[1:]).to(ids.device)

    return rows(mem_k, mem_k_scale), rows(mem_v, mem_v_scale)


# ---------------------------------------------------------------------------- codecs


def quantize_memory_ref(x: Tensor, codec: str, codebook: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x [N, Hkv, M, D] float -> (codes, meta).

    int8: codes int8 [N, Hkv, M, D], meta = scale float32 [N, Hkv, M]; x ~ code * scale,
          scale = max|x| / 127, code = round(x / scale) (half to even).
    int4: codes uint8 [N, Hkv, M, D/2] (element 2j in the low nibble), meta float32
          [N, Hkv, M, ceil(D/32), 2] = (scale, zero) per group of 32 along D; x ~ code * scale
          + zero, zero = group min, scale = (max - min) / 15, code = round((x - zero) / scale).
    pq:   codes uint8 [N, Hkv, M, D / d_sub], the nearest of 256 centroids per sub-vector
          (squared L2, first index on ties); meta = codebook [Hkv, D / d_sub, 256, d_sub].
    vq:   FAISS's sa_encode with the quantizer of meta = codebook (memory3.vq: FAISS is the
          spec of the paper's encoder); codes uint8 [N, Hkv, M, code_size].
    """
    if codec == "vq":
        from memory3.vq import encode_vq

        return encode_vq(x, codebook), codebook
    xf = x.float()
    if codec == "int8":
        amax = xf.abs().amax(dim=-1)
        scale = amax / 127.0
        codes = torch.where(scale[..., None] > 0, xf / scale[..., None], torch.zeros_like(xf))
        return codes.round().clamp(-127, 127).to(torch.int8), scale
    if codec == "int4":
        D = x.shape[-1]
        groups = _int4_groups(xf)  # [N, Hkv, M, G, 32] padded with the group's first value
        mn, mx = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = (mx - mn) / 15.0
        codes = torch.where(scale[..., None] > 0, (groups - mn[..., None]) / scale[..., None], torch.zeros_like(groups))
        codes = codes.round().clamp(0, 15).to(torch.uint8).flatten(-2)[..., :D]
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return packed, torch.stack([scale, mn], dim=-1)
    if codec == "pq":
        assert codebook is not None, "pq needs a codebook"
        Hkv, nsub, K, dsub = codebook.shape
        sub = xf.reshape(*x.shape[:-1], nsub, dsub)  # [N, Hkv, M, nsub, dsub]
        cb = codebook.float()[None, :, None]  # [1, Hkv, 1, nsub, K, dsub]
        dist = ((sub[..., None, :] - cb) ** 2).sum(-1)  # [N, Hkv, M, nsub, K]
        return dist.argmin(dim=-1).to(torch.uint8), codebook
    raise ValueError(f"codec must be one of int8, int4, pq, vq; got {codec!r}")


def _int4_groups(xf: Tensor) -> Tensor:
    """[..., D] -> [..., ceil(D/32), 32]; a short last group is padded with its own first
    value, which changes neither its min nor its max."""
    D = xf.shape[-1]
    G = -(-D // INT4_GROUP)
    pad = G * INT4_GROUP - D
    if pad:
        fill = xf[..., (G - 1) * INT4_GROUP : (G - 1) * INT4_GROUP + 1].expand(*xf.shape[:-1], pad)
        xf = torch.cat([xf, fill], dim=-1)
    return xf.reshape(*xf.shape[:-1], G, INT4_GROUP)


def dequantize_memory_ref(
    codes: Tensor,
    meta: Tensor,
    codec: str,
    ids: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Inverse of quantize_memory_ref; with ids (any shape, -1 = zero row), the rows ids
    only: [*ids, Hkv, M, D]. out_dtype defaults to bfloat16."""
    out_dtype = out_dtype or torch.bfloat16
    rows_meta = codec in ("int8", "int4")  # pq's and vq's meta is shared by all rows
    if ids is not None:
        flat = ids.reshape(-1).long()
        safe = flat.clamp(min=0)
        x = dequantize_memory_ref(codes[safe], meta[safe] if rows_meta else meta, codec, None, torch.float32)
        x = torch.where((flat >= 0)[:, None, None, None], x, torch.zeros_like(x))
        return x.reshape(*ids.shape, *x.shape[1:]).to(out_dtype)
    if codec == "int8":
        return (codes.float() * meta.float()[..., None]).to(out_dtype)
    if codec == "int4":
        D = codes.shape[-1] * 2
        vals = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).float()  # [..., D]
        g = torch.arange(D, device=codes.device) // INT4_GROUP
        return (vals * meta[..., g, 0] + meta[..., g, 1]).to(out_dtype)
    if codec == "pq":
        Hkv, nsub, K, dsub = meta.shape
        h = torch.arange(Hkv, device=codes.device)[:, None, None]  # [Hkv, 1, 1]
        s = torch.arange(nsub, device=codes.device)  # [nsub]
        x = meta.float()[h, s, codes.long()]  # [N, Hkv, M, nsub, dsub]
        return x.flatten(-2).to(out_dtype)
    if codec == "vq":
        flat = codes.reshape(-1, codes.shape[-1])
        return _dequantize_vq(flat, meta).reshape(*codes.shape[:-1], meta.shape[1]).to(out_dtype)
    raise ValueError(f"codec must be one of int8, int4, pq, vq; got {codec!r}")


def _dequantize_vq(codes: Tensor, meta: Tensor) -> Tensor:
    """vq codes [R, code_size] -> float32 [R, D] (layout: memory3.vq): x = A^T (coarse + fine).
    Indices keep their low bits, as the kernels do (FAISS refuses list numbers >= nlist)."""
    D = meta.shape[1]
    coarse_bits, pq_m, pq_bits = (int(v) for v in meta[0, 1:4].tolist())
    R, dev = codes.shape[0], codes.device
    c = codes.long()
    nb1 = (2 * coarse_bits + 7) // 8
    list_no = sum(c[:, b] << (8 * b) for b in range(nb1))  # little-endian
    mask = (1 << coarse_bits) - 1
    i0, i1 = list_no & mask, (list_no >> coarse_bits) & mask
    bits = ((c[:, nb1:, None] >> torch.arange(8, device=dev)) & 1).reshape(R, -1)  # LSB first
    j = (bits[:, : pq_m * pq_bits].reshape(R, pq_m, pq_bits) << torch.arange(pq_bits, device=dev)).sum(-1)
    coarse = meta[1 + D : 1 + D + (1 << coarse_bits)].float()
    fine = meta[1 + D + (1 << coarse_bits) :].float()
    half, cols = D // 2, torch.arange(D, device=dev)
    y = torch.cat([coarse[i0, :half], coarse[i1, half:]], dim=-1) + fine[j[:, cols // (D // pq_m)], cols]
    return y @ meta[1 : 1 + D].float()
