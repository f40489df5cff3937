"""A preallocated key-value cache (gpt-fast style): static shapes, so a compiled decode step
and CUDA graphs can capture it, and per-sequence lengths live outside it (`kv_lens`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Post-RoPE keys and values of every layer: k, v [n_layers, max_batch, max_seq, Hkv, D].

    The cache stores no lengths: the caller passes `kv_lens` (int32 [B]) to each forward call,
    and row j of sequence b is valid for j < kv_lens[b]. Index 0 is the first token of the
    sequence (the reference prefix). Memories are not cached: they are handed to every call.
    """

    def __init__(self, n_layers: int, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        for name, value in (("max_batch", max_batch), ("max_seq", max_seq)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_batch, self.max_seq = max_batch, max_seq
        shape = (n_layers, max_batch, max_seq, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer: int, index: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, Hkv, D] at rows index [B, T] of `layer`; return that layer's
        k, v [B, max_seq, Hkv, D] (views of the first B sequences)."""
        B = k.shape[0]
        batch = torch.arange(B, device=index.device)[:, None]
        k_all, v_all = self.k[layer, :B], self.v[layer, :B]
        k_all[batch, index] = k.to(k_all.dtype)
        v_all[batch, index] = v.to(v_all.dtype)
        return k_all, v_all

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
