"""memory_attention on the CPU: the compiled kernel against memory3.reference.

    python bench/bench_memory_attention.py                 # table of every preset
    python bench/bench_memory_attention.py --preset decode --dtype bfloat16
    pytest bench/bench_memory_attention.py --benchmark-enable

Times are medians of repeated calls in one process (torch's intra-op threads: all cores).
Peak memory is measured in a fresh subprocess as the growth of its maximum resident set
over one call, so it shows whether a path materialises the T x S score matrix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import verify
from timing import median_time

from memory3 import ops
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Decode and prefill at B=4, Hq=8, Hkv=2, D=64, 5 memories x 8 tokens per 64-token chunk;
# plus the paper's head shape (Hq=40, Hkv=8, D=80) at a CPU-sized batch.
PRESETS = {
    "decode": AttentionCase(B=4, T=1, S=2048, Hq=8, Hkv=2, D=64, N=1000, M=8, R=5, chunk_size=64,
                            chunk_start=0, empty_slot_frac=0.0),
    "prefill": AttentionCase(B=4, T=512, S=512, Hq=8, Hkv=2, D=64, N=1000, M=8, R=5, chunk_size=64,
                             chunk_start=0, empty_slot_frac=0.0),
    "prefill_2k": AttentionCase(B=1, T=2048, S=2048, Hq=8, Hkv=2, D=64, N=1000, M=8, R=5, chunk_size=64,
                                chunk_start=0, empty_slot_frac=0.0),
    "paper_heads_decode": AttentionCase(B=4, T=1, S=2048, Hq=40, Hkv=8, D=80, N=1000, M=8, R=5,
                                        chunk_size=64, chunk_start=0, empty_slot_frac=0.0),
}


def kernel_call(args: dict):
    return ops.memory_attention(**args)


def reference_call(args: dict):
    return memory_attention_ref(**args)


def training_step(call, args: dict, grads: dict):
    """Forward + backward through out, for q, k, v and the bank (the trainer's case)."""
    out, _ = call(args)
    torch.autograd.backward(out, grads["dout"])
    for name in LEAVES:
        args[name].grad = None


BANK = ("mem_k", "mem_v")
LEAVES = ("q", "k", "v", *BANK)


def check_against_reference(name: str, args: dict, backward: bool = False) -> None:
    """Once, before timing: the kernel's out and lse (and, for backward, the gradients of q,
    k, v and the bank) agree with the reference computed in float32."""
    with torch.no_grad():
        out, lse = kernel_call(args)
        ref_out, ref_lse = reference_call(args)
    verify.attention_output(name, out, ref_out)
    verify.lse(name, lse, ref_lse)
    if backward:
        leaves = [args[n] for n in LEAVES]
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
        got = torch.autograd.grad(kernel_call(args)[0], leaves, dout)
        want = torch.autograd.grad(reference_call(args)[0], leaves, dout)
        verify.relative(name + " backward", got, want, 1e-3 if out.dtype == torch.float32 else 2e-2)


def flops(case: AttentionCase) -> float:
    """Useful flops: QK and PV over the causal context and each query's chunk memories."""
    context = sum(case.S - case.T + i + 1 for i in range(case.T))
    memory_keys = case.R * case.M * case.T
    return 4.0 * case.B * case.Hq * case.D * (context + memory_keys)


def peak_extra_mb(preset: str, dtype: str, path: str) -> float:
    """Growth of the max RSS of a fresh process over one call of `path` (kernel|reference)."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak-rss", path, "--preset", preset, "--dtype", dtype],
        capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def high_water_rss_mb() -> float:
    """Peak resident set of this process. VmHWM belongs to the address space, so unlike
    ru_maxrss it does not carry over the parent's peak through fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _child_peak_rss(path: str, preset: str, dtype: str) -> None:
    case = dataclasses.replace(PRESETS[preset], dtype=DTYPES[dtype])
    args = case.make()
    small = dataclasses.replace(case, T=1, S=case.chunk_size).make()
    fn = kernel_call if path == "kernel" else reference_call
    fn(small)  # load code paths and thread pools before the baseline
    before = high_water_rss_mb()
    fn(args)
    print(high_water_rss_mb() - before)


def measure(preset: str, dtype: str = "float32", with_memory: bool = True, backward: bool = False) -> dict:
    """One row of the table: kernel and reference medians, speedup, GFLOP/s, peak growth.
    With backward=True the times are of forward + backward (gradients for q, k, v, bank)."""
    case = dataclasses.replace(PRESETS[preset], dtype=DTYPES[dtype])
    args = case.make(requires_grad=backward)
    check_against_reference(f"memory_attention {preset} {dtype}", args, backward)
    if backward:
        grads = {"dout": torch.randn(case.B, case.T, case.Hq, case.D).to(case.dtype)}
        kernel_s = median_time(lambda: training_step(kernel_call, args, grads), budget_s=2.0)
        reference_s = median_time(lambda: training_step(reference_call, args, grads), warmup=1, budget_s=2.0)
        with_memory = False
    else:
        kernel_s = median_time(lambda: kernel_call(args), budget_s=2.0)
        reference_s = median_time(lambda: reference_call(args), warmup=1, budget_s=2.0)
    row = {
        "op": "memory_attention" + (" fwd+bwd" if backward else ""),
        "case": f"{preset} {dtype}",
        "shape": f"B={case.B} T={case.T} S={case.S} Hq={case.Hq} Hkv={case.Hkv} D={case.D} mem={case.R}x{case.M}",
        "kernel_ms": kernel_s * 1e3,
        "reference_ms": reference_s * 1e3,
        "speedup": reference_s / kernel_s,
        "kernel_gflops": flops(case) * (3.5 if backward else 1.0) / kernel_s / 1e9,  # bwd: 2.5x fwd
        "threads": torch.get_num_threads(),
    }
    if with_memory:
        row["kernel_peak_mb"] = peak_extra_mb(preset, dtype, "kernel")
        row["reference_peak_mb"] = peak_extra_mb(preset, dtype, "reference")
        row["output_mb"] = case.B * case.T * case.Hq * case.D * torch.finfo(case.dtype).bits / 8 / 2**20
    return row


# ------------------------------------------------------------ against what a user runs instead

def sdpa_without_memory(args: dict) -> torch.Tensor:
    """The no-memory floor: scaled_dot_product_attention over the context alone (GQA, causal
    for prefill), on the same [B, T, H, D] tensors as views."""
    q, k, v = (args[n].transpose(1, 2) for n in ("q", "k", "v"))
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)


def naive_memory_sdpa(args: dict) -> torch.Tensor:
    """Memory attention the plain way: index the bank by id, concatenate the memories in front
    of the context, one masked SDPA (each query sees its chunk's memories and the causal
    context). Full sequences (kv_lens=None), as in the presets."""
    q, k, v, ids = args["q"], args["k"], args["v"], args["mem_ids"].long()
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    C, R = ids.shape[1], ids.shape[2]
    M = args["mem_k"].shape[2]
    if T == 1:  # decode: only the last chunk's memories
        ids = ids[:, (S - 1 - args["chunk_start"]) // args["chunk_size"]][:, None]
        C = 1
    mk = args["mem_k"][ids.clamp(min=0)].permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D)
    mv = args["mem_v"][ids.clamp(min=0)].permute(0, 3, 1, 2, 4, 5).reshape(B, Hkv, C * R * M, D)
    keys = torch.cat([mk, k.transpose(1, 2)], dim=2)
    values = torch.cat([mv, v.transpose(1, 2)], dim=2)
    pos = torch.arange(S - T, S)
    col_chunk = torch.arange(C).repeat_interleave(R * M)
    q_chunk = (pos - args["chunk_start"]).div(args["chunk_size"], rounding_mode="floor")
    mem_mask = (q_chunk[:, None] == col_chunk[None, :]) if T > 1 else torch.ones(1, C * R * M, dtype=torch.bool)
    mem_mask = mem_mask[None] & (ids >= 0).repeat_interleave(M, dim=2).reshape(B, 1, C * R * M)
    ctx_mask = (torch.arange(S)[None, :] <= pos[:, None]).expand(B, T, S)
    mask = torch.cat([mem_mask, ctx_mask], dim=-1)[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)


def interleaved_medians(fns: list, repeats: int = 30, budget_s: float = 4.0) -> list[float]:
    """Median seconds of each fn, called in turn (a, b, c, a, b, c, ...) so that load on a
    shared machine falls on all of them alike."""
    for fn in fns:
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < repeats and (len(times[0]) < 5 or time.perf_counter() - start < budget_s):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def matmul_gflops(dtype: torch.dtype, n: int = 512) -> float:
    """The machine's matmul rate (torch.matmul, n^3, this thread count): the ceiling."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    (s,) = interleaved_medians([lambda: torch.matmul(a, b)], repeats=20, budget_s=1.0)
    return 2.0 * n**3 / s / 1e9


# The four cases of the comparison (bank of 10,000 memories as in issue 15).
VERSUS_CASES = [("decode", "float32"), ("prefill", "float32"), ("paper_heads_decode", "float32"),
                ("prefill", "bfloat16"), ("decode", "bfloat16")]


def versus(preset: str, dtype: str, backward: bool = False, budget_s: float = 4.0) -> dict:
    """memory3 against SDPA without memory and against the naive path, interleaved. With
    backward=True: forward + backward (grads of q, k, v; the bank frozen, as SDPA has none)
    against autograd through SDPA without memory, the kernel's forward + backward over its
    forward, and the same step with the whole 10,000-row bank trainable (a dense bank gradient)."""
    case = dataclasses.replace(PRESETS[preset], dtype=DTYPES[dtype], N=10000)
    args = case.make(requires_grad=backward)
    for name in BANK:
        args[name] = args[name].detach()
    with torch.no_grad():  # the naive path computes the same thing (bf16: SDPA's own rounding)
        verify.relative(f"naive path {preset} {dtype}", [naive_memory_sdpa(args).transpose(1, 2)],
                        [memory_attention_ref(**args)[0]], 1e-3 if case.dtype == torch.float32 else 2e-2)
    check_against_reference(f"memory_attention {preset} {dtype}", args)
    row = {"case": f"{preset} {dtype}", "threads": torch.get_num_threads()}
    if backward:
        dout = torch.randn(case.B, case.T, case.Hq, case.D).to(case.dtype)
        leaves = [args["q"], args["k"], args["v"]]

        def fwd():
            with torch.no_grad():
                kernel_call(args)

        def step(fn, transpose):
            out = fn(args)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out, leaves, dout.transpose(1, 2) if transpose else dout)

        trainable = dict(args, **{name: args[name].detach().requires_grad_() for name in BANK})

        def bank_step():
            out, _ = kernel_call(trainable)
            torch.autograd.grad(out, leaves, dout)

        k, s, f, kb = interleaved_medians([lambda: step(kernel_call, False), lambda: step(sdpa_without_memory, True),
                                           fwd, bank_step], budget_s=budget_s)
        row.update(kernel_ms=k * 1e3, sdpa_ms=s * 1e3, forward_ms=f * 1e3, vs_sdpa=k / s, vs_forward=k / f,
                   bank_grad_ms=kb * 1e3)
        return row
    with torch.no_grad():
        k, s, n = interleaved_medians([lambda: kernel_call(args), lambda: sdpa_without_memory(args),
                                       lambda: naive_memory_sdpa(args)], budget_s=budget_s)
    row.update(kernel_ms=k * 1e3, sdpa_ms=s * 1e3, naive_ms=n * 1e3, vs_sdpa=k / s, vs_naive=k / n,
               kernel_gflops=flops(case) / k / 1e9)
    return row


# ---------------------------------------------------------------------------- pytest-benchmark

@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("preset", ["decode", "prefill"])
def test_memory_attention(benchmark, preset, impl):
    benchmark.group = f"memory_attention {preset}"
    args = PRESETS[preset].make()
    check_against_reference(f"memory_attention {preset}", args)
    benchmark(kernel_call if impl == "kernel" else reference_call, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append", help="default: all")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    parser.add_argument("--peak-rss", choices=["kernel", "reference"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.peak_rss:
        _child_peak_rss(a.peak_rss, a.preset[0], a.dtype)
        return
    for preset in a.preset or list(PRESETS):
        row = measure(preset, a.dtype, with_memory=not a.no_memory, backward=a.backward)
        if a.json:
            print(json.dumps(row))
        else:
            mem = (f"  peak +{row['kernel_peak_mb']:.1f} MB vs +{row['reference_peak_mb']:.1f} MB"
                   if "kernel_peak_mb" in row else "")
            print(f"{row['case']:<28} kernel {row['kernel_ms']:9.3f} ms  reference {row['reference_ms']:9.3f} ms"
                  f"  x{row['speedup']:.1f}  {row['kernel_gflops']:.1f} GFLOP/s{mem}")


if __name__ == "__main__":
    main()
