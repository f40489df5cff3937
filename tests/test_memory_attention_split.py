"""Fewer (sequence, KV head) pairs than threads: the CPU decode splits each context into parts
and merges them, the CPU backward gives each part a round robin of key blocks and its own dQ
accumulator; both held to the reference like the unsplit paths."""
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


@pytest.mark.parametrize("dtype,D,int8_bank", [(torch.float32, 64, False), (torch.float32, 40, False),
                                               (torch.float32, 80, True), (torch.bfloat16, 64, False)])
@pytest.mark.parametrize("kv_lens", [None, [300, 70]])
def test_split_backward_matches_reference(four_threads, dtype, D, int8_bank, kv_lens):
    """B x Hkv = 2 items on 4 threads: 2 parts per item, each owning every other key block
    and every other chunk's memories (S = 300: 5 key blocks). D = 40 packs K and V instead of
    reading them in place."""
    require_kernel("memory_attention", "cpu")
    case = AttentionCase(B=2, T=150, S=300, Hq=5, Hkv=1, D=D, N=20, chunk_size=64, chunk_start=7,
                         dtype=dtype, kv_lens=kv_lens, int8_bank=int8_bank)
    args = case.make(requires_grad=True)
    names = ("q", "k", "v") if int8_bank else ("q", "k", "v", "mem_k", "mem_v")
    out, _ = ops.memory_attention(**args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, [args[n] for n in names], dout)
    wide = {n: (t.detach().double().requires_grad_() if n in names else t) for n, t in args.items()}
    ref_out, _ = memory_attention_ref(**wide)
    ref_grads = torch.autograd.grad(ref_out, [wide[n] for n in names], dout.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, got, want in zip(names, grads, ref_grads):
        assert want.abs().sum() > 0, name
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert rel < tol, (name, rel)
