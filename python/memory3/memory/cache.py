"""An LRU cache of decoded memories, kept on the device that reads them.

Adjacent chunks often retrieve the same references (PAPER §3.3), so the bank keeps the most
recently used memories decoded, as [layers, 2, capacity, Hkv, M, D] slots on the output
device (a GPU in the "pinned" loading mode). `fetch(rows, load)` returns the memories of
unique row ids, loading (reading + decoding) only the misses. Works the same on the CPU,
where its logic is tested.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from memory3.memory.codecs import gather_rows


@dataclass
class CacheStats:
    capacity: int
    used: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __str__(self) -> str:
        return (f"cache {self.used}/{self.capacity} memories, {self.hits} hits, {self.misses} misses, "
                f"hit rate {100 * self.hit_rate:.1f}%")


class MemoryCache:
    def __init__(self, capacity: int, memory_shape: tuple[int, ...], device, dtype: torch.dtype):
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0 memories, got {capacity}")
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self._shape = memory_shape  # (L, 2, Hkv, M, D)
        self._store: Tensor | None = None  # allocated on first use
        self._slot: OrderedDict[int, int] = OrderedDict()  # row -> slot, least recently used first
        self.hits = self.misses = 0

    def stats(self) -> CacheStats:
        return CacheStats(self.capacity, len(self._slot), self.hits, self.misses)

    def clear(self) -> None:
        self._slot.clear()
        self.hits = self.misses = 0

    def fetch(self, rows: Tensor, load: Callable[[Tensor], list], order: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Memories of the distinct row ids `rows` (int64 [n], CPU), per layer (k, v) each
        [n, Hkv, M, D]; with `order` (int64 [k], indices into rows, -1 = a zero memory) each
        [k, Hkv, M, D]. `load(rows)` (rows may hold -1) decodes what the cache does not hold,
        in the same per-layer form."""
        order = torch.arange(rows.numel()) if order is None else order
        n = rows.numel()
        if n > self.capacity:  # no cache, or a working set larger than it: read through
            self.misses += n
            return load(torch.where(order >= 0, rows[order.clamp(min=0)], -1))
        slots, missing = [0] * n, []
        for i, r in enumerate(rows.tolist()):
            s = self._slot.get(r)
            if s is None:
                missing.append(i)
            else:
                self._slot.move_to_end(r)
                slots[i] = s
        self.hits += n - len(missing)
        self.misses += len(missing)
        L, two, Hkv, M, D = self._shape
        if self._store is None:  # per layer [2, capacity, Hkv, M, D]: k and v banks of slots
            self._store = [torch.empty((two, self.capacity, Hkv, M, D), dtype=self.dtype, device=self.device) for _ in range(L)]
        if missing:
            free = self.capacity - len(self._slot)
            new_slots = list(range(len(self._slot), len(self._slot) + min(free, len(missing))))
            while len(new_slots) < len(missing):  # evict the least recently used (none of this batch:
                _, s = self._slot.popitem(last=False)  # its hits were just moved to the end)
                new_slots.append(s)
            new_slots.sort()  # misses fill runs of consecutive slots: copied as slices
            miss_rows = rows[missing]
            for r, s in zip(miss_rows.tolist(), new_slots):
                self._slot[r] = s
            for i, s in zip(missing, new_slots):
                slots[i] = s
            runs = _runs(new_slots)
            for store, kv in zip(self._store, load(miss_rows)):
                for i in range(2):
                    x = kv[i].to(self.device, self.dtype)
                    for first, j, n_run in runs:  # index_copy_ is ~10x slower than slice copies here
                        store[i, first : first + n_run].copy_(x[j : j + n_run])
        idx = torch.where(order >= 0, torch.tensor(slots)[order.clamp(min=0)], -1).to(self.device)
        return [gather_rows(store[0], store[1], idx, self.dtype) for store in self._store]  # row copies, -1 -> 0


def _runs(sorted_slots: list[int]) -> list[tuple[int, int, int]]:
    """(first slot, first index, length) of each run of consecutive slots."""
    runs = []
    for j, s in enumerate(sorted_slots):
        if runs and runs[-1][0] + runs[-1][2] == s:
            runs[-1][2] += 1
        else:
            runs.append([s, j, 1])
    return [tuple(r) for r in runs]
