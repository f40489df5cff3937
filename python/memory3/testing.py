"""Random inputs for tests and benchmarks: memory_attention calls drawn fresh per case."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


@dataclass
class AttentionCase:
    """One memory_attention call. kv_lens=None means every sequence fills S."""

    B: int = 2
    T: int = 1
    S: int = 97
    Hq: int = 8
    Hkv: int = 2
    D: int = 64
    N: int = 33
    M: int = 8
    R: int = 5
    chunk_size: int = 16
    chunk_start: int = 3
    dtype: torch.dtype = torch.float32
    kv_lens: list[int] | None = None
    int8_bank: bool = False
    empty_slot_frac: float = 0.2

    @property
    def chunks(self) -> int:
        return max(1, (self.S - 1 - self.chunk_start) // self.chunk_size + 1)

    def seed(self) -> int:
        return zlib.crc32(repr(self).encode())

    def make(self, device: str = "cpu", requires_grad: bool = False) -> dict:
        """Keyword arguments for memory3.ops.memory_attention (and the reference)."""
        g = torch.Generator().manual_seed(self.seed())

        def randn(*shape):
            t = torch.randn(*shape, generator=g).to(self.dtype).to(device)
            return t.requires_grad_(requires_grad)

        q = randn(self.B, self.T, self.Hq, self.D)
        k = randn(self.B, self.S, self.Hkv, self.D)
        v = randn(self.B, self.S, self.Hkv, self.D)
        ids = torch.randint(0, self.N, (self.B, self.chunks, self.R), generator=g, dtype=torch.int32)
        ids[torch.rand(ids.shape, generator=g) < self.empty_slot_frac] = -1
        args = dict(q=q, k=k, v=v, mem_ids=ids.to(device), chunk_size=self.chunk_size, chunk_start=self.chunk_start)
        if self.int8_bank:
            shape = (self.N, self.Hkv, self.M, self.D)
            args["mem_k"] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)
            args["mem_v"] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)
            args["mem_k_scale"] = (torch.rand(shape[:3], generator=g) / 64).to(device)
            args["mem_v_scale"] = (torch.rand(shape[:3], generator=g) / 64).to(device)
        else:
            args["mem_k"] = randn(self.N, self.Hkv, self.M, self.D)
            args["mem_v"] = randn(self.N, self.Hkv, self.M, self.D)
        if self.kv_lens is not None:
            args["kv_lens"] = torch.tensor(self.kv_lens, dtype=torch.int32, device=device)
        return args
