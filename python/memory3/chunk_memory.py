"""The memories of a chunk while generating: retrieve references for query texts, drop those
that overlap the query (eq. 6), and gather their memories once through the bank's cache.

    source = ChunkMemory(bank, retriever, model)      # bank: memory3.memory.bank.Bank
    hits, mem = source.fetch(texts, token_lists)      # hits: per query; mem [L, 2, q, R, Hkv, M, D]

`retriever` is anything with memory3.retrieval.Retriever's `retrieve(texts, r, query_tokens=,
overlap_threshold=, candidates=)` returning rows [q, r] (-1 = none), scores and ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Hit:
    """The references one query retrieved (after the overlap filter), best first."""

    rows: list[int]  # bank row ids, -1 where fewer than R were found
    ids: list[str]  # the references' ids (only the found ones)
    scores: list[float]  # retrieval scores (cosine), -inf where rows is -1


@dataclass
class ChunkRetrieval:
    """What one chunk of one generated sequence read (generate(..., return_retrieval=True))."""

    chunk: int  # chunk index on the 64-token grid counted from the first context token
    query: str | None  # the text it retrieved with; None when it kept the previous chunk's memories
    ids: list[str]
    rows: list[int]
    scores: list[float]

    @property
    def inherited(self) -> bool:
        return self.query is None


class ChunkMemory:
    def __init__(self, bank, retriever, model, *, overlap_threshold: float | None = 2 / 3,
                 candidates: int | None = None):
        c = model.config
        if tuple(bank.shape.memory) != tuple(c.memory_shape):
            raise ValueError(f"memory bank {bank.path} holds memories of shape {tuple(bank.shape.memory)}, but the "
                             f"model reads {tuple(c.memory_shape)} (layers, 2, Hkv, M, D): encode the bank with this model")
        if overlap_threshold is not None and not 0 <= overlap_threshold <= 1:
            raise ValueError(f"overlap_threshold must be in [0, 1] or None (no filter), got {overlap_threshold}")
        self.bank, self.retriever = bank, retriever
        self.r, self.overlap_threshold, self.candidates = c.memories_per_chunk, overlap_threshold, candidates
        self.dtype, self.device = model.dtype, model.device
        self.special = {c.pad_id, c.bos_id, c.eos_id, *c.prefix_ids}

    def retrieve(self, texts: list[str], tokens: list[list[int]]) -> list[Hit]:
        """R references for each query text; `tokens` are the query's model token ids (the
        overlap filter compares them with the references' stored tokens)."""
        tokens = [[t for t in seq if t not in self.special] for seq in tokens]
        found = self.retriever.retrieve(texts, self.r, query_tokens=tokens, overlap_threshold=self.overlap_threshold,
                                        candidates=self.candidates)
        return [Hit(found.rows[q].tolist(), list(found.ids[q]), found.scores[q].tolist()) for q in range(len(texts))]

    def gather(self, rows: Tensor) -> Tensor:
        """Memories of bank rows [..., R] (-1 = zeros): [L, 2, ..., R, Hkv, M, D] in the model's
        dtype on its device, read through the bank's LRU cache."""
        return self.bank.gather(rows).to(self.device, self.dtype)

    def fetch(self, texts: list[str], tokens: list[list[int]]) -> tuple[list[Hit], Tensor]:
        """retrieve + gather: the unit of work generation prefetches for the next chunk."""
        hits = self.retrieve(texts, tokens)
        rows = torch.tensor([h.rows for h in hits], dtype=torch.long).reshape(len(hits), self.r)
        return hits, self.gather(rows)
