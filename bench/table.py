"""Every op's CPU kernel against its pure-PyTorch reference, as one markdown table.

    python bench/table.py            # all rows (about a minute on 2 cores)
    python bench/table.py --quick    # fewer repetitions, no peak-memory subprocesses
    python bench/table.py --versus-only --threads 1,2   # only memory_attention vs SDPA/naive

Rows: memory_attention presets (decode and prefill at B=4, Hq=8, Hkv=2, D=64, the paper's
head shape), gather_memory from a bf16 and an int8 bank, and each codec's quantize and
gather+dequantize. Ratios are measured in this run, on this machine.

First, memory_attention against what a user would run instead, per thread count: SDPA over
the context without any memory (the floor: memory adds 40 keys per query) and the naive path
(index the bank, concatenate, masked SDPA), kernel and alternatives called in turn so load
on a shared machine hits all alike; the machine's torch.matmul rate is the ceiling column.
"""
from __future__ import annotations

import argparse
import os
import platform

import torch

import bench_codecs
import bench_gather_memory
import bench_memory_attention
import bench_model
from timing import thread_counts


def rows(quick: bool) -> list[tuple]:
    repeats = 10 if quick else 50
    out = []
    for preset in bench_memory_attention.PRESETS:
        r = bench_memory_attention.measure(preset, "float32", with_memory=not quick)
        note = f"{r['kernel_gflops']:.1f} GFLOP/s"
        if "kernel_peak_mb" in r:
            note += f"; peak +{r['kernel_peak_mb']:.1f} MB (ref +{r['reference_peak_mb']:.1f} MB)"
        out.append(("memory_attention", r["case"], r["kernel_ms"], r["reference_ms"], r["speedup"], note))
    for bank in bench_gather_memory.BANKS:
        r = bench_gather_memory.measure(bank, repeats=repeats)
        note = f"{r['kernel_gbps']:.1f} GB/s = {100 * r['kernel_vs_copy']:.0f}% of copy"
        out.append(("gather_memory", f"{bank} bank", 1e3 * r["kernel_s"], 1e3 * r["reference_s"], r["speedup"], note))
    for codec in bench_codecs.CODECS:
        r = bench_codecs.measure(codec, repeats=repeats)
        note = f"{r['bytes_per_vector']} B/vector ({r['compression_vs_bf16']:.1f}x vs bf16), rel L2 {r['rel_l2']:.4f}"
        out.append(("quantize_memory", codec, 1e3 * r["quantize_s"], 1e3 * r["quantize_reference_s"],
                    r["quantize_speedup"], note))
        out.append(("dequantize_memory", f"{codec}, by id", 1e3 * r["dequantize_s"], 1e3 * r["dequantize_reference_s"],
                    r["dequantize_speedup"], ""))
    # The model: reference column = the same weights through transformers' Llama (no memory).
    r = bench_model.measure(steps=5 if quick else 20, budget_s=3.0 if quick else 8.0)
    for phase, case in (("prefill", f"prefill B={r['batch']} x {r['prompt']} tokens"),
                        ("decode", f"decode step B={r['batch']} at {r['prompt']}")):
        note = (f"{r[f'{phase}_memory_tok_s']:,.0f} tok/s with 5 memories/chunk = "
                f"{r[f'{phase}_memory_vs_plain']:.2f}x the time without memory; reference: transformers Llama")
        out.append((f"Memory3Model {r['preset']}", case, 1e3 * r[f"{phase}_memory_s"], 1e3 * r[f"{phase}_llama_s"],
                    r[f"{phase}_llama_s"] / r[f"{phase}_memory_s"], note))
    return out


def versus_rows(quick: bool) -> list[str]:
    budget = 1.5 if quick else 4.0
    fp32, bf16 = (bench_memory_attention.matmul_gflops(t) for t in (torch.float32, torch.bfloat16))
    lines = [f"\n## memory_attention vs SDPA without memory and the naive path, {torch.get_num_threads()} "
             f"thread(s); matmul ceiling {fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16\n",
             "| case | memory3 ms | SDPA w/o memory ms | memory3 / SDPA | naive ms | memory3 / naive | "
             "GFLOP/s (% of matmul) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for preset, dtype in bench_memory_attention.VERSUS_CASES:
        r = bench_memory_attention.versus(preset, dtype, budget_s=budget)
        ceiling = bf16 if dtype == "bfloat16" else fp32
        lines.append(f"| {r['case']} | {r['kernel_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['vs_sdpa']:.2f}x | "
                     f"{r['naive_ms']:.3f} | {r['vs_naive']:.2f}x | "
                     f"{r['kernel_gflops']:.1f} ({100 * r['kernel_gflops'] / ceiling:.0f}%) |")
    r = bench_memory_attention.versus("prefill", "float32", backward=True, budget_s=budget)
    lines.append(f"\nprefill float32 forward + backward (grads of q, k, v; bank frozen): {r['kernel_ms']:.1f} ms = "
                 f"{r['vs_sdpa']:.2f}x autograd through SDPA without memory ({r['sdpa_ms']:.1f} ms), "
                 f"{r['vs_forward']:.2f}x the kernel's forward ({r['forward_ms']:.1f} ms); "
                 f"with the 10,000-row bank trainable too (dense bank gradient): {r['bank_grad_ms']:.1f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, skip peak-memory runs")
    parser.add_argument("--threads", default=None, help="thread counts of the versus tables, e.g. 1,2")
    parser.add_argument("--versus-only", action="store_true", help="only the memory_attention versus tables")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"# memory3 CPU kernels — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    for threads in thread_counts(args.threads, torch.get_num_threads()):
        torch.set_num_threads(threads)
        print("\n".join(versus_rows(args.quick)), flush=True)
    if args.versus_only:
        return
    torch.set_num_threads(default_threads)
    print(f"\n## every op's kernel vs its pure-PyTorch reference, {default_threads} threads\n")
    print("| op | case | kernel ms | reference ms | speedup | notes |")
    print("|---|---|---:|---:|---:|---|")
    for op, case, k, ref, speed, note in rows(args.quick):
        print(f"| {op} | {case} | {k:.3f} | {ref:.3f} | {speed:.1f}x | {note} |")


if __name__ == "__main__":
    main()
