"""Memory codecs on the CPU (quantize_memory / dequantize_memory) against their references.

    pytest bench/bench_codecs.py --benchmark-enable     # pytest-benchmark tables
    python bench/bench_codecs.py                        # measure(): one line per codec

Shapes: quantize encodes one batch of 64 memories (Hkv=8, M=8, D=80: 4096 vectors), as the
encoder writes them; dequantize gathers and decodes the 160 ids of one chunk (32 sequences
x 5 memories) from a bank of N=20000 memories into bf16, the read path of generation.
measure() also reports each codec's bytes per 80-dim vector and its relative L2
reconstruction error. The data is Gaussian, which is the hard case for pq: real key-values
are far more structured, so its error here is an upper bound, not an estimate.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass

import pytest
import torch
import verify
from timing import median_time, thread_counts

import memory3  # noqa: F401  (loads memory3._C)
from memory3.pq import train_pq_codebook
from memory3.reference import dequantize_memory_ref, quantize_memory_ref

quantize_memory = torch.ops.memory3.quantize_memory
dequantize_memory = torch.ops.memory3.dequantize_memory

CODECS = ("int8", "int4", "pq")
PQ_DSUB = 8  # 10 sub-vectors of 8 dims per 80-dim vector: 10 bytes


@dataclass(frozen=True)
class Shape:
    N: int = 20000  # memories in the bank
    Hkv: int = 8
    M: int = 8
    D: int = 80
    encode: int = 64  # memories per quantize call
    ids: int = 160  # memories per dequantize call


@functools.lru_cache(maxsize=1)
def make_bank(shape: Shape = Shape(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank bf16 [N, Hkv, M, D], pq codebook trained on its first 512 memories, ids [ids])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((shape.N, shape.Hkv, shape.M, shape.D), generator=g, dtype=torch.bfloat16)
    ids = torch.randperm(shape.N, generator=g)[: shape.ids].to(torch.int32)
    return x, train_pq_codebook(x[:512], sub_dim=PQ_DSUB, iters=5), ids


@functools.lru_cache(maxsize=3)
def make_codes(codec: str, shape: Shape = Shape()) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole bank encoded with the kernel: (codes, meta)."""
    x, cb, _ = make_bank(shape)
    return quantize_memory(x, codec, cb if codec == "pq" else None)


# Each args helper runs the kernel and the reference once and checks that they agree before
# handing the arguments to a timer. (Running both first also matters for timing: glibc serves
# a buffer from fresh mmap'd pages, a page fault per 4 KB, until a larger buffer has been
# freed, so whichever path ran first would pay the allocator's warm-up.)


@functools.lru_cache(maxsize=3)
def quantize_args(codec: str, shape: Shape = Shape()) -> tuple:
    x, cb, _ = make_bank(shape)
    args = (x[: shape.encode], codec, cb if codec == "pq" else None)
    (codes, meta), (ref_codes, ref_meta) = quantize_memory(*args), quantize_memory_ref(*args)
    if codec == "pq":
        verify.pq_codes("quantize_memory pq", codes, ref_codes)
        verify.exact("quantize_memory pq", (meta,), (ref_meta,))
    else:
        verify.exact(f"quantize_memory {codec}", (codes, meta), (ref_codes, ref_meta))
    return args


@functools.lru_cache(maxsize=3)
def dequantize_args(codec: str, shape: Shape = Shape()) -> tuple:
    codes, meta = make_codes(codec, shape)
    args = (codes, meta, codec, make_bank(shape)[2], torch.bfloat16)
    verify.exact(f"dequantize_memory {codec}", (dequantize_memory(*args),), (dequantize_memory_ref(*args),))
    return args


def bytes_per_vector(codec: str, D: int, dsub: int = PQ_DSUB) -> int:
    """Stored bytes per (memory, head, token) vector: codes plus per-vector meta. pq's
    codebook (Hkv * D * 256 floats per layer) is shared by the whole bank and not counted."""
    return {"int8": D + 4, "int4": D // 2 + 8 * -(-D // 32), "pq": D // dsub}[codec]


@torch.inference_mode()
def measure(codec: str = "int8", shape: Shape = Shape(), repeats: int = 50) -> dict:
    """Median seconds of both ops and their references, bytes moved and GB/s of the
    gather-dequantize, bytes per vector and relative L2 reconstruction error of the codec."""
    q_args, d_args = quantize_args(codec, shape), dequantize_args(codec, shape)
    x = q_args[0]
    codes, meta = quantize_memory(*q_args)
    x_hat = dequantize_memory(codes, meta, codec, None, torch.float32)
    rel_l2 = ((x_hat - x.float()).norm() / x.float().norm()).item()

    quantize_s = median_time(lambda: quantize_memory(*q_args), repeats)
    quantize_ref_s = median_time(lambda: quantize_memory_ref(*q_args), repeats)
    dequantize_s = median_time(lambda: dequantize_memory(*d_args), repeats)
    dequantize_ref_s = median_time(lambda: dequantize_memory_ref(*d_args), repeats)
    vectors = shape.ids * shape.Hkv * shape.M
    # Read codes + meta of the rows (pq: + the codebook), write bf16.
    nbytes = vectors * (bytes_per_vector(codec, shape.D) + 2 * shape.D)
    if codec == "pq":
        nbytes += meta.numel() * meta.element_size()
    return {
        "codec": codec,
        **asdict(shape),
        "threads": torch.get_num_threads(),
        "bytes_per_vector": bytes_per_vector(codec, shape.D),
        "compression_vs_bf16": 2 * shape.D / bytes_per_vector(codec, shape.D),
        "rel_l2": rel_l2,
        "quantize_s": quantize_s,
        "quantize_reference_s": quantize_ref_s,
        "quantize_speedup": quantize_ref_s / quantize_s,
        "quantize_vectors_per_s": shape.encode * shape.Hkv * shape.M / quantize_s,
        "dequantize_s": dequantize_s,
        "dequantize_reference_s": dequantize_ref_s,
        "dequantize_speedup": dequantize_ref_s / dequantize_s,
        "dequantize_bytes": nbytes,
        "dequantize_gbps": nbytes / dequantize_s / 1e9,
    }


# ---------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("codec", CODECS)
def test_quantize_memory(benchmark, codec, impl):
    benchmark.group = f"quantize_memory {codec}"
    with torch.inference_mode():
        benchmark(quantize_memory if impl == "kernel" else quantize_memory_ref, *quantize_args(codec))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("codec", CODECS)
def test_dequantize_memory(benchmark, codec, impl):
    benchmark.group = f"dequantize_memory {codec}"
    with torch.inference_mode():
        benchmark(dequantize_memory if impl == "kernel" else dequantize_memory_ref, *dequantize_args(codec))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", default=None, help="thread counts to run at, e.g. 1,2 (default: torch's)")
    cli = parser.parse_args()
    for threads in thread_counts(cli.threads, torch.get_num_threads()):
        torch.set_num_threads(threads)
        for codec in CODECS:
            r = measure(codec, repeats=cli.repeats)
            print(
                f"{r['threads']} thread(s) {codec:4s} {r['bytes_per_vector']:3d} B/vector "
                f"({r['compression_vs_bf16']:4.1f}x vs bf16), rel L2 {r['rel_l2']:.4f} | "
                f"quantize {r['encode']} memories: {r['quantize_s'] * 1e3:7.2f} ms "
                f"(reference {r['quantize_reference_s'] * 1e3:8.2f} ms, {r['quantize_speedup']:5.1f}x) | "
                f"dequantize {r['ids']} ids: {r['dequantize_s'] * 1e6:7.1f} us, {r['dequantize_gbps']:5.1f} GB/s "
                f"(reference {r['dequantize_reference_s'] * 1e6:8.1f} us, {r['dequantize_speedup']:5.1f}x)"
            )
