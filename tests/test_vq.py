"""The paper's vq codec (FAISS OPQ,Residual2x14,PQ8x10): our reference and our CPU kernel decode
FAISS's codes as FAISS's own sa_decode does; the meta tensor holds the whole quantizer (a FAISS
index rebuilt from it encodes as the trained one); training on a small sample; refused head
dims, samples and metas; gather + decode with ids; the bank codec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memory3 import ops, reference
from memory3.memory.bank import Bank
from memory3.memory.manifest import MemoryShape
from memory3.vq import VQSpec, encode_vq, faiss_from_meta, meta_from_faiss, spec_from_meta, train_vq

faiss = pytest.importorskip("faiss")

SMALL = dict(coarse_bits=6, pq_bits=5)  # trains in seconds; the decode path is the same


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS's OpenMP threads spin on a busy 2-core machine; one thread keeps tests steady."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def known_meta(spec: VQSpec, seed: int = 0) -> torch.Tensor:
    """A meta with a random orthonormal rotation and random codebooks (no training)."""
    g = torch.Generator().manual_seed(seed)
    D = spec.head_dim
    meta = torch.zeros(spec.meta_rows, D)
    meta[0, :5] = torch.tensor([1.0, spec.coarse_bits, spec.pq_m, spec.pq_bits, spec.opq_m])
    meta[1 : 1 + D] = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    ncoarse = 1 << spec.coarse_bits
    meta[1 + D : 1 + D + ncoarse] = torch.randn(ncoarse, D, generator=g)
    meta[1 + D + ncoarse :] = 0.3 * torch.randn(1 << spec.pq_bits, D, generator=g)
    return meta


def random_codes(spec: VQSpec, n: int, seed: int = 0) -> torch.Tensor:
    """n valid codes: list numbers below 2^(2 coarse_bits), any fine bits."""
    g = torch.Generator().manual_seed(seed)
    list_no = torch.randint(0, 1 << (2 * spec.coarse_bits), (n,), generator=g)
    coarse = torch.stack([(list_no >> (8 * b)) & 255 for b in range(spec.coarse_bytes)], dim=1)
    fine = torch.randint(0, 256, (n, spec.code_size - spec.coarse_bytes), generator=g)
    return torch.cat([coarse, fine], dim=1).to(torch.uint8)


def faiss_decode(meta: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(faiss_from_meta(meta).sa_decode(codes.reshape(-1, codes.shape[-1]).numpy()))


@pytest.mark.parametrize("D", [80, 16, 32])
def test_decoders_match_faiss_sa_decode(D):
    spec = VQSpec(D)  # the paper's 2x14 coarse + 8x10 fine, 14 bytes
    assert spec.code_size == 14 and (D != 80 or spec.factory == "OPQ20_80,Residual2x14,PQ8x10")
    meta = known_meta(spec)
    x = 2.0 * torch.randn(96, D, generator=torch.Generator().manual_seed(1))
    codes = torch.cat([encode_vq(x, meta), random_codes(spec, 3 * 96)])  # FAISS's own and arbitrary
    want = faiss_decode(meta, codes)
    codes4 = codes.reshape(-1, 3, 4, 14)  # [N, Hkv, M, code_size]
    ref = reference.dequantize_memory_ref(codes4, meta, "vq", out_dtype=torch.float32).reshape(-1, D)
    got = ops.dequantize_memory(codes4, meta, "vq", out_dtype=torch.float32).reshape(-1, D)
    tol = 2e-6 * want.abs().max().item()  # FAISS rotates with a BLAS sgemm: float rounding only
    assert (ref - want).abs().max() <= tol, (ref - want).abs().max()
    assert (got - want).abs().max() <= tol, (got - want).abs().max()


def test_meta_is_the_whole_quantizer():
    spec = VQSpec(16, **SMALL)
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(32, 16, generator=g)
    x = centers[torch.randint(0, 32, (3000,), generator=g)] + 0.3 * torch.randn(3000, 16, generator=g)
    index = faiss.index_factory(16, spec.factory)
    index.train(x.numpy())
    meta = meta_from_faiss(index, spec)
    assert spec_from_meta(meta) == spec and tuple(meta.shape) == (1 + 16 + 64 + 32, 16)
    assert torch.equal(meta_from_faiss(faiss_from_meta(meta), spec), meta)
    codes = encode_vq(x, meta)  # through the index rebuilt from meta ...
    assert torch.equal(codes, torch.from_numpy(index.sa_encode(x.numpy())))  # ... = the trained one
    got = ops.dequantize_memory(codes.reshape(-1, 2, 3, spec.code_size), meta, "vq", out_dtype=torch.float32)
    want = torch.from_numpy(index.sa_decode(codes.numpy()))
    assert (got.reshape(-1, 16) - want).abs().max() <= 1e-5 * want.abs().max()


def test_train_vq_on_a_small_sample():
    spec = VQSpec(16, **SMALL)
    g = torch.Generator().manual_seed(2)
    centers = 3 * torch.randn(40, 16, generator=g)
    x = centers[torch.randint(0, 40, (2000,), generator=g)] + 0.2 * torch.randn(2000, 16, generator=g)
    meta = train_vq(x, spec, seed=0)
    assert torch.equal(train_vq(x, spec, seed=0), meta)  # deterministic
    x_hat = ops.dequantize_memory(encode_vq(x, meta).reshape(-1, 1, 1, spec.code_size), meta, "vq", out_dtype=torch.float32)
    err = (x_hat.reshape(-1, 16) - x).norm() / x.norm()
    assert err < 0.1, err  # 40 clusters, 64 x 64 coarse cells: the noise is what is left
    with pytest.raises(ValueError, match="at least 256 training vectors"):  # OPQ's PQ: 256 centroids
        train_vq(x[:255], spec)


@pytest.mark.parametrize("D", [4, 12, 20, 520])
def test_unsupported_head_dims_are_refused(D):
    with pytest.raises(ValueError, match="multiples of 8"):
        VQSpec(D)
    with pytest.raises(ValueError, match="multiples of 8"):
        Bank.create("/nonexistent/never", shape=MemoryShape(1, 1, 8, D), fingerprint="f", codec="vq")


def test_ids_gather_and_output_dtypes():
    spec = VQSpec(32)
    meta = known_meta(spec, seed=3)
    codes = random_codes(spec, 7 * 2 * 8, seed=4).reshape(7, 2, 8, 14)
    full = ops.dequantize_memory(codes, meta, "vq", out_dtype=torch.float32)
    ids = torch.tensor([[6, -1, 0], [3, 3, -1]])
    got = ops.dequantize_memory(codes, meta, "vq", ids=ids, out_dtype=torch.float32)
    assert got.shape == (2, 3, 2, 8, 32)
    assert torch.equal(got[ids >= 0], full[ids[ids >= 0]]) and got[ids < 0].abs().max() == 0
    ref = reference.dequantize_memory_ref(codes, meta, "vq", ids=ids.int(), out_dtype=torch.float32)
    assert (ref - got).abs().max() <= 1e-5 * got.abs().max()
    for dt in (torch.bfloat16, torch.float16, torch.float64):  # decoded in float32, then rounded once
        assert torch.equal(ops.dequantize_memory(codes, meta, "vq", ids=ids, out_dtype=dt), got.to(dt))
    assert ops.dequantize_memory(codes, meta, "vq").dtype == torch.bfloat16


def test_list_numbers_past_nlist_decode_inside_the_tables():
    # FAISS aborts the process on such codes; ours keep the low bits, kernel = reference
    spec = VQSpec(16, **SMALL)
    meta = known_meta(spec, seed=5)
    codes = torch.randint(0, 256, (20, 1, 8, spec.code_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    codes[..., 1] |= 0xF0  # list number >= 2^12
    got = ops.dequantize_memory(codes, meta, "vq", out_dtype=torch.float32)
    masked = codes.clone()
    masked[..., 1] &= 0x0F
    assert torch.equal(got, ops.dequantize_memory(masked, meta, "vq", out_dtype=torch.float32))
    ref = reference.dequantize_memory_ref(codes, meta, "vq", out_dtype=torch.float32)
    assert (ref - got).abs().max() <= 1e-5 * got.abs().max()


def test_bad_meta_and_codes_are_refused():
    spec = VQSpec(16, **SMALL)
    meta = known_meta(spec)
    codes = random_codes(spec, 8).reshape(2, 1, 4, spec.code_size)
    bad_format = meta.clone()
    bad_format[0, 0] = 2
    with pytest.raises(ValueError, match="header"):
        ops.dequantize_memory(codes, bad_format, "vq")
    with pytest.raises(ValueError, match="rows"):
        ops.dequantize_memory(codes, meta[:-1], "vq")
    with pytest.raises(ValueError, match=r"codes must be \[N, Hkv, M, 7\]"):
        ops.dequantize_memory(codes[..., :6], meta, "vq")
    with pytest.raises(ValueError, match="uint8"):
        ops.dequantize_memory(codes.to(torch.int8), meta, "vq")
    with pytest.raises(RuntimeError, match="outside"):
        ops.dequantize_memory(codes, meta, "vq", ids=torch.tensor([2]))
    # the kernel's own checks, behind the Python ones
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.memory3.dequantize_memory(codes, meta[:-1], "vq")
    with pytest.raises(RuntimeError, match="format"):
        torch.ops.memory3.dequantize_memory(codes, bad_format, "vq")


def test_opcheck():
    spec = VQSpec(16, **SMALL)
    meta = known_meta(spec)
    codes = random_codes(spec, 12).reshape(3, 1, 4, spec.code_size)
    for ids in (None, torch.tensor([[2, -1], [0, 1]])):
        torch.library.opcheck(torch.ops.memory3.dequantize_memory.default, (codes, meta, "vq", ids, torch.float32))


def test_bank_with_the_vq_codec(tmp_path):
    shape = MemoryShape(layers=2, kv_heads=2, tokens=8, head_dim=16)
    mem = torch.randn(40, *shape.memory, generator=torch.Generator().manual_seed(7))
    small = Bank.create(tmp_path / "few", shape=shape, fingerprint="f00d", codec="vq")
    assert small.codec.min_train_memories == 1024
    with pytest.raises(ValueError, match="1024 memories"):  # 2^14 vectors / (2 heads x 8 tokens)
        small.append(["a"], ["text"], mem[:1])
    bank = Bank.create(tmp_path / "b", shape=shape, fingerprint="f00d", codec="vq", codec_config=SMALL, dtype=torch.float32)
    bank.append([f"r{i}" for i in range(40)], [f"text {i}" for i in range(40)], mem)
    ids = torch.tensor([5, -1, 39])
    got = bank.gather(ids)  # [L, 2, 3, Hkv, M, D]
    assert got.shape == (2, 2, 3, 2, 8, 16) and got[:, :, 1].abs().max() == 0
    for l in range(2):
        for kv, name in enumerate("kv"):
            meta = bank.codec.metas[f"layer{l}.{name}"]
            want = faiss_decode(meta, encode_vq(mem[[5, 39], l, kv], meta)).reshape(2, 2, 8, 16)
            assert (got[l, kv, [0, 2]] - want).abs().max() <= 1e-5 * want.abs().max()
    err = (got[:, :, [0, 2]] - mem[[5, 39]].movedim((1, 2), (0, 1))).norm() / mem[[5, 39]].norm()
    assert err < 0.6, err  # Gaussian data, 64 x 64 coarse cells: a weak but real code
    again = Bank.open(tmp_path / "b", dtype=torch.float32)
    assert again.manifest.codec["name"] == "vq" and torch.equal(again.gather(ids), got)


def test_quantize_memory_encodes_with_faiss():
    spec = VQSpec(16, **SMALL)
    meta = known_meta(spec, seed=8)
    x = torch.randn(5, 2, 4, 16, generator=torch.Generator().manual_seed(9))
    codes, got_meta = ops.quantize_memory(x, "vq", codebook=meta)
    assert got_meta is meta and codes.shape == (5, 2, 4, spec.code_size) and codes.dtype == torch.uint8
    assert torch.equal(codes.reshape(-1, spec.code_size), torch.from_numpy(faiss_from_meta(meta).sa_encode(x.reshape(-1, 16).numpy())))
    assert torch.equal(reference.quantize_memory_ref(x, "vq", meta)[0], codes)
    with pytest.raises(ValueError, match="at least 16384 training vectors"):  # the paper's 2x14, no meta given
        ops.quantize_memory(x, "vq")
    with pytest.raises(ValueError, match=r"vq meta must be \[1 \+ D"):
        ops.quantize_memory(x, "vq", codebook=meta[:, :8])
    with pytest.raises(RuntimeError, match="vq encodes with FAISS"):  # the compiled op decodes only
        torch.ops.memory3.quantize_memory(x, "vq")


def test_encode_trains_vq_on_enough_references(tmp_path, monkeypatch):
    # A vq codec on small heads needs more references than one append holds: encode_into
    # trains it on min_train_memories references first (here 16, with 8 per append).
    from generate_fixtures import TrigramEmbedder, reference_texts, tiny_model

    from memory3.memory import encode
    from memory3.model import Memory3Tokenizer, fingerprint

    monkeypatch.setattr(encode, "APPEND_BATCH", 8)
    model, tokenizer, emb = tiny_model(), Memory3Tokenizer.byte_level(), TrigramEmbedder()
    c = model.config
    shape = MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens, c.head_dim)
    bank = Bank.create(tmp_path / "b", shape=shape, fingerprint=fingerprint(model), codec="vq", codec_config=SMALL,
                       embedder=emb.spec(), dtype=torch.float32)
    assert bank.codec.min_train_memories == 16  # 256 vectors / (2 heads x 8 tokens)
    records = [encode.KBRecord(f"r{i}", t, None) for i, t in enumerate(reference_texts(20))]
    encode.encode_into(bank, model, tokenizer, emb, records, progress=False)
    assert len(bank) == 20 and not bank.codec.needs_training()
