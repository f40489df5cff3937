"""The prefetcher that overlaps the next chunk's retrieval and gather with a decode step:
worker thread on the CPU (the logic), side stream on CUDA (skipped without a GPU)."""
from __future__ import annotations

import threading

import pytest
import torch

from memory3.prefetch import Prefetcher


def test_disabled_runs_at_once_on_this_thread():
    p = Prefetcher(enabled=False, device="cpu")
    seen = []
    handle = p.submit(lambda x: seen.append(threading.current_thread().name) or x + 1, 1)
    assert seen == [threading.current_thread().name]  # already ran
    assert p.result(handle) == 2
    p.close()


def test_enabled_runs_on_the_worker_in_inference_mode_and_reraises():
    p = Prefetcher(enabled=True, device="cpu")
    gate = threading.Event()

    def work(x):
        gate.wait(5)  # the caller keeps going meanwhile (the decode step it overlaps)
        return threading.current_thread().name, torch.is_inference_mode_enabled(), x * 2

    handle = p.submit(work, torch.ones(3))
    assert not handle.done()
    gate.set()
    name, inference, y = p.result(handle)
    assert name.startswith("memory3-prefetch") and inference and y.tolist() == [2, 2, 2]

    def fail():
        raise ValueError("bank row 7 is damaged")

    with pytest.raises(ValueError, match="bank row 7 is damaged"):
        p.result(p.submit(fail))
    p.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_then_the_current_stream_waits():
    p = Prefetcher(enabled=True, device="cuda")
    host = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    streams = []

    def work():
        streams.append(torch.cuda.current_stream())
        return host.to("cuda", non_blocking=True) * 2  # copy + kernel on the side stream

    busy = torch.randn(4096, 4096, device="cuda")
    handle = p.submit(work)
    for _ in range(4):
        busy = busy @ busy / 4096  # the main stream's work it overlaps
    y = p.result(handle)
    assert streams[0] != torch.cuda.current_stream()
    assert torch.equal(y.cpu(), host * 2)
    p.close()
