"""Codebook training for the product-quantization codec (`pq`): batched k-means in torch.

One 256-entry codebook per (KV head, sub-space), the layout quantize_memory and
dequantize_memory read: vectors of one layer's bank [N, Hkv, M, D] are split into
D / sub_dim sub-vectors and each (head, sub-space) gets its own k-means over its N * M
sub-vectors. The one k-means of the project: tests and benchmarks train with it too.
"""
from __future__ import annotations

import torch
from torch import Tensor

PQ_CENTROIDS = 256  # one uint8 code per sub-vector


def train_pq_codebook(
    x: Tensor,
    sub_dim: int = 8,
    iters: int = 20,
    seed: int = 0,
    max_points: int = 65536,
) -> Tensor:
    """x [N, Hkv, M, D] -> codebook float32 [Hkv, D // sub_dim, 256, sub_dim].

    Lloyd's k-means, all (head, sub-space) pairs at once, initialised from distinct data
    points drawn with `seed` (deterministic); an emptied cluster keeps its centroid. At most
    `max_points` vectors per pair are used (a seeded sample). With fewer than 256 vectors the
    codebook repeats them, so every vector still encodes exactly.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [N, Hkv, M, D], got {tuple(x.shape)}")
    N, Hkv, M, D = x.shape
    if sub_dim <= 0 or D % sub_dim:
        raise ValueError(f"pq sub_dim must divide the head dim D={D}, got {sub_dim}")
    nsub = D // sub_dim
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # [Hkv * nsub, P, sub_dim]
    pts = x.float().permute(1, 3, 0, 2).reshape(Hkv, nsub, sub_dim, N * M)
    pts = pts.permute(0, 1, 3, 2).reshape(Hkv * nsub, N * M, sub_dim)
    P = pts.shape[1]
    if P > max_points:
        pick = torch.randperm(P, generator=gen)[:max_points].to(pts.device)
        pts, P = pts[:, pick], max_points
    if P == 0:
        raise ValueError("x holds no vectors to train a pq codebook on")
    if P >= PQ_CENTROIDS:
        init = torch.randperm(P, generator=gen)[:PQ_CENTROIDS]
    else:
        init = torch.arange(PQ_CENTROIDS) % P
    cent = pts[:, init.to(pts.device)].clone()  # [Hkv * nsub, 256, sub_dim]
    for _ in range(iters if P > PQ_CENTROIDS else 0):
        assign = torch.cdist(pts, cent).argmin(dim=-1)  # [pairs, P]
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand_as(pts), pts)
        counts = torch.zeros(cent.shape[:2], device=pts.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=torch.float32)
        )
        filled = counts > 0
        cent = torch.where(filled[..., None], sums / counts.clamp(min=1)[..., None], cent)
    return cent.reshape(Hkv, nsub, PQ_CENTROIDS, sub_dim).contiguous()
