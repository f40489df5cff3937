"""bf16 memory_attention on the CPU both ways: with the decode's scores q . k on the bf16
dot-product unit (AVX512-BF16, chosen at run time when the CPU has it) and with
MEMORY3_CPU_BF16=off, the float path every CPU runs. Each is held to the float64 reference
with the float32-accumulation cap (a kernel that accumulates in float32 and rounds once),
across the decode (every KV head in one item, masked tails for D % 32 != 0, split over the
context at 2-4 threads), the prefill (float GEMM either way, and its one-query blocks),
odd head dims, GQA 1 and 5, ragged kv_lens and an int8 bank."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase, low_precision_errors, require_kernel


def cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


@pytest.fixture(params=["auto", "off"])
def isa(request, monkeypatch) -> str:
    monkeypatch.setenv("MEMORY3_CPU_BF16", request.param)
    return request.param


@pytest.fixture(params=[1, 2, 4])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def exact(args: dict) -> torch.Tensor:
    wide = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n not in
            ("mem_k_scale", "mem_v_scale") else t for n, t in args.items()}
    return memory_attention_ref(**wide)


def assert_matches_reference(args: dict) -> None:
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = exact(args)
    err, _, over_cap = low_precision_errors(out, ref_out, out)
    assert over_cap <= 1.0, f"max error {err:.3g} is {over_cap:.2f}x the float32-accumulation cap"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-5, rtol=2e-5)


SHAPES = {  # T, S, kv_lens
    "decode": dict(T=1, S=300),
    "ragged_decode": dict(T=1, S=300, kv_lens=[290, 1, 70]),
    "prefill": dict(T=70, S=70),
    "chunked_prefill": dict(T=37, S=150),
    "ragged_prefill": dict(T=40, S=90, kv_lens=[90, 25, 60]),  # padded queries in 2 sequences
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 64), (5, 1, 80), (10, 2, 7), (4, 4, 40), (8, 2, 33)])
def test_bf16_matches_reference(isa, shape, Hq, Hkv, D):
    """Head dims: a multiple of 32, 80 (a 16-column tail), 7 and 33 (odd: masked tails in the
    decode, the float path in the prefill), 40; GQA 4, 5 and 1."""
    require_kernel("memory_attention", "cpu")
    case = AttentionCase(B=3, Hq=Hq, Hkv=Hkv, D=D, dtype=torch.bfloat16, chunk_size=16, chunk_start=3, **SHAPES[shape])
    assert_matches_reference(case.make())


@pytest.mark.parametrize("shape", ["decode", "ragged_decode", "ragged_prefill"])
def test_bf16_int8_bank_matches_reference(isa, shape):
    require_kernel("memory_attention", "cpu")
    case = AttentionCase(B=3, Hq=10, Hkv=2, D=80, dtype=torch.bfloat16, int8_bank=True, **SHAPES[shape])
    assert_matches_reference(case.make())


@pytest.mark.parametrize("B,kv_lens", [(1, None), (3, [300, 1, 130]), (2, [0, 299])])
def test_bf16_decode_split_matches_reference(isa, threads, B, kv_lens):
    """1-4 threads on 1-3 sequences: the decode cuts each context into parts so every thread
    gets the same number of items, and merges them (an empty sequence: zero output, lse -inf)."""
    require_kernel("memory_attention", "cpu")
    case = AttentionCase(B=B, T=1, S=300, Hq=10, Hkv=2, D=64, N=20, chunk_size=64, chunk_start=7,
                         dtype=torch.bfloat16, kv_lens=kv_lens)
    assert_matches_reference(case.make())


@pytest.mark.parametrize("T", [1, 70])
def test_auto_uses_the_bf16_unit_in_the_decode_where_the_cpu_has_it(monkeypatch, T):
    """The two decode paths round differently (exact bf16 products, the scale applied to the
    float score, another order of the sums), so on a CPU with AVX512-BF16 "auto" and "off"
    give different lse bits; without it "auto" is the float path. Scores of ~100 (q x 32,
    exact in bf16) make a last-bit difference in a score show in lse. The prefill (T=70)
    runs the float GEMM either way: the same bits."""
    require_kernel("memory_attention", "cpu")
    args = AttentionCase(B=2, T=T, S=200, Hq=8, Hkv=2, D=80, dtype=torch.bfloat16).make()
    args["q"] = args["q"] * 32
    monkeypatch.setenv("MEMORY3_CPU_BF16", "off")
    _, lse_off = ops.memory_attention(**args)
    monkeypatch.setenv("MEMORY3_CPU_BF16", "auto")
    _, lse_auto = ops.memory_attention(**args)
    assert torch.equal(lse_auto, lse_off) != (T == 1 and cpu_has_bf16_dot())


def test_off_is_the_float_path_and_auto_the_unit(monkeypatch):
    """Which switch value takes which path: a prefill whose last query block holds one query
    computes that query with the decode's float code (the prefill never uses the unit), so
    its last row is bit for bit a float-path decode of the same query. "off" must give those
    bits, "auto" other bits on a CPU with AVX512-BF16 (the same bits without it)."""
    require_kernel("memory_attention", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # no split of the decode: the same sums as the prefill's row
    try:
        # G = 4: query blocks of 16, so T = 17 ends in a block of one query
        args = AttentionCase(B=2, T=17, S=200, Hq=8, Hkv=2, D=80, dtype=torch.bfloat16).make()
        args["q"] = args["q"] * 32
        out_pre, lse_pre = ops.memory_attention(**args)
        last = dict(args, q=args["q"][:, -1:].contiguous())
        monkeypatch.setenv("MEMORY3_CPU_BF16", "off")
        out_off, lse_off = ops.memory_attention(**last)
        monkeypatch.setenv("MEMORY3_CPU_BF16", "auto")
        _, lse_auto = ops.memory_attention(**last)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out_off, out_pre[:, -1:]) and torch.equal(lse_off, lse_pre[:, :, -1:])
    assert torch.equal(lse_auto, lse_off) != cpu_has_bf16_dot()


def test_unknown_switch_value_raises(monkeypatch):
    args = AttentionCase(dtype=torch.bfloat16).make()
    monkeypatch.setenv("MEMORY3_CPU_BF16", "on")
    with pytest.raises(ValueError, match="MEMORY3_CPU_BF16=on is not one of: auto, off"):
        ops.memory_attention(**args)
