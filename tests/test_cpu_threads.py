"""The CPU ops on torch's threads (csrc/cpu/thread_pool.h: torch's inter-op pool plus the calling
thread, since at::parallel_for runs serially in this extension, built without OpenMP). Every
op gives the same bits at 2, 3 and 4 threads as at 1, and at 2 threads its work really runs on
two threads: per-thread CPU time from /proc/self/task, robust to a busy machine (the second
thread must do a fair share of the work in one of a few tries)."""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from memory3 import ops
from memory3.pq import train_pq_codebook
from memory3.testing import AttentionCase

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bank(N, Hkv=2, M=8, D=80, dtype=torch.bfloat16, seed=0):
    g = _gen(seed)
    return tuple(torch.randn(N, Hkv, M, D, generator=g).to(dtype) for _ in range(2))


def _ids(N, n, seed=1):
    ids = torch.randint(-1, N, (n,), generator=_gen(seed))
    return ids


def vq_meta(D: int = 64, coarse_bits: int = 6, pq_m: int = 8, pq_bits: int = 5) -> torch.Tensor:
    """A vq meta (memory3/vq.py layout) with a random orthonormal rotation and codebooks."""
    g = _gen(3)
    meta = torch.zeros(1 + D + (1 << coarse_bits) + (1 << pq_bits), D)
    meta[0, :5] = torch.tensor([1.0, coarse_bits, pq_m, pq_bits, D // 4])
    meta[1 : 1 + D] = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    meta[1 + D :] = torch.randn(meta.shape[0] - 1 - D, D, generator=g)
    return meta


def vq_codes(N: int, Hkv: int = 2, M: int = 8, coarse_bits: int = 6, pq_m: int = 8, pq_bits: int = 5):
    coarse_bytes = (2 * coarse_bits + 7) // 8
    g = _gen(4)
    list_no = torch.randint(0, 1 << (2 * coarse_bits), (N, Hkv, M), generator=g)
    coarse = torch.stack([(list_no >> (8 * b)) & 255 for b in range(coarse_bytes)], dim=-1)
    fine = torch.randint(0, 256, (N, Hkv, M, (pq_m * pq_bits + 7) // 8), generator=g)
    return torch.cat([coarse, fine], dim=-1).to(torch.uint8)


def _attention_backward(case: AttentionCase):
    args = case.make()
    for name in ("q", "k", "v", "mem_k", "mem_v"):
        args[name].requires_grad_()
    out, lse = ops.memory_attention(**args)
    g = _gen(5)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return [args[n].grad for n in ("q", "k", "v", "mem_k", "mem_v")]


# Each case: a call returning tensors; big enough that 4 threads get work, small enough to be fast.
def _cases(big: bool = False):
    N = 4000 if big else 600
    n_ids = 3000 if big else 400
    bank_bf16 = _bank(N)
    bank_i8, (ks, vs) = (
        tuple(torch.randint(-127, 128, (N, 2, 8, 80), generator=_gen(s), dtype=torch.int8) for s in (6, 7)),
        tuple(torch.rand(N, 2, 8, generator=_gen(s)) / 64 for s in (8, 9)),
    )
    ids = _ids(N, n_ids)
    x = torch.randn(N // 2, 2, 8, 64, generator=_gen(10))
    codebook = train_pq_codebook(x[:64], sub_dim=8, iters=2)
    codes = {c: ops.quantize_memory(x, c, codebook=codebook if c == "pq" else None) for c in ("int8", "int4", "pq")}
    vq = (vq_codes(N // 2), vq_meta())
    vq_ids = ids.clamp(max=N // 2 - 1)
    return {
        "gather_memory bf16": lambda: ops.gather_memory(*bank_bf16, ids),
        "gather_memory int8": lambda: ops.gather_memory(*bank_i8, ids, mem_k_scale=ks, mem_v_scale=vs),
        "quantize_memory int8": lambda: ops.quantize_memory(x, "int8"),
        "quantize_memory int4": lambda: ops.quantize_memory(x, "int4"),
        "quantize_memory pq": lambda: ops.quantize_memory(x, "pq", codebook=codebook),
        "dequantize_memory int8": lambda: ops.dequantize_memory(*codes["int8"], "int8", vq_ids),
        "dequantize_memory int4": lambda: ops.dequantize_memory(*codes["int4"], "int4", vq_ids),
        "dequantize_memory pq": lambda: ops.dequantize_memory(*codes["pq"], "pq", vq_ids),
        "dequantize_memory vq": lambda: ops.dequantize_memory(*vq, "vq", vq_ids, out_dtype=torch.float32),
    }


CASE_NAMES = list(_cases().keys())


def _flat(result):
    return [t for t in (result if isinstance(result, (tuple, list)) else [result])]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_results_do_not_depend_on_threads(name):
    call = _cases()[name]
    with num_threads(1):
        want = _flat(call())
    for threads in (2, 3, 4):
        with num_threads(threads):
            got = _flat(call())
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{name}: {threads} threads differ from 1 thread"


# The bank's gradient sums the per-slot grads by id; many slots share an id here (N = 7), so an
# order that depended on threads would show in the bits.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_grads_do_not_depend_on_threads(dtype):
    case = AttentionCase(B=3, T=96, S=128, Hq=4, Hkv=2, D=64, N=7, M=8, R=4, chunk_size=32, chunk_start=16,
                         empty_slot_frac=0.2, dtype=dtype)
    with num_threads(1):
        want = _attention_backward(case)
    for threads in (2, 3, 4):
        with num_threads(threads):
            got = _attention_backward(case)
        for name, a, b in zip(("q", "k", "v", "mem_k", "mem_v"), got, want):
            assert torch.equal(a, b), f"grad of {name}: {threads} threads differ from 1 thread"


def _thread_cpu_ns() -> dict[str, int]:
    """CPU time of each thread of this process, ns (schedstat; clock ticks if absent)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) * 10_000_000
    return out


def _second_thread_share(call, seconds: float = 0.25) -> float:
    """Of the CPU time spent while `call` runs repeatedly at 2 threads, the share of the second
    busiest thread relative to the busiest (1.0: an even split, 0: one thread did it all)."""
    with num_threads(2):
        call()
        before = _thread_cpu_ns()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            call()
        after = _thread_cpu_ns()
    busy = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    return busy[1] / busy[0] if len(busy) > 1 and busy[0] > 0 else 0.0


SPLIT_CASES = ["gather_memory bf16", "quantize_memory int8", "quantize_memory pq", "dequantize_memory int4",
               "dequantize_memory vq", "memory_attention prefill", "memory_attention backward"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("name", SPLIT_CASES)
def test_work_runs_on_two_threads(name):
    if name.startswith("memory_attention"):
        case = AttentionCase(B=2, T=256, S=256, Hq=8, Hkv=2, D=64, N=100, M=8, R=5, chunk_size=64, chunk_start=0,
                             empty_slot_frac=0.0)
        if name.endswith("backward"):
            def call():
                return _attention_backward(case)
        else:
            args = case.make()

            def call():
                return ops.memory_attention(**args)
    else:
        call = _cases(big=True)[name]
    # A busy machine may leave the helper thread unscheduled for a whole try: three tries.
    shares = []
    for _ in range(3):
        shares.append(_second_thread_share(call))
        if shares[-1] > 0.25:
            return
    pytest.fail(f"{name}: at 2 threads the second thread did {max(shares):.0%} of the first's work "
                f"(tries: {', '.join(f'{s:.0%}' for s in shares)}): the op ran on one thread")
