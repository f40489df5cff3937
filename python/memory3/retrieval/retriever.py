"""Retrieval over a memory bank: embed query texts, search the bank's index, drop tombstoned
rows and (optionally) references that overlap the query too much (eq. 6).

    retriever = Retriever(bank, Embedder(), kind="flat")   # loads or builds bank/index/flat.faiss
    hits = retriever.retrieve(chunk_texts, r=5, query_tokens=chunk_tokens, overlap_threshold=2/3)
    hits.rows     # int64 [q, r] row ids for mem_ids (-1 = fewer than r found)
    hits.scores   # float32 [q, r] cosine similarities;  hits.ids: the references' ids

The index follows the bank: rows appended since it was built are added, and a rewritten
bank (compact, reencode) rebuilds it, before every search (a cheap check of the shard list).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from memory3.memory.bank import Bank
from memory3.memory.errors import BankError
from memory3.retrieval.embedder import Embedder
from memory3.retrieval.index import VectorIndex
from memory3.retrieval.overlap import overlap_exceeds


@dataclass
class Retrieval:
    rows: Tensor  # int64 [q, r], -1 where fewer than r references were found
    scores: Tensor  # float32 [q, r], -inf where rows is -1
    ids: list[list[str]]  # ids of the found references, per query


class Retriever:
    """kind/backend/index options: see VectorIndex. save: keep the FAISS index under the
    bank's index/ (when the folder is writable). tokenize(text) -> token ids is needed by the
    overlap filter only for references stored without tokens."""

    def __init__(self, bank: Bank, embedder: Embedder | None = None, *, kind: str = "flat", backend: str | None = None,
                 save: bool = True, tokenize: Callable[[str], list[int]] | None = None, **index_options):
        if bank.embedder is None:
            raise BankError(f"memory bank {bank.path} has no embeddings to search (it was created without an embedder)")
        if embedder is not None and (embedder.name, embedder.dim) != (bank.embedder["name"], bank.embedder["dim"]):
            raise BankError(f"memory bank {bank.path} was embedded with {bank.embedder['name']} (dim {bank.embedder['dim']}), "
                            f"but the retriever's embedder is {embedder.name} (dim {embedder.dim})")
        self.bank, self.embedder, self.tokenize, self.save = bank, embedder, tokenize, save
        self.kind, self.backend, self.index_options = kind, backend, index_options
        self._index: VectorIndex | None = None
        self._covered: list[dict] = []
        self._deleted: tuple[int, Tensor] | None = None
        self.refresh()

    @property
    def index(self) -> VectorIndex:
        return self._index

    def _folder(self):
        return self.bank.path / "index"

    def refresh(self) -> None:
        """Bring the index up to the bank's committed rows."""
        shards = self.bank.manifest.shards
        if self._index is None:
            loaded = VectorIndex.load(self._folder(), self.kind, self.bank.embedder["dim"], self.kind) \
                if (self.backend or "faiss") == "faiss" else None
            if loaded is not None and loaded[1].get("embedder") == self.bank.embedder["name"]:
                self._index, self._covered = loaded[0], loaded[1]["shards"]
        if self._index is not None and _extends(self._covered, shards):
            done = sum(s["rows"] for s in self._covered)
        else:
            self._index = VectorIndex(self.bank.embedder["dim"], self.kind, backend=self.backend, **self.index_options)
            done = 0
        if done < self.bank.rows or not self._covered:
            self._index.add(self.bank.embeddings()[done:])
            self._covered = [dict(s) for s in shards]
            if self.save and os.access(self.bank.path, os.W_OK):
                self._index.save(self._folder(), self.kind, {"embedder": self.bank.embedder["name"], "shards": self._covered})
        self._covered = [dict(s) for s in shards]

    def _deleted_mask(self) -> Tensor:
        commit = self.bank.manifest.commit
        if self._deleted is None or self._deleted[0] != commit:
            self._deleted = (commit, self.bank.deleted_mask())
        return self._deleted[1]

    def search(self, query_embeddings: Tensor, r: int = 5) -> tuple[Tensor, Tensor]:
        """(scores, rows) [q, r] of the live references nearest to query embeddings [q, dim]."""
        self.refresh()
        return self._index.search(query_embeddings, r, deleted=self._deleted_mask())

    def retrieve(self, texts, r: int = 5, *, query_tokens=None, overlap_threshold: float | None = None,
                 candidates: int | None = None) -> Retrieval:
        """Top-r references for each query text (batched). With overlap_threshold, references
        whose overlap (eq. 6) with the query's tokens (query_tokens[i]) exceeds it are skipped,
        searching `candidates` (default 4 r) deep."""
        if self.embedder is None:
            raise ValueError("this Retriever has no embedder: pass one, or call search() with embeddings")
        texts = list(texts)
        if overlap_threshold is None:
            scores, rows = self.search(self.embedder.embed(texts), r)
        else:
            if query_tokens is None or len(query_tokens) != len(texts):
                raise ValueError("the overlap filter needs query_tokens: one token-id sequence per query text")
            deep = candidates or 4 * r
            if deep < r:
                raise ValueError(f"candidates must be >= r = {r}, got {deep}")
            cand_scores, cand_rows = self.search(self.embedder.embed(texts), deep)
            scores, rows = self._filter(cand_scores, cand_rows, query_tokens, overlap_threshold, r)
        refs = self.bank.references(rows[rows >= 0].tolist())
        by_row = {ref.row: ref.id for ref in refs if ref is not None}
        ids = [[by_row[x] for x in row.tolist() if x >= 0] for row in rows]
        return Retrieval(rows, scores, ids)

    def _filter(self, cand_scores, cand_rows, query_tokens, threshold, r):
        rows = torch.full((len(cand_rows), r), -1, dtype=torch.long)
        scores = torch.full((len(cand_rows), r), float("-inf"))
        refs = {ref.row: ref for ref in self.bank.references(sorted(set(cand_rows[cand_rows >= 0].tolist()))) if ref}
        for q in range(len(cand_rows)):
            kept = 0
            for s, row in zip(cand_scores[q].tolist(), cand_rows[q].tolist()):
                if row < 0 or kept == r:
                    break
                if overlap_exceeds(query_tokens[q], self._ref_tokens(refs[row]), threshold):
                    continue
                rows[q, kept], scores[q, kept] = row, s
                kept += 1
        return scores, rows

    def _ref_tokens(self, ref) -> list[int]:
        if ref.tokens is not None:
            return ref.tokens
        if self.tokenize is None:
            raise ValueError(f"reference {ref.id!r} was stored without tokens: the overlap filter needs "
                             "Retriever(..., tokenize=...) to tokenize it")
        return list(self.tokenize(ref.text))


def _extends(old: list[dict], new: list[dict]) -> bool:
    """True when the rows of shard list `new` are those of `old` plus rows appended after."""
    if len(old) > len(new):
        return False
    for i, s in enumerate(old):
        n = new[i]
        if n["name"] != s["name"] or n["rows"] < s["rows"] or (i < len(old) - 1 and n["rows"] != s["rows"]):
            return False
    return True
