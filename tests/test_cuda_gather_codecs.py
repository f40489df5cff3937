"""gather_memory and the memory codecs on the GPU (memory3/gather.cuh, quant.cuh, vq.cuh)
against memory3.reference and the CPU kernels: a GPU bank and a pinned host bank read in
place, int8 dequantized on the way, odd sizes (the element path), strided banks, -1 ids,
outputs poisoned with NaN before each run, ids checked on the device. int8/int4 codes and
decoded values are bit-identical to the reference; pq codes may differ only at near-ties;
vq decodes to float rounding of the reference. Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch
from cuda_poison import poison_cache  # outputs' blocks hold NaN before each run

from memory3 import ops, vq
from memory3.pq import train_pq_codebook
from memory3.reference import dequantize_memory_ref, gather_memory_ref, quantize_memory_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(50, 8, 8, 80), (9, 3, 5, 7), (20, 2, 8, 128), (7, 1, 1, 16)]  # paper-like, odd, D=128, tiny


@pytest.fixture(autouse=True)
def cuda_kernels():
    for op in ("gather_memory", "quantize_memory", "dequantize_memory"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{op}", "CUDA"):
            pytest.skip(f"memory3::{op} has no CUDA kernel in this build")


def random_ids(shape, N, dtype=torch.int64):
    ids = torch.randint(-1, N, shape, dtype=dtype)
    ids.view(-1)[0] = -1
    ids.view(-1)[-1] = N - 1
    return ids


def assert_exact(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        assert torch.equal(g.cpu(), w.cpu())


# ---------------------------------------------------------------------------- gather_memory


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bank_dtype", FLOATS + [torch.int8], ids=str)
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("where", ["gpu", "pinned"])
def test_gather_matches_reference(shape, bank_dtype, out_dtype, where):
    if bank_dtype == torch.int8:
        mk = torch.randint(-127, 128, shape, dtype=torch.int8)
        mv = torch.randint(-127, 128, shape, dtype=torch.int8)
        scales = (torch.rand(shape[:3]) * 0.05, torch.rand(shape[:3]) * 0.05)
    else:
        mk, mv = (torch.randn(shape, dtype=torch.float64) * 3).to(bank_dtype), torch.randn(shape).to(bank_dtype)
        scales = (None, None)
    ids = random_ids((3, 11), shape[0])
    want = gather_memory_ref(mk, mv, ids, out_dtype, *scales)
    move = (lambda t: t.cuda()) if where == "gpu" else (lambda t: t.pin_memory())
    bank = [move(t) for t in (mk, mv)]
    sc = [None if s is None else move(s) for s in scales]
    poison_cache()
    got = ops.gather_memory(*bank, ids.cuda(), out_dtype, *sc)
    assert got[0].is_cuda
    assert_exact(got, want)


def test_gather_strided_bank_and_int32_ids():
    stacked = torch.randn(40, 3, 2, 8, 64, device="cuda").to(torch.bfloat16)  # [N, layers, Hkv, M, D]
    mk, mv = stacked[:, 1], stacked[:, 2]
    ids = random_ids((17,), 40, torch.int32)
    assert_exact(ops.gather_memory(mk, mv, ids.cuda()), gather_memory_ref(mk.cpu(), mv.cpu(), ids))


def test_gather_pageable_host_bank_is_refused():
    bank = torch.randn(4, 2, 2, 16)
    with pytest.raises(RuntimeError, match=r"pinned host memory"):
        torch.ops.memory3.gather_memory(bank, bank, torch.zeros(3, dtype=torch.long, device="cuda"))


def test_gather_bad_ids_raise_on_the_device(monkeypatch):
    monkeypatch.delenv("MEMORY3_RANGE_CHECK", raising=False)
    bank = torch.randn(4, 2, 2, 16, device="cuda")
    with pytest.raises(RuntimeError, match=r"ids holds 4 at flat index 2, outside \[-1, N=4\)"):
        ops.gather_memory(bank, bank, torch.tensor([0, -1, 4], device="cuda"))
    monkeypatch.setenv("MEMORY3_RANGE_CHECK", "deferred")
    k, _ = ops.gather_memory(bank, bank, torch.tensor([7, 1], device="cuda"))
    assert bool((k[0] == 0).all()) and torch.equal(k[1], bank[1])
    with pytest.raises(RuntimeError, match=r"ids holds 7 at flat index 0"):
        ops.check_range_errors()


# ---------------------------------------------------------------------------- codecs


def random_x(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64) * torch.rand(shape[:3] + (1,), dtype=torch.float64) * 4).to(dtype)


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(30, 8, 8, 80), (5, 3, 3, 46), (4, 2, 2, 128)], ids=str)
def test_quantize_bit_identical(codec, dtype, shape):
    x = random_x(shape, dtype)
    x[0, 0, 0] = 0  # an all-zero vector: scale 0
    poison_cache()
    got = ops.quantize_memory(x.cuda(), codec)
    assert_exact(got, quantize_memory_ref(x, codec))


@pytest.mark.parametrize("dsub", [2, 4, 8, 10])
def test_quantize_pq_codes(dsub):
    x = random_x((40, 2, 8, 80), torch.float32)
    cb = train_pq_codebook(x, sub_dim=dsub, iters=3, seed=0)
    codes, meta = ops.quantize_memory(x.cuda(), "pq", codebook=cb.cuda())
    ref_codes, _ = quantize_memory_ref(x, "pq", cb)
    assert (codes.cpu() != ref_codes).float().mean().item() <= 0.01  # only near-ties may differ
    assert torch.equal(meta.cpu(), cb)


@pytest.mark.parametrize("codec", ["int8", "int4", "pq"])
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("D", [80, 46])
def test_dequantize_bit_identical(codec, out_dtype, with_ids, D):
    x = random_x((25, 2, 8, D), torch.float32)
    cb = train_pq_codebook(x, sub_dim=2, iters=2, seed=0) if codec == "pq" else None
    codes, meta = quantize_memory_ref(x, codec, cb)
    ids = random_ids((3, 7), 25) if with_ids else None
    want = dequantize_memory_ref(codes, meta, codec, ids, out_dtype)
    poison_cache()
    got = ops.dequantize_memory(codes.cuda(), meta.cuda(), codec, None if ids is None else ids.cuda(), out_dtype)
    assert_exact([got], [want])


def test_dequantize_bad_ids_raise():
    codes, meta = quantize_memory_ref(random_x((5, 2, 2, 16), torch.float32), "int8")
    with pytest.raises(RuntimeError, match=r"ids holds 5 at flat index 1"):
        ops.dequantize_memory(codes.cuda(), meta.cuda(), "int8", torch.tensor([0, 5], device="cuda"))


@pytest.mark.parametrize("D", [80, 64])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_vq_decoder_matches_reference_and_cpu(D, out_dtype):
    """vq codes drawn at random (every code decodes inside the tables) against the reference
    decoder and the CPU kernel, with ids."""
    spec = vq.VQSpec(D)
    g = torch.Generator().manual_seed(D)
    meta = torch.randn(1 + D + 2**spec.coarse_bits + 2**spec.pq_bits, D, generator=g)
    meta[0] = 0
    meta[0, :4] = torch.tensor([1.0, spec.coarse_bits, spec.pq_m, spec.pq_bits])
    codes = torch.randint(0, 256, (12, 2, 8, spec.code_size), dtype=torch.uint8, generator=g)
    ids = random_ids((5,), 12)
    want = dequantize_memory_ref(codes, meta, "vq", ids, torch.float32)
    poison_cache()
    got = ops.dequantize_memory(codes.cuda(), meta.cuda(), "vq", ids.cuda(), out_dtype).cpu()
    # float32 sums of 80 products in another order: a few ulps of |x| ~ 10
    tol = dict(atol=1e-2, rtol=1e-2) if out_dtype == torch.bfloat16 else dict(atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got.float(), want.to(out_dtype).float(), **tol)
    cpu = ops.dequantize_memory(codes, meta, "vq", ids, out_dtype)
    torch.testing.assert_close(got.float(), cpu.float(), **tol)


def test_vq_bad_header_is_recorded():
    D = 16
    meta = torch.zeros(1 + D + 4 + 4, D)
    meta[0, :4] = torch.tensor([1.0, 2, 2, 2])
    codes = torch.zeros(3, 1, 1, 2, dtype=torch.uint8)
    meta[0, 1] = 2.5  # not an integer: the device check refuses it (the Python face reads it first)
    with pytest.raises(RuntimeError, match=r"vq meta header"):
        torch.ops.memory3.dequantize_memory(codes.cuda(), meta.cuda(), "vq", None, torch.float32)
