"""memory_attention's CUDA kernel (csrc/include/memory3/decode_attention.cuh) against
memory3.reference in float64 and against the CPU kernel: decode and short query blocks (the
split-K path and its merge), T > 16 (the long-query path), every GQA ratio (5 included),
head dims 64/80/96/128 and odd ones (the element-load path), float and int8 banks, ragged
kv_lens, chunk_start, strided and unaligned inputs, outputs poisoned with NaN before each
run, and the device-side range checks. Skipped without a GPU."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from cuda_poison import poison_cache  # outputs' blocks hold NaN before each run

from memory3 import ops
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def cuda_kernel():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("memory3::memory_attention", "CUDA"):
        pytest.skip("memory3::memory_attention has no CUDA kernel in this build")


def run(args: dict):
    poison_cache()
    out, lse = ops.memory_attention(**args)
    torch.cuda.synchronize()
    return out, lse


def reference(args: dict):
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return memory_attention_ref(**cpu, compute_dtype=torch.float64)


def exact_out(args: dict) -> torch.Tensor:
    """The reference on the inputs upcast to float64, left in float64."""
    wide = {n: (t.cpu().double() if t.is_floating_point() and n not in ("mem_k_scale", "mem_v_scale") else t.cpu())
            if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    return memory_attention_ref(**wide)[0]


def check(args: dict, out, lse) -> None:
    ref_out, ref_lse = reference(args)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any(), "an output element was never written"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "queries that see no key must have lse -inf"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=1e-4, rtol=1e-4)
    if out.dtype in (torch.float32, torch.float64):
        tol = 2e-5 if out.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out.double(), ref_out.double(), atol=tol, rtol=tol)
        return
    # bf16/fp16: FlashAttention's 2x rule against PyTorch in that dtype, and the float32
    # accumulation cap (half an ulp of the exact answer plus float32's own error).
    low, _ = memory_attention_ref(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                  compute_dtype=out.dtype)
    err = (out.double() - ref_out.double()).abs().max().item()
    torch_err = (low.double() - ref_out.double()).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    exact = exact_out(args)
    cap = 0.5 * torch.finfo(out.dtype).eps * exact.abs() * (1 + 1e-3) + 1e-5
    assert bool(((out.double() - exact).abs() <= cap).all()), (out.double() - exact).abs().max().item()


GQA = [(8, 8), (8, 2), (40, 8), (10, 2), (5, 1), (32, 1), (12, 4)]  # ratios 1, 4, 5, 5, 5, 32 (> 16 rows), 3
DECODE = dict(T=1, S=301, chunk_size=64, chunk_start=5, N=50, M=8, R=5)


@pytest.mark.parametrize("Hq,Hkv", GQA)
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_decode_float32_every_group_and_head_dim(Hq, Hkv, D):
    args = AttentionCase(B=3, Hq=Hq, Hkv=Hkv, D=D, **DECODE).make("cuda")
    check(args, *run(args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
@pytest.mark.parametrize("int8_bank", [False, True])
def test_decode_low_precision(dtype, D, int8_bank):
    args = AttentionCase(B=2, Hq=40, Hkv=8, D=D, dtype=dtype, int8_bank=int8_bank, **DECODE).make("cuda")
    check(args, *run(args))


@pytest.mark.parametrize("D", [7, 48, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_odd_head_dims_take_the_element_path(D, dtype):
    args = AttentionCase(B=2, Hq=10, Hkv=2, D=D, dtype=dtype, **DECODE).make("cuda")
    check(args, *run(args))


@pytest.mark.parametrize("T", [2, 7, 16, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_and_long_query_blocks(T, dtype):
    """T <= 16: the decode kernel with rows packed across queries (chunk boundaries inside a
    block); T > 16: the long-query path."""
    args = AttentionCase(B=2, T=T, S=150, Hq=10, Hkv=2, D=80, dtype=dtype, chunk_size=7, chunk_start=3,
                         kv_lens=[150, 60]).make("cuda")
    check(args, *run(args))


@pytest.mark.parametrize("S,kv_lens", [(4000, [4000]), (5000, [1234]), (3000, [0]), (2500, [17])])
def test_split_context_is_merged(S, kv_lens):
    """B=1 leaves SMs idle: the context is split and merged by log-sum-exp; splits past a
    short sequence are empty (lse -inf) and must not disturb the merge."""
    args = AttentionCase(B=1, S=S, Hq=8, Hkv=2, D=128, kv_lens=kv_lens, chunk_start=0, chunk_size=64,
                         N=20).make("cuda")
    check(args, *run(args))


def test_ragged_lengths_padded_queries_and_prefix():
    """kv_lens 0 and shorter than T (padded queries: out 0, lse -inf), queries inside the
    reference prefix (no memories), empty slots."""
    args = AttentionCase(B=4, T=6, S=90, Hq=8, Hkv=2, D=64, chunk_size=16, chunk_start=20,
                         kv_lens=[90, 3, 0, 22], empty_slot_frac=0.5).make("cuda")
    out, lse = run(args)
    check(args, out, lse)
    assert bool((out[2] == 0).all()) and bool(torch.isneginf(lse[2]).all())


@pytest.mark.parametrize("int8_bank", [False, True])
def test_cuda_agrees_with_cpu(int8_bank):
    case = AttentionCase(B=3, T=3, S=700, Hq=40, Hkv=8, D=80, N=64, int8_bank=int8_bank, kv_lens=[700, 401, 64])
    gpu = run(case.make("cuda"))
    cpu = ops.memory_attention(**case.make("cpu"))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=2e-5, rtol=2e-5)


def test_strided_and_unaligned_inputs():
    """k/v sliced out of a wider cache (strided rows), a bank sliced from stacked layers, and
    an odd element offset (rows no longer 16-byte aligned: the element path)."""
    case = AttentionCase(B=2, S=200, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16)
    args = case.make("cuda")
    wide = torch.randn(2, 200, 3, 64, device="cuda").to(torch.bfloat16)
    wide[:, :, :2] = args["k"]
    strided = dict(args, k=wide[:, :, :2])
    stacked = torch.stack([args["mem_k"], args["mem_k"] * 2], dim=1)  # [N, layers, Hkv, M, D]
    strided["mem_k"] = stacked[:, 0]
    flat = torch.empty(args["v"].numel() + 1, dtype=torch.bfloat16, device="cuda")
    odd = flat[1:].view(args["v"].shape)  # 2 bytes past a 16-byte boundary
    odd.copy_(args["v"])
    strided["v"] = odd
    check(strided, *run(strided))
    want, got = run(args), run(strided)  # 16-byte path vs element path: the same sums in the same order
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------- range checks


def _case_args():
    return AttentionCase(B=2, T=1, S=40, Hq=8, Hkv=2, D=64, N=33, chunk_size=16, chunk_start=3).make("cuda")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a["mem_ids"].fill_(33), r"mem_ids holds 33 at flat index \d+, outside \[-1, N=33\)"),
        (lambda a: a["mem_ids"].fill_(-2), r"mem_ids holds -2"),
        (lambda a: a.update(mem_ids=a["mem_ids"].long().fill_(2**40)), r"mem_ids holds 1099511627776"),
        (lambda a: a.update(kv_lens=torch.tensor([40, 41], dtype=torch.int32, device="cuda")),
         r"kv_lens\[1\] = 41 is outside \[0, S=40\]"),
        (lambda a: a.update(kv_lens=torch.tensor([-1, 40], device="cuda")), r"kv_lens\[0\] = -1 is outside"),
        (lambda a: a.update(kv_lens=torch.tensor([40, 40], dtype=torch.int32, device="cuda"),
                            mem_ids=a["mem_ids"][:, :2].contiguous()),
         r"mem_ids has 2 chunks but sequence \d \(40 tokens\) needs 3"),
    ],
)
def test_bad_data_raises_after_the_kernel(change, match, monkeypatch):
    monkeypatch.delenv("MEMORY3_RANGE_CHECK", raising=False)
    args = _case_args()
    change(args)
    with pytest.raises(RuntimeError, match=match):
        ops.memory_attention(**args)
    ops.check_range_errors()  # the sync check cleared the words
    ops.memory_attention(**_case_args())  # and the next good call passes


def test_deferred_mode_records_and_check_raises(monkeypatch):
    monkeypatch.setenv("MEMORY3_RANGE_CHECK", "deferred")
    args = _case_args()
    args["mem_ids"][1, 0, 0] = 1000
    out, _ = ops.memory_attention(**args)  # no sync, no raise; the bad slot reads nothing
    assert not torch.isnan(out).any()
    with pytest.raises(RuntimeError, match=r"mem_ids holds 1000 at flat index \d+"):
        ops.check_range_errors()
    ops.check_range_errors()  # cleared


def test_cpu_only_checks_still_name_the_argument():
    args = _case_args()
    with pytest.raises(ValueError, match=r"k must have head dim"):
        ops.memory_attention(**dict(args, k=args["k"][..., :32], v=args["v"][..., :32]))
    with pytest.raises(RuntimeError, match=r"head dim D = 300 must be in \[1, 256\]"):
        big = AttentionCase(B=1, S=8, Hq=2, Hkv=1, D=300, N=4, chunk_size=16, chunk_start=0).make("cuda")
        ops.memory_attention(**big)


def test_case_fields_used_here_exist():
    names = {f.name for f in dataclasses.fields(AttentionCase)}
    assert {"B", "T", "S", "Hq", "Hkv", "D", "N", "M", "R", "kv_lens", "int8_bank", "chunk_start"} <= names
