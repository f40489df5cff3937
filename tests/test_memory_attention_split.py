"""Decode with fewer (sequence, KV head) pairs than threads: the CPU kernel splits each
context into parts and merges them; held to the reference like the unsplit path."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase, require_kernel


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # more threads than the 2 (B x Hkv) items: the split path
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_lens", [None, [300, 1], [0, 130]])
@pytest.mark.parametrize("D", [64, 40])
def test_split_decode_matches_reference(four_threads, dtype, kv_lens, D):
    require_kernel("memory_attention", "cpu")
    case = AttentionCase(B=2, T=1, S=300, Hq=5, Hkv=1, D=D, N=20, chunk_size=64, chunk_start=7,
                         dtype=dtype, kv_lens=kv_lens)
    args = case.make()
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = memory_attention_ref(**args, compute_dtype=torch.float64)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref_out.double().to(dtype).double(), atol=tol, rtol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=1e-5, rtol=1e-5)
