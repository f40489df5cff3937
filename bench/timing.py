"""Wall-clock timing for the CPU benchmarks (the CPU ops are synchronous, so a host clock
around the call is the time of the call)."""
from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int = 50, warmup: int = 3, budget_s: float = 5.0) -> float:
    """Median wall time of fn() in seconds over up to `repeats` runs (at least 3) within
    budget_s, after `warmup` calls (which also fault in the allocator's pages)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def thread_counts(arg: str | None, default: int) -> list[int]:
    """The thread counts of a `--threads 1,2` option (`default` when it is not given)."""
    if not arg:
        return [default]
    try:
        counts = [int(t) for t in arg.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--threads must be positive integers separated by commas, e.g. 1,2; got {arg!r}")
    return counts
