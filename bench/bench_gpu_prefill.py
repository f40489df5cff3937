"""memory_attention prefill on the GPU (issue 13): the tensor-core forward and the backward
against what a user would run instead, as ratios measured in this run on this device.

    python bench/bench_gpu_prefill.py            # all shapes, markdown table (bench/gpu.sh runs this)
    python bench/bench_gpu_prefill.py --quick    # fewer repetitions
    python bench/bench_gpu_prefill.py --json     # rows as JSON lines too
    compute-sanitizer --tool racecheck python bench/bench_gpu_prefill.py --sanitize-case
                                                 # one small call of each kernel, checked

Per shape (bf16, B=4, T=S=4096, 5 memories x 8 tokens per 64-token chunk, bank of 200k
memories): the paper's heads (Hq=40, Hkv=8, D=80), Hq=32/Hkv=8 at D=128 and at D=64.
Columns: memory3's forward; SDPA causal on the context alone (no memory: the ceiling issue 13
measures against, k/v expanded to Hq heads beforehand so the FlashAttention backend runs);
the naive path (index the bank, concatenate, SDPA with a mask, gather included); TFLOP/s of
useful work (QK and PV over each query's causal context and its chunk's 40 memory keys) and
its share of the bf16 matmul rate measured here; then forward + backward against SDPA's.
Every kernel is checked against memory3.reference on a smaller case of the same heads
before anything is timed (bench/verify.py). Times are CUDA-event medians after warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import verify  # noqa: E402

from memory3 import ops  # noqa: E402
from memory3.reference import memory_attention_ref  # noqa: E402

CHUNK, R, M = 64, 5, 8


@dataclass(frozen=True)
class Shape:
    name: str
    Hq: int
    Hkv: int
    D: int
    B: int = 4
    T: int = 4096
    N: int = 200_000


SHAPES = [Shape("paper", 40, 8, 80), Shape("D=128", 32, 8, 128), Shape("D=64", 32, 8, 64)]


def make_args(s: Shape, B: int | None = None, T: int | None = None, N: int | None = None, requires_grad=False,
              seed: int = 0) -> dict:
    B, T, N = B or s.B, T or s.T, N or s.N
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)

    C = -(-T // CHUNK)
    ids = torch.randint(0, N, (B, C, R), generator=g, device="cuda", dtype=torch.int32)
    return dict(q=randn(B, T, s.Hq, s.D), k=randn(B, T, s.Hkv, s.D), v=randn(B, T, s.Hkv, s.D),
                mem_k=randn(N, s.Hkv, M, s.D), mem_v=randn(N, s.Hkv, M, s.D), mem_ids=ids, chunk_size=CHUNK,
                chunk_start=0)


def useful_flops(B: int, T: int, Hq: int, D: int) -> float:
    """QK and PV (2 flops per multiply-add, 2 products) over the causal context and each
    query's chunk memories: 4 B Hq D (T (T + 1) / 2 + T R M)."""
    return 4.0 * B * Hq * D * (T * (T + 1) / 2 + T * R * M)


@contextlib.contextmanager
def exact_p():
    """MEMORY3_PREFILL_P=exact: P fed to P V as two terms (one more MMA per step of P V than
    the default, FlashAttention's one-term rounded P)."""
    os.environ["MEMORY3_PREFILL_P"] = "exact"
    try:
        yield
    finally:
        del os.environ["MEMORY3_PREFILL_P"]


def kernel(args: dict) -> torch.Tensor:
    return ops.memory_attention(**args)[0]


def expanded_context(args: dict) -> tuple:
    """q, k, v as [B, H, T, D] with k/v repeated to the Hq query heads (outside the timing)."""
    G = args["q"].shape[2] // args["k"].shape[2]
    q = args["q"].transpose(1, 2)
    k, v = (args[n].repeat_interleave(G, dim=2).transpose(1, 2) for n in ("k", "v"))
    return q, k, v


def sdpa_causal(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def naive(args: dict) -> torch.Tensor:
    """Index the bank by id, concatenate the memories before the context, one masked SDPA."""
    q, k, v, ids = args["q"], args["k"], args["v"], args["mem_ids"].long()
    B, T, Hq, D = q.shape
    Hkv, C = k.shape[2], ids.shape[1]
    G = Hq // Hkv
    mk = args["mem_k"][ids.clamp(min=0)].permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D)
    mv = args["mem_v"][ids.clamp(min=0)].permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D)
    keys = torch.cat([mk, k.transpose(1, 2)], dim=2).repeat_interleave(G, dim=1)
    values = torch.cat([mv, v.transpose(1, 2)], dim=2).repeat_interleave(G, dim=1)
    pos = torch.arange(T, device=q.device)
    col_chunk = torch.arange(C, device=q.device).repeat_interleave(R * M)
    mem_mask = (pos // CHUNK)[:, None] == col_chunk[None, :]
    mem_mask = mem_mask[None] & (ids >= 0).repeat_interleave(M, dim=2).reshape(B, 1, C * R * M)
    ctx_mask = (torch.arange(T, device=q.device)[None, :] <= pos[:, None]).expand(B, T, T)
    mask = torch.cat([mem_mask, ctx_mask], dim=-1)[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask).transpose(1, 2)


def cuda_median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median of CUDA-event times of fn() (ms)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(n: int = 8192) -> float:
    """This device's dense bf16 matmul rate on random data (the compute ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2.0 * n**3 / (cuda_median_ms(lambda: a @ b, 10, 3) * 1e-3) / 1e12


def verify_shape(s: Shape) -> None:
    """The kernel's forward and backward against the reference on B=1, T=S=640 (the full
    shape's score matrix would not fit the reference), same heads and head dim."""
    args = make_args(s, B=1, T=640, N=1000, requires_grad=True, seed=1)
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = memory_attention_ref(**args)  # float32 compute
    verify.relative(f"prefill {s.name} forward", [out], [ref_out], 1e-2)
    verify.lse(f"prefill {s.name} lse", lse, ref_lse)
    with exact_p(), torch.no_grad():
        verify.relative(f"prefill {s.name} forward, exact P", [ops.memory_attention(**args)[0]], [ref_out], 1e-2)
    dout = torch.randn_like(out)
    names = ("q", "k", "v", "mem_k", "mem_v")
    leaves = [args[n] for n in names]
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref_out, leaves, dout)
    verify.relative(f"prefill {s.name} backward", got, want, 3e-2)
    with torch.no_grad():
        verify.relative(f"naive path {s.name}", [naive(args)], [ref_out], 2e-2)


def measure(s: Shape, peak_tflops: float, repeats: int, backward_repeats: int) -> dict:
    verify_shape(s)
    torch.cuda.empty_cache()
    args = make_args(s)
    q, k, v = expanded_context(args)
    flops = useful_flops(s.B, s.T, s.Hq, s.D)
    row = {"shape": s.name, "B": s.B, "T": s.T, "Hq": s.Hq, "Hkv": s.Hkv, "D": s.D}
    with torch.no_grad():
        row["kernel_ms"] = cuda_median_ms(lambda: kernel(args), repeats)
        with exact_p():
            row["kernel_exact_p_ms"] = cuda_median_ms(lambda: kernel(args), repeats)
        row["sdpa_ms"] = cuda_median_ms(lambda: sdpa_causal(q, k, v), repeats)
        row["naive_ms"] = cuda_median_ms(lambda: naive(args), max(3, repeats // 4))
    row["kernel_tflops"] = flops / (row["kernel_ms"] * 1e-3) / 1e12
    row["exact_p_vs_sdpa"] = row["kernel_exact_p_ms"] / row["sdpa_ms"]
    context_flops = 4.0 * s.B * s.Hq * s.D * s.T * (s.T + 1) / 2  # SDPA's useful work: no memory keys
    row["sdpa_tflops"] = context_flops / (row["sdpa_ms"] * 1e-3) / 1e12
    row["vs_sdpa"] = row["kernel_ms"] / row["sdpa_ms"]
    row["vs_naive"] = row["naive_ms"] / row["kernel_ms"]
    row["of_matmul"] = row["kernel_tflops"] / peak_tflops

    # Forward + backward (grads of q, k, v, mem_k, mem_v) against SDPA's (grads of q, k, v). As in
    # training, the memories are the batch's own (encoded with it): a bank of B * C * R rows,
    # each read once, not the 200k-row bank (whose dense gradient would be mostly zeros).
    del args
    torch.cuda.empty_cache()
    C = -(-s.T // CHUNK)
    args = make_args(s, N=s.B * C * R, requires_grad=True, seed=2)
    args["mem_ids"] = torch.randperm(s.B * C * R, device="cuda", dtype=torch.int32).view(s.B, C, R)
    q, k, v = (t.detach().requires_grad_(True) for t in expanded_context(args))
    dout = torch.randn(s.B, s.T, s.Hq, s.D, device="cuda", dtype=torch.bfloat16)
    leaves = [args[n] for n in ("q", "k", "v", "mem_k", "mem_v")]

    def kernel_step():
        torch.autograd.grad(kernel(args), leaves, dout)

    def sdpa_step():
        torch.autograd.grad(sdpa_causal(q, k, v), (q, k, v), dout.transpose(1, 2))

    row["kernel_fwd_bwd_ms"] = cuda_median_ms(kernel_step, backward_repeats, warmup=1)
    row["sdpa_fwd_bwd_ms"] = cuda_median_ms(sdpa_step, backward_repeats, warmup=1)
    row["kernel_bwd_ms"] = row["kernel_fwd_bwd_ms"] - row["kernel_ms"]
    row["sdpa_bwd_ms"] = row["sdpa_fwd_bwd_ms"] - row["sdpa_ms"]
    row["bwd_vs_fwd"] = row["kernel_bwd_ms"] / row["kernel_ms"]
    row["bwd_speed_vs_sdpa"] = row["sdpa_bwd_ms"] / row["kernel_bwd_ms"]
    del args, q, k, v, leaves
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict], peak: float, device: str) -> str:
    lines = [f"## memory_attention prefill on {device} (bf16, B=4, T=S=4096, 5 x 8 memory tokens per 64-token "
             f"chunk, bank 200k); bf16 matmul {peak:.0f} TFLOP/s measured here\n",
             "| shape | memory3 fwd ms (rounded P, default) | SDPA causal w/o memory ms | memory3 / SDPA (target <= 1.1) | "
             "exact-P fwd ms (/ SDPA) | naive ms | naive / memory3 (target >= 5) | TFLOP/s useful (% of matmul) | "
             "SDPA TFLOP/s | bwd ms | bwd / fwd (target <= 3) | SDPA bwd / memory3 bwd (target >= 0.8) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} (Hq={r['Hq']}, Hkv={r['Hkv']}, D={r['D']}) | {r['kernel_ms']:.3f} | {r['sdpa_ms']:.3f} | "
            f"{r['vs_sdpa']:.2f}x | {r['kernel_exact_p_ms']:.3f} ({r['exact_p_vs_sdpa']:.2f}x) | {r['naive_ms']:.3f} | {r['vs_naive']:.1f}x | {r['kernel_tflops']:.0f} "
            f"({100 * r['of_matmul']:.0f}%) | {r['sdpa_tflops']:.0f} | {r['kernel_bwd_ms']:.2f} | "
            f"{r['bwd_vs_fwd']:.2f}x | {r['bwd_speed_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def sanitize_case() -> None:
    """One small forward and backward of each kernel variant, checked against the reference:
    bf16 D=80 float bank (tensor-core forward and backward, bank grads), fp16 D=64 int8 bank,
    float32 D=48 (the CUDA-core backward); ragged lengths, several chunks per tile. For
    compute-sanitizer (memcheck, racecheck): bench/gpu_sanitize_cases.py calls this."""
    from memory3.testing import AttentionCase

    for dtype, D, int8, tol in ((torch.bfloat16, 80, False, 3e-2), (torch.float16, 64, True, 1e-2),
                                (torch.float32, 48, False, 1e-4)):
        case = AttentionCase(B=2, T=40, S=70, Hq=10, Hkv=2, D=D, N=20, chunk_size=16, chunk_start=3,
                             kv_lens=[70, 30], dtype=dtype, int8_bank=int8)
        args = case.make("cuda", requires_grad=True)
        if int8:
            for n in ("mem_k", "mem_v"):
                args[n] = args[n].detach()
        names = ("q", "k", "v") + (() if int8 else ("mem_k", "mem_v"))
        leaves = [args[n] for n in names]
        out, lse = ops.memory_attention(**args)
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, dout)
        ref_out, _ = memory_attention_ref(**args)
        want = torch.autograd.grad(ref_out, leaves, dout)
        verify.relative(f"sanitize case {dtype} D={D}", [out] + list(got), [ref_out] + list(want), tol)
    torch.cuda.synchronize()
    print("prefill sanitize cases done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines too")
    parser.add_argument("--sanitize-case", action="store_true", help="one small call per kernel, then exit")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    if a.sanitize_case:
        sanitize_case()
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    peak = matmul_tflops()
    repeats, backward_repeats = (5, 2) if a.quick else (20, 3)
    rows = []
    for s in SHAPES:
        rows.append(measure(s, peak, repeats, backward_repeats))
        if a.json:
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, peak, torch.cuda.get_device_name()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
