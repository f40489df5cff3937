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

    def fetch(self, rows: Tensor, load: Callable[[Tensor], Tensor], order: Tensor | None = None) -> Tensor:
        """Memories of the distinct row ids `rows` (int64 [n], CPU) as [L, 2, n, Hkv, M, D], or
        with `order` (int64 [k], indices into rows, -1 = a zero memory) as [L, 2, k, ...].
        `load(rows)` (rows may hold -1) decodes what the cache does not hold."""
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
        if self._store is None:
            L, two, Hkv, M, D = self._shape
            self._store = torch.empty((L, two, self.capacity, Hkv, M, D), dtype=self.dtype, device=self.device)
        if missing:
            free = self.capacity - len(self._slot)
            new_slots = list(range(len(self._slot), len(self._slot) + min(free, len(missing))))
            while len(new_slots) < len(missing):  # evict the least recently used (none of this batch:
                _, s = self._slot.popitem(last=False)  # its hits were just moved to the end)
                new_slots.append(s)
            miss_rows = rows[missing]
            for r, s in zip(miss_rows.tolist(), new_slots):
                self._slot[r] = s
            for i, s in zip(missing, new_slots):
                slots[i] = s
            data = load(miss_rows).to(self.device, self.dtype)
            where = torch.tensor(new_slots, device=self.device)
            for l in range(data.shape[0]):
                for kv in range(2):
                    self._store[l, kv].index_copy_(0, where, data[l, kv])
        slot_t = torch.tensor(slots)
        idx = torch.where(order >= 0, slot_t[order.clamp(min=0)], -1).to(self.device)
        L, two, Hkv, M, D = self._shape
        out = torch.empty((L, two, idx.numel(), Hkv, M, D), dtype=self.dtype, device=self.device)
        for l in range(L):  # the gather op: row copies, -1 -> zeros
            k, v = gather_rows(self._store[l, 0], self._store[l, 1], idx, self.dtype)
            out[l, 0].copy_(k)
            out[l, 1].copy_(v)
        return out
