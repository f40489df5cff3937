"""Retrieval for explicit memory: an embedder (sentence-transformers, offline), a vector
index (FAISS flat/IVF/HNSW, or exact torch search), the Retriever that searches a bank,
and the overlap filter of eq. (6).

    from memory3.retrieval import Embedder, Retriever, VectorIndex, overlap, filter_references
"""
from memory3.retrieval.embedder import DEFAULT_EMBEDDER, Embedder
from memory3.retrieval.index import INDEX_KINDS, VectorIndex
from memory3.retrieval.overlap import filter_references, overlap, overlap_exceeds
from memory3.retrieval.retriever import Retrieval, Retriever

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "INDEX_KINDS", "VectorIndex", "filter_references", "overlap",
           "overlap_exceeds", "Retrieval", "Retriever"]
