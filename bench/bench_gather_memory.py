"""gather_memory on the CPU against its reference (PyTorch indexing + dequantization).

    pytest bench/bench_gather_memory.py --benchmark-enable     # pytest-benchmark tables
    python bench/bench_gather_memory.py                        # measure(): one line per bank

Shape: one layer of the paper's bank (N=20000 memories, Hkv=8 KV heads, M=8 tokens, D=80),
bf16 or int8 with per-token scales, and the ids of one chunk for a batch of 32 sequences
(5 memories each: 160 ids). The op is memory-bound, so measure() also reports GB/s and the
copy bandwidth of the same number of bytes measured in the same run (the ceiling).
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
from memory3.reference import gather_memory_ref

gather_memory = torch.ops.memory3.gather_memory

BANKS = ("bf16", "int8")


@dataclass(frozen=True)
class Shape:
    N: int = 20000  # memories in the bank
    Hkv: int = 8
    M: int = 8  # tokens per memory and KV head
    D: int = 80
    ids: int = 160  # 32 sequences x 5 memories


@functools.lru_cache(maxsize=2)
def make_inputs(bank: str, shape: Shape = Shape(), seed: int = 0) -> tuple:
    """(mem_k, mem_v, ids, out_dtype, mem_k_scale, mem_v_scale) for gather_memory.

    Both paths run once here, before any timing, and their answers must agree bit for bit.
    (Running both first also matters for timing: glibc serves a buffer from fresh mmap'd
    pages, a page fault per 4 KB, here ~2 ms per call, until a larger buffer has been
    freed, so whichever path ran first would otherwise pay for the allocator's warm-up.)"""
    g = torch.Generator().manual_seed(seed)
    dims = (shape.N, shape.Hkv, shape.M, shape.D)
    ids = torch.randperm(shape.N, generator=g)[: shape.ids].to(torch.int32)
    if bank == "bf16":
        mk, mv = (torch.randn(dims, generator=g, dtype=torch.bfloat16) for _ in range(2))
        args = (mk, mv, ids, None, None, None)
    elif bank == "int8":
        mk, mv = (torch.randint(-127, 128, dims, generator=g, dtype=torch.int8) for _ in range(2))
        ks, vs = (torch.rand(dims[:3], generator=g) / 127 for _ in range(2))
        args = (mk, mv, ids, torch.bfloat16, ks, vs)
    else:
        raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
    verify.exact(f"gather_memory {bank}", gather_memory(*args), gather_memory_ref(*args))
    return args


def bytes_moved(args: tuple) -> int:
    """Bytes read (the rows of ids, and their scales) plus bytes written (bf16 k and v)."""
    mk, _, ids, out_dtype, ks, _ = args
    row = mk[0].numel()
    read = 2 * ids.numel() * row * mk.element_size()
    if ks is not None:
        read += 2 * ids.numel() * ks[0].numel() * ks.element_size()
    out_size = torch.empty((), dtype=out_dtype or mk.dtype).element_size()
    return read + 2 * ids.numel() * row * out_size


def copy_gbps(nbytes: int, repeats: int = 50) -> float:
    """Host copy bandwidth (read + write) for nbytes in all, the ceiling of a gather."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return nbytes / median_time(lambda: dst.copy_(src), repeats) / 1e9


@torch.inference_mode()
def measure(bank: str = "bf16", shape: Shape = Shape(), repeats: int = 50) -> dict:
    """Median seconds of the kernel and the reference at `shape`, bytes moved and GB/s."""
    args = make_inputs(bank, shape)
    kernel_s = median_time(lambda: gather_memory(*args), repeats)
    reference_s = median_time(lambda: gather_memory_ref(*args), repeats)
    nbytes = bytes_moved(args)
    ceiling = copy_gbps(nbytes, repeats)
    return {
        "op": "gather_memory",
        "bank": bank,
        **asdict(shape),
        "threads": torch.get_num_threads(),
        "kernel_s": kernel_s,
        "reference_s": reference_s,
        "speedup": reference_s / kernel_s,
        "bytes": nbytes,
        "kernel_gbps": nbytes / kernel_s / 1e9,
        "reference_gbps": nbytes / reference_s / 1e9,
        "copy_gbps": ceiling,
        "kernel_vs_copy": nbytes / kernel_s / 1e9 / ceiling,
    }


# ---------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("bank", BANKS)
def test_gather_memory(benchmark, bank, impl):
    args = make_inputs(bank)
    benchmark.group = f"gather_memory {bank}"
    with torch.inference_mode():
        benchmark(gather_memory if impl == "kernel" else gather_memory_ref, *args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", default=None, help="thread counts to run at, e.g. 1,2 (default: torch's)")
    cli = parser.parse_args()
    for threads in thread_counts(cli.threads, torch.get_num_threads()):
        torch.set_num_threads(threads)
        for bank in BANKS:
            r = measure(bank, repeats=cli.repeats)
            print(
                f"{r['threads']} thread(s) gather_memory {bank:5s} {r['ids']} ids of N={r['N']}: "
                f"kernel {r['kernel_s'] * 1e6:8.1f} us "
                f"({r['kernel_gbps']:5.1f} GB/s, {r['kernel_vs_copy']:4.0%} of copy {r['copy_gbps']:.1f} GB/s)  "
                f"reference {r['reference_s'] * 1e6:8.1f} us  speedup {r['speedup']:5.1f}x"
            )
