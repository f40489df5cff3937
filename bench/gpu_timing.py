"""Timing for the GPU benchmarks: CUDA events around a loop of calls on one stream (median of
several loops), and the two hardware rates every GPU ratio is taken against, measured in the
same run: the device-to-device copy rate (bytes read + written per second, as a kernel
that streams memory moves them) and the pinned host-to-device rate."""
from __future__ import annotations

import os
import statistics

import torch

# The ops' range checks must not sync per call while timing (memory3/params.h).
os.environ.setdefault("MEMORY3_RANGE_CHECK", "deferred")


def cuda_time_ms(fn, iters: int = 20, loops: int = 5, warmup: int = 3) -> float:
    """Median over `loops` of the mean time of `iters` back-to-back calls, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def copy_rate(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of nbytes: (read + written) bytes per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def host_to_device_rate(nbytes: int = 1 << 28) -> float:
    """Pinned host memory to the device: bytes per second."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = cuda_time_ms(lambda: dst.copy_(src, non_blocking=True), iters=5)
    return nbytes / (ms * 1e-3)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def graph_time_ms(fn, iters: int = 20, loops: int = 5) -> float:
    """Per-call time of fn replayed from a CUDA graph of `iters` calls: the GPU's time, free of
    Python and launch overhead (a decode loop replays graphs too). fn must be capturable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    ms = cuda_time_ms(graph.replay, iters=1, loops=loops, warmup=1) / iters
    del graph
    torch.cuda.synchronize()
    return ms
