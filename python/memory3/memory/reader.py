"""The read path of a memory bank (the Bank class's reading half): load the shard arrays
per loading mode, decode rows, gather them through the cache, hand in-place banks to the ops.

Bank (bank.py) mixes this in; it provides path, manifest, shape, codec, mode, device, dtype,
rows, _cache and _files. gather/gather_layers are thread-safe (generation gathers from a
prefetch thread); everything else expects one user at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from memory3.memory import shards
from memory3.memory.cache import CacheStats


class BankReader:
    """Set by Bank.__init__: _parts (None until first read: [layer][array] -> per-shard
    tensors), _starts (first row of each part), _joined (layer -> its arrays as single
    tensors, for layer_bank), _read_lock (a threading.Lock)."""

    def _load_parts(self) -> list[dict[str, list[Tensor]]]:
        if self._parts is None:
            specs, pin = self.codec.arrays(), self.mode == "pinned" and torch.cuda.is_available()
            parts = []
            for layer in range(self.shape.layers):
                per = {}
                for name, spec in specs.items():
                    files = [(shards.shard_path(self.path, layer, s["name"], name), s["rows"]) for s in self.manifest.shards]
                    if self.mode == "mmap":
                        per[name] = [shards.map_rows(p, r, spec) for p, r in files]
                    else:  # one tensor per array: the ops read it in place
                        host = torch.cat([shards.read_rows(p, r, spec) for p, r in files]) if files else torch.empty((0, *spec.shape), dtype=spec.dtype)
                        per[name] = [host.pin_memory() if pin else host.to(self.device) if self.mode == "gpu" else host]
                parts.append(per)
            starts = [0]
            for s in self.manifest.shards[:-1] if self.mode == "mmap" else []:
                starts.append(starts[-1] + s["rows"])
            self._parts, self._starts, self._joined = parts, torch.tensor(starts), {}
        return self._parts

    def stored_rows(self, rows: Tensor) -> list[dict[str, Tensor]]:
        """The stored (encoded) arrays of rows (int64 [n]), per layer, on the CPU."""
        parts = self._load_parts()
        rows = rows.long().cpu()
        shard_of = torch.searchsorted(self._starts, rows, right=True) - 1
        out = []
        for per in parts:
            layer = {}
            for name, p in per.items():
                dst = torch.empty((rows.numel(), *p[0].shape[1:]), dtype=p[0].dtype)
                for s in shard_of.unique().tolist():
                    sel = (shard_of == s).nonzero().squeeze(1)
                    dst[sel] = p[s][(rows[sel] - self._starts[s]).to(p[s].device)].cpu()
                layer[name] = dst
            out.append(layer)
        return out

    def layer_bank(self, layer: int) -> dict[str, Tensor | None]:
        """mem_k, mem_v, mem_k_scale, mem_v_scale of one memory layer, to pass to
        ops.memory_attention(..., **bank.layer_bank(layer)) with mem_ids = row ids. Only for
        in-place codecs (bf16/fp16/fp32/int8); an mmap bank of several shards is concatenated
        into host memory here, once per layer."""
        if not 0 <= layer < self.shape.layers:
            raise ValueError(f"layer must be in [0, {self.shape.layers}), got {layer}")
        per = self._load_parts()[layer]
        if layer not in self._joined:
            self._joined[layer] = {name: p[0] if len(p) == 1 else torch.cat(p) for name, p in per.items()}
        return self.codec.layer_bank(self._joined[layer])

    def _check_ids(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor):
            ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be an int32 or int64 tensor of row ids, got {ids.dtype}")
        flat = ids.reshape(-1).long().cpu()
        if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) >= self.rows):
            bad = flat[(flat < -1) | (flat >= self.rows)][0].item()
            raise ValueError(f"ids must be row ids in [0, {self.rows}) or -1 (empty slot), got {bad}")
        return flat

    def _decode(self, rows: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Read and decode rows (int64 [n], CPU; -1 = a zero row): per layer (k, v), each
        [n, Hkv, M, D] on the device. Rows of one shard come straight from the codec's op."""
        parts = self._load_parts()
        valid = rows >= 0
        shard_of = torch.searchsorted(self._starts, rows.clamp(min=0), right=True) - 1
        used = shard_of[valid].unique().tolist()
        whole = len(used) == 1 and bool(valid.all())
        out = []
        for layer in range(self.shape.layers):
            kv = None if whole else [torch.zeros((rows.numel(), *self.shape.layer), dtype=self.dtype, device=self.device)
                                     for _ in range(2)]
            for p in used:
                mask = valid & (shard_of == p)
                local = (rows if whole else rows[mask]) - self._starts[p]
                arrays = {name: per[p] for name, per in parts[layer].items()}
                k, v = self.codec.decode(layer, arrays, local.to(arrays["k"].device), self.dtype)
                k, v = k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)
                if whole:
                    kv = [k, v]
                else:
                    sel = mask.nonzero().squeeze(1).to(self.device)
                    kv[0].index_copy_(0, sel, k)
                    kv[1].index_copy_(0, sel, v)
            out.append((kv[0], kv[1]))
        return out

    def gather_layers(self, ids) -> list[tuple[Tensor, Tensor]]:
        """Dense memories of row ids (any shape, -1 = empty slot -> zeros), through the cache:
        per memory layer (k, v), each [*ids.shape, Hkv, M, D] of the bank's dtype on its device.
        Works for every codec and loading mode; the fast path (no stacking copy)."""
        ids_t = ids if isinstance(ids, Tensor) else torch.as_tensor(ids)
        flat = self._check_ids(ids_t)
        shape = (*ids_t.shape, *self.shape.layer)
        valid = flat >= 0
        if not bool(valid.any()):
            return [tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
                    for _ in range(self.shape.layers)]
        uniq, inverse = torch.unique(flat[valid], return_inverse=True)
        order = torch.full_like(flat, -1)
        order[valid] = inverse
        with self._read_lock:
            got = self._cache.fetch(uniq, self._decode, order)
        return [(k.reshape(shape), v.reshape(shape)) for k, v in got]

    def gather(self, ids) -> Tensor:
        """gather_layers stacked: [L, 2, *ids.shape, Hkv, M, D] (mem[l, 0] are layer l's keys)."""
        return torch.stack([torch.stack(kv) for kv in self.gather_layers(ids)])

    def cache_stats(self) -> CacheStats:
        """Capacity, use, hits, misses and hit rate of the cache of decoded memories."""
        return self._cache.stats()

    def cache_clear(self) -> None:
        """Empty the cache and zero its counters."""
        self._cache.clear()
