"""quantize_memory / dequantize_memory (CPU) against memory3.reference.

int8 and int4 codes, their meta and every dequantization are bit-exact; pq codes equal the
reference's except between centroids at (near-)equal distance, and always pick a nearest
centroid. Round trips are bounded against the unquantized data. Calls torch.ops.memory3.*
directly; random inputs are drawn fresh per case (seeded from the test id).
"""
import zlib

import pytest
import torch

from memory3.pq import train_pq_codebook
from memory3.reference import dequantize_memory_ref, quantize_memory_ref
from memory3.testing import require_kernel

quantize_memory = torch.ops.memory3.quantize_memory
dequantize_memory = torch.ops.memory3.dequantize_memory

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (N, Hkv, M, D); D=48 has a short last int4 group, D=80 is the paper's head dim.
SHAPES = [(1, 1, 1, 16), (7, 2, 3, 80), (113, 8, 8, 64), (7, 1, 8, 128), (113, 2, 1, 48)]
PQ_SHAPES = [(1, 1, 1, 16), (7, 2, 3, 80), (13, 8, 8, 64), (7, 1, 8, 128), (29, 2, 1, 48)]
ID_KINDS = [((5,), torch.int32), ((3, 4), torch.int64), ((), torch.int64)]


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_exact(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def shape_id(s):
    return "x".join(map(str, s))


def random_x(shape, dtype):
    """Gaussian data at mixed scales, with a constant vector (scale 0) and an all-zero one."""
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[:3] + (1,), dtype=torch.float64) * 4
    x.view(-1, shape[-1])[0] = 0.5
    if x.shape[0] > 1:
        x[-1, 0, 0] = 0.0
    return x.to(dtype)


def random_codebook(Hkv, D, dsub):
    return torch.randn(Hkv, D // dsub, 256, dsub)


def random_ids(shape, dtype, N):
    ids = torch.randint(-1, N, shape, dtype=dtype)
    if ids.numel() > 1:
        ids.view(-1)[0] = -1
        ids.view(-1)[-1] = N - 1
    return ids


def rel_l2(x_hat, x):
    x = x.double()
    return ((x_hat.double() - x).norm() / x.norm()).item()


def quantize(x, codec):
    """(codes, meta) of both the kernel and the reference; pq with a random codebook."""
    cb = random_codebook(x.shape[1], x.shape[3], 8 if x.shape[3] % 8 == 0 else 4) if codec == "pq" else None
    cb = cb.to(x.device) if cb is not None else None
    return quantize_memory(x, codec, cb), quantize_memory_ref(x, codec, cb)


# ---------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_exact(dtype, shape, codec, device):
    require_kernel("quantize_memory", device)
    x = random_x(shape, dtype).to(device)
    (codes, meta), (codes_ref, meta_ref) = quantize(x, codec)
    assert codes.dtype == codes_ref.dtype and meta.dtype == torch.float32
    assert_exact(codes, codes_ref)
    assert_exact(meta, meta_ref)


def pq_distances(x, codebook):
    """Squared L2 of every sub-vector to every centroid, in float64: [N, Hkv, M, nsub, 256]."""
    Hkv, nsub, K, dsub = codebook.shape
    sub = x.double().reshape(*x.shape[:-1], nsub, dsub)
    return ((sub[..., None, :] - codebook.double()[None, :, None]) ** 2).sum(-1)


@pytest.mark.parametrize("dsub", [2, 4, 8, 16])
@pytest.mark.parametrize("shape", PQ_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_pq(dtype, shape, dsub):
    x = random_x(shape, dtype)
    cb = random_codebook(shape[1], shape[3], dsub)
    codes, meta = quantize_memory(x, "pq", cb)
    codes_ref, _ = quantize_memory_ref(x, "pq", cb)
    assert codes.dtype == torch.uint8 and codes.shape == (*shape[:3], shape[3] // dsub)
    assert_exact(meta, cb)
    assert meta.data_ptr() != cb.data_ptr()  # outputs of a custom op may not alias its inputs
    # Every code is a nearest centroid (float64 distances, float32 rounding allowed) ...
    dist = pq_distances(x.float(), cb)
    best = dist.amin(-1)
    mine = dist.gather(-1, codes.long()[..., None])[..., 0]
    assert torch.all(mine <= best + 1e-5 * (1 + best))
    # ... and differs from the reference's only at a (near-)tie.
    theirs = dist.gather(-1, codes_ref.long()[..., None])[..., 0]
    differ = codes != codes_ref
    assert torch.all((mine - theirs).abs()[differ] <= 1e-5 * (1 + best[differ]))
    assert differ.float().mean() < 0.01


def test_quantize_pq_first_index_on_ties():
    """Duplicated centroids tie exactly: the first one wins, as in torch.argmin."""
    x = random_x((7, 2, 3, 80), torch.float32)
    cb = random_codebook(2, 80, 8)
    cb[:, :, 128:] = cb[:, :, :128]
    codes, _ = quantize_memory(x, "pq", cb)
    assert int(codes.max()) < 128
    assert_exact(codes, quantize_memory_ref(x, "pq", cb)[0])


def test_quantize_non_contiguous_input():
    x = random_x((7, 3, 80, 2), torch.float32).permute(0, 3, 1, 2)  # [7, 2, 3, 80], D strided
    for codec in ("int8", "int4"):
        (codes, meta), (codes_ref, meta_ref) = quantize(x, codec)
        assert_exact(codes, codes_ref)
        assert_exact(meta, meta_ref)


# ---------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("out_dtype", [None, *FLOAT_DTYPES], ids=str)
@pytest.mark.parametrize("shape", PQ_SHAPES, ids=shape_id)
@pytest.mark.parametrize("codec", ["int8", "int4", "pq"])
def test_dequantize_exact(codec, shape, out_dtype, device):
    require_kernel("dequantize_memory", device)
    x = random_x(shape, torch.float32).to(device)
    (codes, meta), _ = quantize(x, codec)
    got = dequantize_memory(codes, meta, codec, None, out_dtype)
    assert got.dtype == (out_dtype or torch.bfloat16) and got.shape == shape
    assert_exact(got, dequantize_memory_ref(codes, meta, codec, None, out_dtype))


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ids_kind", ID_KINDS, ids=lambda k: f"{shape_id(k[0]) or 'scalar'}-{k[1]}")
@pytest.mark.parametrize("codec", ["int8", "int4", "pq"])
def test_dequantize_ids_exact(codec, ids_kind, out_dtype):
    shape = (29, 2, 8, 48)
    (codes, meta), _ = quantize(random_x(shape, torch.float32), codec)
    ids = random_ids(*ids_kind, shape[0])
    got = dequantize_memory(codes, meta, codec, ids, out_dtype)
    assert got.shape == (*ids.shape, *shape[1:])
    assert_exact(got, dequantize_memory_ref(codes, meta, codec, ids, out_dtype))


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_dequantize_bank_sliced_from_a_bigger_tensor(codec):
    """Codes and meta of one layer of a [N, L, ...] bank: strided over memories, read in place."""
    N, L, shape = 17, 3, (2, 8, 80)
    x = random_x((N * L, *shape), torch.float32)
    codes, meta = (t.reshape(N, L, *t.shape[1:])[:, 1] for t in quantize_memory(x, codec))
    assert not codes.is_contiguous()
    ids = random_ids((6,), torch.int64, N)
    assert_exact(dequantize_memory(codes, meta, codec, ids), dequantize_memory_ref(codes, meta, codec, ids))


def test_dequantize_empty_ids():
    (codes, meta), _ = quantize(random_x((5, 2, 3, 16), torch.float32), "int8")
    out = dequantize_memory(codes, meta, "int8", torch.empty(2, 0, dtype=torch.int64))
    assert out.shape == (2, 0, 2, 3, 16)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("D", [16, 48, 64, 80, 128])
@pytest.mark.parametrize("codec, bound", [("int8", 0.01), ("int4", 0.10)])
def test_round_trip_error(codec, bound, D):
    x = torch.randn(113, 8, 8, D)
    codes, meta = quantize_memory(x, codec)
    x_hat = dequantize_memory(codes, meta, codec, None, torch.float32)
    assert rel_l2(x_hat, x) < bound
    # Element-wise: within half a quantization step of the vector's (group's) scale.
    if codec == "int8":
        step = meta[..., None]
    else:
        step = meta[..., 0].repeat_interleave(32, dim=-1)[..., :D]
    assert torch.all((x_hat - x).abs() <= step * 0.5 * (1 + 1e-5) + 1e-6)


# Measured on Gaussian data (64 x 2 x 8 x 80): codebooks trained by memory3.pq (8 Lloyd
# iterations) give relative L2 ~0.23 at d_sub=4 and ~0.42 at d_sub=8 (2 and 1 bits per value).
@pytest.mark.parametrize("dsub, bound", [(4, 0.27), (8, 0.47)])
def test_round_trip_error_pq(dsub, bound):
    x = torch.randn(64, 2, 8, 80)
    trained = train_pq_codebook(x, sub_dim=dsub, iters=8)
    codes, meta = quantize_memory(x, "pq", trained)
    err = rel_l2(dequantize_memory(codes, meta, "pq", None, torch.float32), x)
    assert err < bound
    untrained = train_pq_codebook(x, sub_dim=dsub, iters=0)  # 256 data points per sub-space
    codes0, meta0 = quantize_memory(x, "pq", untrained)
    assert err < 0.9 * rel_l2(dequantize_memory(codes0, meta0, "pq", None, torch.float32), x)


# ---------------------------------------------------------------------------- bad input


def test_quantize_bad_input():
    x = torch.randn(3, 2, 4, 16)
    cases = [
        (lambda: quantize_memory(x, "int3"), "codec must be one of int8, int4, pq; got 'int3'"),
        (lambda: quantize_memory(x[0], "int8"), r"x must be \[N, Hkv, M, D\]"),
        (lambda: quantize_memory(x.int(), "int8"), "x must be float32/float64/bfloat16/float16"),
        (lambda: quantize_memory(torch.randn(3, 2, 4, 15), "int4"), "x needs an even head dim"),
        (lambda: quantize_memory(x, "pq"), "codec pq needs a codebook"),
        (lambda: quantize_memory(x, "int8", torch.randn(2, 2, 256, 8)), "codebook is only for codec pq"),
        (lambda: quantize_memory(x, "pq", torch.randn(2, 2, 256, 4)), r"codebook must be the pq codebook \[Hkv=2"),
        (lambda: quantize_memory(x, "pq", torch.randn(1, 2, 256, 8)), "codebook must be the pq codebook"),
        (lambda: quantize_memory(x, "pq", torch.randn(2, 2, 255, 8)), "codebook must be the pq codebook"),
        (lambda: quantize_memory(x, "pq", torch.randn(2, 2, 256, 8).double()), "codebook must be float32"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_dequantize_bad_input():
    x = torch.randn(3, 2, 4, 16)
    c8, m8 = quantize_memory(x, "int8")
    c4, m4 = quantize_memory(x, "int4")
    cpq, mpq = quantize_memory(x, "pq", torch.randn(2, 2, 256, 8))
    cases = [
        (lambda: dequantize_memory(c8, m8, "fp8"), "codec must be one of int8, int4, pq, vq; got 'fp8'"),
        (lambda: dequantize_memory(c8.float(), m8, "int8"), "codes must be int8 for codec int8, got Float"),
        (lambda: dequantize_memory(c8, m8, "int4"), "codes must be uint8 for codec int4, got Char"),
        (lambda: dequantize_memory(c8[0], m8, "int8"), r"codes must be \[N, Hkv, M, \*\]"),
        (lambda: dequantize_memory(c8, m8.double(), "int8"), "meta must be float32"),
        (lambda: dequantize_memory(c8, m8[:, :1], "int8"), r"meta must be the int8 scales \[N, Hkv, M\]"),
        (lambda: dequantize_memory(c4, m4[..., :1], "int4"), "meta must be the int4"),
        (lambda: dequantize_memory(cpq, mpq[:1], "pq"), "meta must be the pq codebook"),
        (lambda: dequantize_memory(cpq, mpq[:, :1], "pq"), "meta must be the pq codebook"),
        (lambda: dequantize_memory(c8, m8, "int8", torch.tensor([0, 3])), r"ids holds 3 at flat index 1, outside \[-1, N=3\)"),
        (lambda: dequantize_memory(c8, m8, "int8", torch.tensor([-2])), "ids holds -2"),
        (lambda: dequantize_memory(c8, m8, "int8", torch.tensor([0.0])), "ids must be int32 or int64"),
        (lambda: dequantize_memory(c8, m8, "int8", None, torch.int8), "out_dtype must be float32"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# ---------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("i", range(4))
def test_opcheck_quantize(i, device, sample_inputs):
    """Every codec, input dtypes bf16/float32/float16/float64."""
    torch.library.opcheck(quantize_memory, sample_inputs("quantize_memory", device)[i])


@pytest.mark.parametrize("i", range(4))
def test_opcheck_dequantize(i, device, sample_inputs):
    """Every codec, with int32/int64 ids and without, out_dtype given or not."""
    torch.library.opcheck(dequantize_memory, sample_inputs("dequantize_memory", device)[i])
