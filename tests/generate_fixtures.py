"""Helpers for the generation tests: a tiny model, a bank of random memories, a fast
deterministic embedder and a retriever that records what it was asked."""
from __future__ import annotations

import zlib

import torch

from memory3.memory.bank import Bank
from memory3.memory.manifest import MemoryShape
from memory3.model import Memory3Config, Memory3Model, Memory3Tokenizer, fingerprint
from memory3.retrieval import Retriever


class TrigramEmbedder:
    """Hashed character trigrams, L2-normalized: texts sharing trigrams are near. Stands in
    for the sentence-transformers model (same name/dim/embed interface), in milliseconds."""

    name, dim = "trigram-test", 64

    def embed(self, texts, **_):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            t = f"  {t}  "
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j : j + 3].encode()) % self.dim] += 1
        return torch.nn.functional.normalize(out + 1e-6, dim=1)

    def spec(self):
        return {"name": self.name, "dim": self.dim}


class RecordingRetriever:
    """A Retriever that keeps the query texts of every retrieve() call."""

    def __init__(self, inner: Retriever):
        self.inner, self.bank, self.calls = inner, inner.bank, []

    def retrieve(self, texts, r, **kwargs):
        self.calls.append(list(texts))
        return self.inner.retrieve(texts, r, **kwargs)


def tiny_model(chunk_size: int = 8, seed: int = 0) -> Memory3Model:
    torch.manual_seed(seed)
    return Memory3Model(Memory3Config.preset("tiny", chunk_size=chunk_size, memories_per_chunk=3)).eval()


def reference_texts(n: int) -> list[str]:
    colors = ["red", "blue", "green", "amber", "violet", "grey", "white"]
    towns = ["Oslo", "Lima", "Pune", "Graz", "Nice", "Kobe", "Turin", "Leeds"]
    return [f"Item {i} is {colors[i % 7]} and was made in {towns[i % 8]} in {1900 + 7 * i}." for i in range(n)]


def random_bank(path, model: Memory3Model, texts: list[str], seed: int = 0) -> Bank:
    """A float32 bank of random memories (scaled like real keys/values would not matter: the
    tests compare generation with a manual forward on the same memories)."""
    tokenizer = Memory3Tokenizer.byte_level()
    c = model.config
    emb = TrigramEmbedder()
    bank = Bank.create(path, shape=MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens, c.head_dim),
                       fingerprint=fingerprint(model), codec="fp32", embedder=emb.spec(), dtype=torch.float32,
                       device="cpu")
    g = torch.Generator().manual_seed(seed)
    memories = torch.randn(len(texts), *c.memory_shape, generator=g)
    bank.append([f"ref-{i}" for i in range(len(texts))], texts, memories, embeddings=emb.embed(texts),
                tokens=[tokenizer.reference_ids(t, c.ref_len) for t in texts])
    return bank


def retriever_for(bank: Bank) -> RecordingRetriever:
    return RecordingRetriever(Retriever(bank, TrigramEmbedder(), kind="flat", save=False))
