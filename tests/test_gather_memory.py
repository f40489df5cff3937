"""gather_memory (CPU) against memory3.reference.gather_memory_ref: data movement is exact.

Calls torch.ops.memory3.gather_memory directly; random inputs are drawn fresh per case
(seeded from the test id, so a failure reproduces).
"""
import zlib

import pytest
import torch

from memory3 import ops
from memory3.reference import gather_memory_ref
from memory3.testing import require_kernel

gather_memory = torch.ops.memory3.gather_memory

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (N, Hkv, M, D): one memory, odd counts, the paper's Hkv=8/M=8/D=80, a short last int4 group.
SHAPES = [(1, 1, 1, 16), (7, 2, 3, 80), (113, 8, 8, 64), (7, 1, 8, 128), (113, 2, 1, 48)]
# ids: shape and dtype; every kind with more than one element gets -1s.
ID_KINDS = [((5,), torch.int32), ((160,), torch.int64), ((3, 4), torch.int64), ((2, 1, 3), torch.int32), ((), torch.int64)]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_exact(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def random_ids(shape, dtype, N):
    ids = torch.randint(-1, N, shape, dtype=dtype)
    if ids.numel() > 1:
        ids.view(-1)[0] = -1  # at least one empty slot
        ids.view(-1)[-1] = N - 1  # and the last memory
    return ids


def random_bank(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64) * 3).to(dtype), (torch.randn(shape, dtype=torch.float64)).to(dtype)


def int8_bank(shape):
    mk = torch.randint(-127, 128, shape, dtype=torch.int8)
    mv = torch.randint(-127, 128, shape, dtype=torch.int8)
    return mk, mv, torch.rand(shape[:3]) * 0.05, torch.rand(shape[:3]) * 0.05


@pytest.mark.parametrize("ids_kind", ID_KINDS, ids=lambda k: f"{'x'.join(map(str, k[0])) or 'scalar'}-{k[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_float_bank(dtype, shape, ids_kind, device):
    require_kernel("gather_memory", device)
    mk, mv = (t.to(device) for t in random_bank(shape, dtype))
    ids = random_ids(*ids_kind, shape[0]).to(device)
    k, v = gather_memory(mk, mv, ids)
    k_ref, v_ref = gather_memory_ref(mk, mv, ids)
    assert k.shape == (*ids.shape, *shape[1:]) and k.dtype == dtype
    assert_exact(k, k_ref)
    assert_exact(v, v_ref)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_float_bank_out_dtype(dtype, out_dtype):
    shape = (29, 2, 8, 80)
    mk, mv = random_bank(shape, dtype)
    ids = random_ids((4, 5), torch.int32, shape[0])
    k, v = gather_memory(mk, mv, ids, out_dtype)
    k_ref, v_ref = gather_memory_ref(mk, mv, ids, out_dtype)
    assert k.dtype == out_dtype
    assert_exact(k, k_ref)
    assert_exact(v, v_ref)


@pytest.mark.parametrize("out_dtype", [None, *FLOAT_DTYPES], ids=str)
@pytest.mark.parametrize("ids_kind", ID_KINDS[:3], ids=lambda k: f"{'x'.join(map(str, k[0]))}-{k[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_bank(shape, ids_kind, out_dtype, device):
    require_kernel("gather_memory", device)
    mk, mv, ks, vs = (t.to(device) for t in int8_bank(shape))
    ids = random_ids(*ids_kind, shape[0]).to(device)
    k, v = gather_memory(mk, mv, ids, out_dtype, ks, vs)
    k_ref, v_ref = gather_memory_ref(mk, mv, ids, out_dtype, ks, vs)
    assert k.dtype == (out_dtype or torch.bfloat16)
    assert_exact(k, k_ref)
    assert_exact(v, v_ref)


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_bank_sliced_from_a_bigger_tensor(int8):
    """One layer of a [N, L, 2, Hkv, M, D] bank: strided over memories, read in place."""
    N, L, Hkv, M, D = 31, 3, 2, 8, 80
    if int8:
        full = torch.randint(-127, 128, (N, L, 2, Hkv, M, D), dtype=torch.int8)
        scales = torch.rand(N, L, 2, Hkv, M)
        mk, mv, ks, vs = full[:, 1, 0], full[:, 1, 1], scales[:, 1, 0], scales[:, 1, 1]
    else:
        full = torch.randn(N, L, 2, Hkv, M, D, dtype=torch.bfloat16)
        mk, mv, ks, vs = full[:, 1, 0], full[:, 1, 1], None, None
    assert not mk.is_contiguous()
    ids = random_ids((9,), torch.int64, N)
    for got, want in zip(gather_memory(mk, mv, ids, None, ks, vs), gather_memory_ref(mk, mv, ids, None, ks, vs)):
        assert_exact(got, want)


def test_bank_with_non_contiguous_rows():
    """A bank whose (M, D) dims are transposed in memory is copied, then gathered."""
    mk = torch.randn(7, 2, 80, 8).transpose(2, 3)
    mv = torch.randn(7, 2, 80, 8).transpose(2, 3)
    ids = random_ids((6,), torch.int32, 7)
    for got, want in zip(gather_memory(mk, mv, ids), gather_memory_ref(mk, mv, ids)):
        assert_exact(got, want)


@pytest.mark.parametrize("ids_shape", [(0,), (3, 0)])
def test_empty_ids(ids_shape):
    mk, mv = random_bank((5, 2, 3, 16), torch.float32)
    k, v = gather_memory(mk, mv, torch.empty(ids_shape, dtype=torch.int64))
    assert k.shape == (*ids_shape, 2, 3, 16) and v.shape == k.shape


def test_all_empty_slots_give_zeros():
    mk, mv = random_bank((5, 2, 3, 16), torch.float16)
    k, v = gather_memory(mk, mv, torch.full((2, 3), -1, dtype=torch.int32))
    assert_exact(k, torch.zeros(2, 3, 2, 3, 16, dtype=torch.float16))
    assert_exact(v, torch.zeros_like(v))


def test_repeated_ids():
    mk, mv = random_bank((4, 1, 2, 16), torch.float32)
    k, _ = gather_memory(mk, mv, torch.tensor([3, 3, 0, 3]))
    assert_exact(k, mk[[3, 3, 0, 3]])


# ---------------------------------------------------------------------------- bad input


def _bank(N=5, dtype=torch.float32):
    return random_bank((N, 2, 3, 16), dtype)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (*(t[0] for t in _bank()), torch.tensor([0])), "mem_k must be"),  # rank 3
        (lambda: (_bank()[0], _bank()[1][:, :1], torch.tensor([0])), "mem_v must have the shape"),
        (lambda: (_bank()[0], _bank()[1].double(), torch.tensor([0])), "mem_v must have the dtype"),
        (lambda: (*_bank(), torch.tensor([0.0])), "ids must be int32 or int64"),
        (lambda: (*_bank(), torch.tensor([0, 5])), r"ids holds 5 at flat index 1, outside \[-1, N=5\)"),
        (lambda: (*_bank(), torch.tensor([[0, -2]], dtype=torch.int32)), "ids holds -2"),
        (lambda: (*(t.int() for t in _bank()), torch.tensor([0])), "mem_k must be float32/float64/bfloat16/float16"),
    ],
    ids=["mem_k_rank", "mem_v_shape", "mem_v_dtype", "ids_dtype", "id_too_big", "id_below_minus_one", "bank_dtype"],
)
def test_bad_input(make, match):
    with pytest.raises(RuntimeError, match=match):
        gather_memory(*make())


def test_int8_bank_needs_scales():
    mk, mv, ks, vs = int8_bank((5, 2, 3, 16))
    with pytest.raises(RuntimeError, match="mem_k_scale and mem_v_scale"):
        gather_memory(mk, mv, torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"mem_k_scale must be \[N, Hkv, M\]"):
        gather_memory(mk, mv, torch.tensor([0]), None, ks[:, :1], vs)
    with pytest.raises(RuntimeError, match="mem_v_scale must be float32"):
        gather_memory(mk, mv, torch.tensor([0]), None, ks, vs.double())


def test_float_bank_rejects_scales():
    mk, mv = _bank()
    with pytest.raises(RuntimeError, match="only for an int8 bank"):
        gather_memory(mk, mv, torch.tensor([0]), None, torch.ones(5, 2, 3), torch.ones(5, 2, 3))


def test_bad_out_dtype():
    with pytest.raises(RuntimeError, match="out_dtype must be float32/float64/bfloat16/float16"):
        gather_memory(*_bank(), torch.tensor([0]), torch.int32)


# ---------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i, device, sample_inputs):
    """Float and int8 banks, int32/int64 and 0-d ids, out_dtype given or not."""
    torch.library.opcheck(gather_memory, sample_inputs("gather_memory", device, requires_grad=True)[i])


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize("out_dtype", [None, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_matches_reference(dtype, out_dtype, device):
    """Random upstream gradients through the op against autograd through the reference:
    rows of repeated ids add up, -1 slots give nothing, every element lands where it came
    from (an all-ones gradient would not see a permutation along D)."""
    require_kernel("gather_memory", device)
    shape = (6, 2, 3, 16)
    bank = [t.to(device).requires_grad_() for t in random_bank(shape, dtype)]
    ids = torch.tensor([[4, 1, -1], [4, 0, 4]], device=device)
    k, v = ops.gather_memory(*bank, ids, out_dtype)
    dk, dv = torch.randn_like(k), torch.randn_like(v)
    grads = torch.autograd.grad((k * dk).sum() + (v * dv).sum(), bank)
    # The reference in float64: the op adds repeated rows in the bank's dtype, in its own order.
    ref_bank = [t.detach().double().requires_grad_() for t in bank]
    rk, rv = gather_memory_ref(*ref_bank, ids, torch.float64)
    ref_grads = torch.autograd.grad((rk * dk.double()).sum() + (rv * dv.double()).sum(), ref_bank)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert torch.all(grads[0][[2, 3, 5]] == 0)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conversion_edge_values(dtype, out_dtype):
    """Signed zeros, subnormals of every type, overflow to inf, inf and nan convert as torch does."""
    edge = [0.0, -0.0, 1e-45, -3e-39, 1e-40, 6e-8, 3e-8, 2.9e-8, 6.1e-5, -6.0e-5, 65504.0, 65519.0, 65520.0,
            -7e4, 3.4e38, 1e300, 2.0**-1074, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-9, float("inf"), float("-inf"), float("nan")]
    row = torch.tensor(edge, dtype=torch.float64)
    mk = torch.cat([row, torch.randn(32 - len(edge), dtype=torch.float64)]).reshape(1, 1, 1, 32).to(dtype)
    ids = torch.tensor([0, -1, 0])
    for got, want in zip(gather_memory(mk, -mk, ids, out_dtype), gather_memory_ref(mk, -mk, ids, out_dtype)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
