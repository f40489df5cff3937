"""A vector index over the bank's reference embeddings: FAISS (flat, IVF, HNSW) or an exact
torch search when FAISS is absent (or backend="torch").

    index = VectorIndex(dim, kind="hnsw")        # backend: "faiss" when installed, else "torch"
    index.add(embeddings)                         # rows get ids 0, 1, ... in order of addition
    scores, rows = index.search(queries, r, deleted=mask)   # [q, r] each; rows -1 where fewer

Scores are inner products (cosine for the embedder's normalized vectors), best first;
`deleted` (bool [rows]) excludes tombstoned rows inside the search (a FAISS ID selector),
so r live results come back whenever r live rows exist (exactly for flat and torch).
save(dir)/load(dir) keep a FAISS index under the bank's index/ with a JSON sidecar (embedder,
kind, the rows covered, the file's sha256, checked before FAISS reads the file).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import faiss
except ImportError:  # the exact torch search still works
    faiss = None

INDEX_KINDS = ("flat", "ivf", "hnsw")
BACKENDS = ("faiss", "torch")


class VectorIndex:
    """kind: flat (exact), ivf (nlist clusters, nprobe searched; trained on the first add),
    hnsw (graph with hnsw_m links, ef_search); backend: faiss | torch (exact, any kind)."""

    def __init__(self, dim: int, kind: str = "flat", *, backend: str | None = None, nlist: int | None = None,
                 nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 64):
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
        backend = backend or ("faiss" if faiss is not None else "torch")
        if backend not in BACKENDS:
            raise ValueError(f"index backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "faiss" and faiss is None:
            raise ValueError("backend='faiss' needs the faiss-cpu package; use backend='torch' for exact search")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.kind, self.backend = dim, kind, backend
        self.nlist, self.nprobe, self.hnsw_m, self.ef_search, self.ef_construction = nlist, nprobe, hnsw_m, ef_search, ef_construction
        self._faiss = None
        self._vectors = torch.empty((0, dim))  # the torch backend's matrix

    @property
    def ntotal(self) -> int:
        if self.backend == "torch":
            return self._vectors.shape[0]
        return 0 if self._faiss is None else self._faiss.ntotal

    def _check(self, x, name: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [n, {self.dim}], got {x.dtype} {list(x.shape)}")
        return x.detach().float().cpu().contiguous()

    def _new_faiss(self, first: np.ndarray):
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, ip)
            index.hnsw.efConstruction = self.ef_construction
            return index
        # IVF: ~4 sqrt(n) lists, at most n / 39 so k-means has data (FAISS warns below that)
        self.nlist = self.nlist or max(1, min(int(4 * math.sqrt(len(first))), len(first) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.nlist, ip)
        index.train(first)
        return index

    def add(self, embeddings) -> None:
        """Append vectors [n, dim]; they get row ids ntotal, ntotal + 1, ..."""
        x = self._check(embeddings, "embeddings")
        if self.backend == "torch":
            self._vectors = torch.cat([self._vectors, x])
            return
        if len(x) == 0:
            return
        if self._faiss is None:
            self._faiss = self._new_faiss(x.numpy())
        self._faiss.add(x.numpy())

    def search(self, queries, r: int, deleted: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Top-r rows by inner product for each query [q, dim], best first, skipping rows
        where deleted [ntotal] is True: scores float32 [q, r], rows int64 [q, r] (-1, -inf
        where fewer than r rows remain)."""
        q = self._check(queries, "queries")
        if r <= 0:
            raise ValueError(f"r must be positive, got {r}")
        if deleted is not None and (deleted.dtype != torch.bool or deleted.shape != (self.ntotal,)):
            raise ValueError(f"deleted must be a bool tensor [{self.ntotal}], got {deleted.dtype} {list(deleted.shape)}")
        scores = torch.full((len(q), r), -math.inf)
        rows = torch.full((len(q), r), -1, dtype=torch.long)
        if self.ntotal == 0 or len(q) == 0:
            return scores, rows
        if self.backend == "torch":
            sim = q @ self._vectors.T
            if deleted is not None:
                sim[:, deleted] = -math.inf
            k = min(r, self.ntotal)
            top = sim.topk(k, dim=1)
            keep = top.values > -math.inf
            scores[:, :k] = torch.where(keep, top.values, scores[:, :k])
            rows[:, :k] = torch.where(keep, top.indices, rows[:, :k])
            return scores, rows
        params = self._params(deleted)
        d, i = self._faiss.search(q.numpy(), r, params=params)
        found = torch.from_numpy(i) >= 0
        scores[found] = torch.from_numpy(d)[found]
        rows[found] = torch.from_numpy(i)[found]
        return scores, rows

    def _params(self, deleted: Tensor | None):
        kw = {}
        if deleted is not None and bool(deleted.any()):
            batch = faiss.IDSelectorBatch(deleted.nonzero().squeeze(1).numpy().astype(np.int64))
            kw["sel"] = faiss.IDSelectorNot(batch)
            kw["sel"].referenced = batch  # keep the wrapped selector alive during the search
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist), **kw)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.ef_search, **kw)
        return faiss.SearchParameters(**kw) if kw else None

    # ------------------------------------------------------------------ persistence

    def options(self) -> dict:
        return {"nlist": self.nlist, "nprobe": self.nprobe, "hnsw_m": self.hnsw_m, "ef_search": self.ef_search,
                "ef_construction": self.ef_construction}

    def save(self, folder: Path, name: str, extra: dict) -> None:
        """Write <name>.faiss and <name>.json (the index options and `extra`) atomically.
        The torch backend's matrix is the bank's embeddings: nothing to write."""
        if self.backend != "faiss" or self._faiss is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{name}.faiss.tmp"
        faiss.write_index(self._faiss, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, folder / f"{name}.faiss")
        sidecar = {"dim": self.dim, "kind": self.kind, "options": self.options(), "ntotal": self.ntotal, "sha256": digest, **extra}
        (folder / f"{name}.json.tmp").write_text(json.dumps(sidecar))
        os.replace(folder / f"{name}.json.tmp", folder / f"{name}.json")

    @classmethod
    def load(cls, folder: Path, name: str, dim: int, kind: str) -> tuple["VectorIndex", dict] | None:
        """A saved FAISS index and its sidecar, or None when absent, damaged or of another
        dim/kind (the caller rebuilds it from the embeddings)."""
        if faiss is None:
            return None
        try:
            sidecar = json.loads((folder / f"{name}.json").read_text())
            data = (folder / f"{name}.faiss").read_bytes()
            if sidecar["dim"] != dim or sidecar["kind"] != kind or hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
                return None
            index = cls(dim, kind, backend="faiss", **sidecar["options"])
            index._faiss = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return None
        if index._faiss.ntotal != sidecar["ntotal"] or index._faiss.d != dim:
            return None
        return index, sidecar
