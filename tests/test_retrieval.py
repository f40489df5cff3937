"""Retrieval: the index (FAISS flat/IVF/HNSW against the exact torch search, tombstones,
persistence beside the bank) and the Retriever with the real default embedder."""
from __future__ import annotations

import pytest
import torch

import memory3.retrieval.index as index_module
from memory3.memory.bank import Bank
from memory3.memory.errors import BankError
from memory3.memory.manifest import MemoryShape
from memory3.memory.rewrite import compact
from memory3.retrieval import DEFAULT_EMBEDDER, Embedder, Retriever, VectorIndex

SHAPE = MemoryShape(layers=1, kv_heads=1, tokens=8, head_dim=8)
faiss_only = pytest.mark.skipif(index_module.faiss is None, reason="faiss is not installed")


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(32, dim, generator=g)
    return torch.nn.functional.normalize(centers[torch.randint(0, 32, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g), dim=1)


@faiss_only
def test_faiss_flat_and_exact_torch_give_the_same_top_r():
    x, q = unit(3000, 48, 0), unit(64, 48, 1)
    deleted = torch.zeros(3000, dtype=torch.bool)
    deleted[torch.randperm(3000, generator=torch.Generator().manual_seed(2))[:300]] = True
    flat, exact = VectorIndex(48, "flat", backend="faiss"), VectorIndex(48, "flat", backend="torch")
    for part in x.split(1000):  # added in batches
        flat.add(part)
        exact.add(part)
    for mask in (None, deleted):
        s1, r1 = flat.search(q, 10, deleted=mask)
        s2, r2 = exact.search(q, 10, deleted=mask)
        assert torch.equal(r1, r2)
        torch.testing.assert_close(s1, s2, rtol=0, atol=1e-5)
        assert (s1[:, :-1] >= s1[:, 1:]).all()  # best first
    assert not deleted[r1].any()
    torch.testing.assert_close(s2, (q @ x.T).masked_fill(deleted, -2).topk(10).values, rtol=0, atol=1e-6)


@faiss_only
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_true_neighbours(kind):
    x, q = clustered(4000, 32, 3), clustered(100, 32, 4)
    deleted = torch.zeros(4000, dtype=torch.bool)
    deleted[::7] = True
    approx, exact = VectorIndex(32, kind), VectorIndex(32, backend="torch")
    approx.add(x)
    exact.add(x)
    _, got = approx.search(q, 5, deleted=deleted)
    _, want = exact.search(q, 5, deleted=deleted)
    recall = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist())) / want.numel()
    assert recall >= 0.9, recall
    assert not deleted[got[got >= 0]].any()


def test_without_faiss_the_search_is_exact_torch(monkeypatch):
    monkeypatch.setattr(index_module, "faiss", None)
    index = VectorIndex(16, "hnsw")
    assert index.backend == "torch"
    x = unit(50, 16, 5)
    index.add(x)
    scores, rows = index.search(x[:3], 4)
    assert rows[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="needs the faiss-cpu package"):
        VectorIndex(16, backend="faiss")


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=faiss_only)])
def test_fewer_live_rows_than_r_pad_with_minus_one(backend):
    index = VectorIndex(8, backend=backend)
    index.add(unit(4, 8, 6))
    deleted = torch.tensor([False, True, False, False])
    scores, rows = index.search(unit(2, 8, 7), 5, deleted=deleted)
    assert (rows[:, 3:] == -1).all() and torch.isinf(scores[:, 3:]).all() and set(rows[0, :3].tolist()) == {0, 2, 3}
    with pytest.raises(ValueError, match=r"queries must be a float tensor \[n, 8\]"):
        index.search(torch.zeros(2, 7), 1)
    with pytest.raises(ValueError, match=r"deleted must be a bool tensor \[4\]"):
        index.search(torch.zeros(2, 8), 1, deleted=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="index kind must be one of flat, ivf, hnsw"):
        VectorIndex(8, "lsh")


# ---------------------------------------------------------------------------- with a bank


def bank_with_vectors(path, vectors: torch.Tensor, embedder="vectors") -> Bank:
    n = len(vectors)
    bank = Bank.create(path, shape=SHAPE, fingerprint="f", codec="fp32", embedder={"name": embedder, "dim": vectors.shape[1]},
                       shard_rows=64)
    bank.append([f"r{i}" for i in range(n)], [f"text {i}" for i in range(n)], torch.zeros(n, *SHAPE.memory), embeddings=vectors)
    return bank


@faiss_only
def test_index_is_saved_loaded_extended_and_rebuilt(tmp_path, monkeypatch):
    x = unit(200, 16, 8)
    bank = bank_with_vectors(tmp_path / "b", x[:150])
    retriever = Retriever(bank, kind="hnsw")
    assert (tmp_path / "b" / "index" / "hnsw.faiss").exists()
    # a second retriever loads the saved index instead of building one
    added = []
    monkeypatch.setattr(VectorIndex, "add", lambda self, e: added.append(len(e)))
    Retriever(bank, kind="hnsw")
    assert added == []
    monkeypatch.undo()
    # rows appended to the bank are added to the index before the next search
    bank.append([f"n{i}" for i in range(50)], ["x"] * 50, torch.zeros(50, *SHAPE.memory), embeddings=x[150:])
    _, rows = retriever.search(x[150:160], 1)
    assert rows[:, 0].tolist() == list(range(150, 160)) and retriever.index.ntotal == 200
    # tombstones are honoured; compaction renumbers the rows and the index is rebuilt
    bank.delete(["r0", "r1"])
    _, rows = retriever.search(x[:2], 1)
    assert rows[:, 0].tolist() != [0, 1]
    compact(bank)
    _, rows = retriever.search(x[2:4], 1)
    assert rows[:, 0].tolist() == [0, 1] and retriever.index.ntotal == 198
    # a damaged saved index is rebuilt from the embeddings, never read
    (tmp_path / "b" / "index" / "hnsw.faiss").write_bytes(b"\x00" * 64)
    again = Retriever(bank, kind="hnsw", save=False)
    assert again.index.ntotal == 198 and again.search(x[2:3], 1)[1].item() == 0


def test_retriever_refuses_another_embedder(tmp_path):
    bank = bank_with_vectors(tmp_path / "b", unit(3, 4, 9), embedder="other-model")

    class Fake:
        name, dim = DEFAULT_EMBEDDER, 384

    with pytest.raises(BankError, match="embedded with other-model \\(dim 4\\), but the retriever's embedder is all-MiniLM-L6-v2"):
        Retriever(bank, Fake())
    plain = Bank.create(tmp_path / "c", shape=SHAPE, fingerprint="f")
    with pytest.raises(BankError, match="has no embeddings"):
        Retriever(plain)


# ---------------------------------------------------------------------------- the real embedder


@pytest.fixture(scope="module")
def embedder():
    return Embedder(device="cpu")


def test_embedder_is_offline_normalized_and_semantic(embedder):
    assert embedder.name == DEFAULT_EMBEDDER and embedder.dim == 384
    x = embedder.embed(["The cat sat on the mat.", "A kitten was sitting on a rug.", "Stock markets fell sharply today."])
    assert x.shape == (3, 384) and x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=1), torch.ones(3))
    sim = x @ x.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="got one string"):
        embedder.embed("a string")
    with pytest.raises(ValueError, match="local sentence-transformers model directory"):
        Embedder("/no/such/model")


KB = ["Paris is the capital and largest city of France.",
      "The mitochondrion is the powerhouse of the cell.",
      "Python is a high-level programming language.",
      "The Eiffel Tower was completed in 1889 in Paris.",
      "Cats are small domesticated carnivorous mammals.",
      "Mount Everest is Earth's highest mountain above sea level."]


def test_retriever_end_to_end(tmp_path, embedder):
    bank = Bank.create(tmp_path / "kb", shape=SHAPE, fingerprint="f", embedder=embedder.spec())
    tokens = [t.lower().split() for t in KB]
    vocab = {w: i for i, w in enumerate(sorted({w for ws in tokens for w in ws} | {"what", "is", "france?"}))}
    ids = [[vocab[w] for w in ws] for ws in tokens]
    bank.append([f"kb{i}" for i in range(len(KB))], KB, torch.zeros(len(KB), *SHAPE.memory), embeddings=embedder.embed(KB), tokens=ids)
    retriever = Retriever(bank, embedder)
    hits = retriever.retrieve(["What is the capital of France?", "tallest mountain in the world", "felines as pets"], r=2)
    assert hits.rows.shape == (3, 2) and hits.scores.shape == (3, 2)
    assert [h[0] for h in hits.ids] == ["kb0", "kb5", "kb4"]
    bank.delete(["kb0"])
    assert retriever.retrieve(["What is the capital of France?"], r=1).ids == [["kb3"]]
    # the overlap filter drops a reference the query contains (eq. 6 > threshold)
    query = KB[3]
    hits = retriever.retrieve([query], r=2, query_tokens=[ids[3]], overlap_threshold=2 / 3)
    assert "kb3" not in hits.ids[0] and len(hits.ids[0]) == 2
    assert "kb3" in retriever.retrieve([query], r=2).ids[0]
    with pytest.raises(ValueError, match="needs query_tokens"):
        retriever.retrieve([query], r=2, overlap_threshold=0.5)
