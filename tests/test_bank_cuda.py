"""The GPU loading modes (skipped without CUDA): "pinned" keeps the bank in pinned host memory
with the LRU cache on the GPU, "gpu" keeps every array on the GPU for the in-place ops."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops, testing
from memory3.memory.bank import Bank
from memory3.memory.manifest import MemoryShape

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SHAPE = MemoryShape(layers=2, kv_heads=2, tokens=8, head_dim=16)


@pytest.fixture
def bank_path(tmp_path):
    bank = Bank.create(tmp_path / "b", shape=SHAPE, fingerprint="f", codec="int8", shard_rows=16)
    mem = torch.randn(40, *SHAPE.memory, generator=torch.Generator().manual_seed(0))
    bank.append([str(i) for i in range(40)], [str(i) for i in range(40)], mem)
    bank.close()
    return tmp_path / "b"


@pytest.mark.parametrize("mode", ["pinned", "gpu"])
def test_gpu_modes_gather_what_the_cpu_gathers(bank_path, mode):
    ids = torch.tensor([[3, 17, -1], [39, 3, 0]])
    with Bank.open(bank_path, mode="mmap", device="cpu", dtype=torch.float32) as cpu:
        want = cpu.gather(ids)
    with Bank.open(bank_path, mode=mode, device="cuda", dtype=torch.float32, cache_size=8) as gpu:
        arrays = gpu._load_parts()[0]["k"][0]
        assert arrays.is_pinned() if mode == "pinned" else arrays.is_cuda
        got = gpu.gather(ids)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
        gpu.gather(ids)
        if mode == "pinned":
            assert gpu.cache_stats().hits == 4  # the 4 distinct rows, read again from the GPU cache


def test_gpu_mode_feeds_memory_attention_in_place(bank_path):
    testing.require_kernel("memory_attention", "cuda")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 20, n, 16, generator=g) for n in (4, 2, 2))
    rows = torch.randint(0, 40, (2, 3, 2), generator=g, dtype=torch.int32)
    with Bank.open(bank_path, mode="mmap", device="cpu") as cpu:
        want, _ = ops.memory_attention(q, k, v, mem_ids=rows, chunk_size=8, **cpu.layer_bank(1))
    with Bank.open(bank_path, mode="gpu", device="cuda") as gpu:
        bank = gpu.layer_bank(1)
        assert bank["mem_k"].is_cuda and bank["mem_k_scale"].is_cuda
        got, _ = ops.memory_attention(q.cuda(), k.cuda(), v.cuda(), mem_ids=rows.cuda(), chunk_size=8, **bank)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
