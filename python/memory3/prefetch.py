"""Run work ahead of the step that needs it: generation's next-chunk retrieval and gather.

With `enabled`, `submit(fn)` runs fn on one worker thread (so the host work of retrieval,
the embedder, FAISS and the disk reads overlap the decode step running meanwhile) and, on a
CUDA device, inside a side stream (so its copies to the GPU overlap the decode kernels).
`result()` waits for it and makes the current stream wait for the side stream. Without
`enabled` (the default on the CPU, where there is nothing to overlap with) fn runs at once.
The calling code is the same either way, which is how the CPU tests cover both paths.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor


class Prefetcher:
    def __init__(self, enabled: bool, device: torch.device | str):
        self.device = torch.device(device)
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory3-prefetch") if enabled else None
        self._stream = torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None

    def submit(self, fn: Callable[..., Any], *args) -> Future:
        """Start fn(*args); fn returns anything whose tensors the caller reads after result()."""
        if self._pool is None:
            done: Future = Future()
            done.set_result((fn(*args), None))
            return done
        return self._pool.submit(self._run, fn, args)

    def _run(self, fn, args):
        with torch.inference_mode():  # inference mode is per thread
            if self._stream is None:
                return fn(*args), None
            with torch.cuda.stream(self._stream):
                out = fn(*args)
                event = torch.cuda.Event()
                event.record(self._stream)
            return out, event

    def result(self, handle: Future) -> Any:
        out, event = handle.result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in _tensors(out):  # allocated on the side stream, freed after use on this one
                if t.is_cuda:
                    t.record_stream(current)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _tensors(x) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []
