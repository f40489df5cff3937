"""memory3.pq.train_pq_codebook and the Python faces of the codecs (memory3.ops)."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops
from memory3.pq import train_pq_codebook
from memory3.reference import dequantize_memory_ref, gather_memory_ref, quantize_memory_ref


def _clustered(N=64, Hkv=2, M=8, D=16, clusters=300, seed=0):
    """Vectors near a few hundred centres per (head, sub-space): k-means should find them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, D, generator=g) * 3
    pick = torch.randint(0, clusters, (N, Hkv, M), generator=g)
    return centres[pick] + 0.05 * torch.randn(N, Hkv, M, D, generator=g)


def test_codebook_shape_and_determinism():
    x = _clustered()
    a = train_pq_codebook(x, sub_dim=4, iters=5, seed=3)
    b = train_pq_codebook(x, sub_dim=4, iters=5, seed=3)
    assert a.shape == (2, 4, 256, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, train_pq_codebook(x, sub_dim=4, iters=5, seed=4))


def test_lloyd_iterations_reduce_error():
    x = _clustered()

    def error(iters):
        codes, meta = ops.quantize_memory(x, "pq", pq_sub_dim=4, pq_iters=iters, seed=0)
        x_hat = ops.dequantize_memory(codes, meta, "pq", out_dtype=torch.float32)
        return ((x_hat - x).norm() / x.norm()).item()

    untrained, trained = error(0), error(15)
    assert trained < 0.7 * untrained, (untrained, trained)
    assert trained < 0.1


def test_fewer_vectors_than_centroids_encode_exactly():
    x = torch.randn(3, 1, 5, 8)  # 15 vectors < 256 centroids: the codebook repeats them
    codes, meta = ops.quantize_memory(x, "pq", pq_sub_dim=8)
    torch.testing.assert_close(ops.dequantize_memory(codes, meta, "pq", out_dtype=torch.float32), x)


def test_wrapper_matches_reference_for_every_codec():
    x = torch.randn(7, 2, 3, 48)
    for codec in (c for c in ops.CODECS if c != "vq"):  # vq trains 2^14 centroids: tests/test_vq.py
        codes, meta = ops.quantize_memory(x, codec, pq_sub_dim=8, pq_iters=3)
        ref_codes, ref_meta = quantize_memory_ref(x, codec, meta if codec == "pq" else None)
        if codec != "pq":  # pq codes may differ only at near-ties; its decode is checked below
            torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
        ids = torch.tensor([[6, -1], [0, 6]])
        torch.testing.assert_close(
            ops.dequantize_memory(codes, meta, codec, ids),
            dequantize_memory_ref(codes, meta, codec, ids),
            rtol=0, atol=0,
        )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.quantize_memory(torch.randn(2, 2, 2, 8), "int3"), r"codec must be one of int8, int4, pq"),
        (lambda: ops.quantize_memory(torch.randn(2, 2, 8), "int8"), r"x must be \[N, Hkv, M, D\]"),
        (lambda: ops.quantize_memory(torch.randn(2, 2, 2, 7), "int4"), r"head dim D must be even"),
        (lambda: ops.quantize_memory(torch.randn(2, 2, 2, 12), "pq", pq_sub_dim=8), r"sub_dim must divide"),
        (lambda: ops.quantize_memory(torch.randn(2, 2, 2, 16), "pq", codebook=torch.randn(3, 2, 256, 8)),
         r"does not fit x"),
        (lambda: ops.dequantize_memory(torch.zeros(2, 2, 2, 8), torch.ones(2, 2, 2), "int8"), r"codes must be torch.int8"),
        (lambda: ops.dequantize_memory(torch.zeros(2, 2, 2, 8, dtype=torch.int8), torch.ones(2, 2), "int8"),
         r"int8 meta must be \[N, Hkv, M\]"),
        (lambda: ops.gather_memory(torch.randn(4, 2, 2, 8), torch.randn(4, 2, 2, 8), torch.tensor([0.5])),
         r"ids must be int32 or int64"),
    ],
)
def test_bad_codec_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gather_memory_gradient_through_the_python_face():
    """ops.gather_memory's autograd (a scatter of the output gradient into the bank rows)
    against autograd through the reference, with random upstream gradients, repeated ids
    and an empty slot."""
    g = torch.Generator().manual_seed(5)
    bank = [torch.randn(5, 2, 3, 8, generator=g).requires_grad_() for _ in range(2)]
    ids = torch.tensor([[4, 1], [4, -1]])
    k, v = ops.gather_memory(*bank, ids)
    dk, dv = torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)
    grads = torch.autograd.grad((k * dk).sum() + (v * dv).sum(), bank)
    ref_bank = [t.detach().clone().requires_grad_() for t in bank]
    rk, rv = gather_memory_ref(*ref_bank, ids)
    ref_grads = torch.autograd.grad((rk * dk).sum() + (rv * dv).sum(), ref_bank)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grads[0][4], dk[0, 0] + dk[1, 0], rtol=0, atol=0)
