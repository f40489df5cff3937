"""The paper's vector-quantization codec `vq`: FAISS `OPQ{D/4}_{D},Residual2x14,PQ8x10`.

FAISS trains and encodes; our kernels decode (ops.dequantize_memory(codes, meta, "vq")),
and tests hold them to FAISS's own `sa_decode` on the same codes. For D = 80 this is the
paper's `OPQ20x80-Residual2x14-PQ8x10` (FAISS 1.15 spells it `OPQ20_80`), 14 bytes per vector.

What FAISS builds from that string (faiss/index_factory.cpp, Index2Layer.cpp,
MultiIndexQuantizer, OPQMatrix, PQ encoders), and so what a code means:

    y = A x                       OPQ: an orthonormal D x D rotation (OPQMatrix.A)
    y ~ [C0[i0] | C1[i1]]         level 1, "Residual2x14": a MultiIndexQuantizer(D, 2, 14),
                                  i.e. a product quantizer with 2 halves of D/2 dims and
                                  2^14 centroids each; list number i0 + (i1 << 14)
      + [P0[j0] | ... | P7[j7]]   level 2, "PQ8x10": the residual, 8 sub-vectors of D/8 dims,
                                  1024 centroids each (Index2Layer, use_2layer)
    x_hat = A^T y_hat             decoding: lookups, one add, the transposed rotation

    code = [list number: ceil(2*14/8) = 4 bytes, little-endian]
           [j0..j7: 10 bits each, one little-endian bit stream, LSB first: 10 bytes]

meta: one float32 tensor [1 + D + 2^coarse_bits + 2^pq_bits, D], rows of D values, so the
head dim is meta.shape[1] (fake kernels need no data):

    row 0                 header: [format 1, coarse_bits, pq_m, pq_bits, opq_m, 0, ...]
    rows 1 .. D           A, the rotation [D, D] (y = A x)
    next 2^coarse_bits    level 1: row n = [C0[n] | C1[n]]          (2 halves of D/2)
    next 2^pq_bits        level 2: row n = [P0[n] | P1[n] | ... ]   (pq_m parts of D/pq_m)

Supported head dims: D % 8 == 0 (even for the 2 halves, a multiple of pq_m = 8 and of the
OPQ's 4-dim blocks), 8 <= D <= 512 (the kernels keep a vector in registers/stack).
Training sample. The coarse level runs k-means with 2^14 centroids per half, and FAISS
refuses fewer training vectors than centroids ("Number of training points (8000) should be
at least as large as number of clusters (16384)"), but only after it has trained the OPQ
rotation (123 s wasted in that measurement): train_vq refuses first, naming the minimum,
max(2^coarse_bits, 2^pq_bits, 256) vectors (OPQ trains a PQ of 256 centroids). FAISS warns below 39 vectors per centroid (638,976). Measured on the
shared 2-core machine (bench/bench_vq.py, tiny preset, 16,576 vectors per quantizer, just
above the minimum): about 200 s of training per quantizer, held-out relative L2 error 0.074.
Training time grows linearly with the sample (VQCodec caps it at 2^18 vectors by default).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

VQ_FORMAT = 1  # meta row 0, column 0
VQ_MIN_D, VQ_MAX_D = 8, 512  # keep in sync with csrc/include/memory3/vq.h kVqMaxD


@dataclass(frozen=True)
class VQSpec:
    """One vq quantizer: head dim D and the factory's numbers (the paper's by default)."""

    head_dim: int
    coarse_bits: int = 14  # Residual2x{coarse_bits}: 2^coarse_bits centroids per half
    pq_m: int = 8  # PQ{pq_m}x{pq_bits} on the residual
    pq_bits: int = 10
    opq_m: int = 0  # OPQ{opq_m}_{D}; 0 = D / 4 (the paper's 20 for D = 80)

    def __post_init__(self):
        D = self.head_dim
        if not isinstance(D, int) or D % 8 or not VQ_MIN_D <= D <= VQ_MAX_D:
            raise ValueError(
                f"vq supports head dims D that are multiples of 8 in [{VQ_MIN_D}, {VQ_MAX_D}] "
                f"(2 coarse halves, PQ8 sub-vectors, OPQ blocks of 4), got D={D}"
            )
        if not 1 <= self.coarse_bits <= 16:
            raise ValueError(f"vq coarse_bits must be in [1, 16], got {self.coarse_bits}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"vq pq_bits must be in [1, 16], got {self.pq_bits}")
        if self.pq_m < 1 or D % self.pq_m:
            raise ValueError(f"vq pq_m must divide the head dim D={D}, got {self.pq_m}")
        if self.opq_m == 0:
            object.__setattr__(self, "opq_m", D // 4)
        if self.opq_m < 1 or D % self.opq_m:
            raise ValueError(f"vq opq_m must divide the head dim D={D}, got {self.opq_m}")

    @property
    def factory(self) -> str:
        return f"OPQ{self.opq_m}_{self.head_dim},Residual2x{self.coarse_bits},PQ{self.pq_m}x{self.pq_bits}"

    @property
    def coarse_bytes(self) -> int:  # Index2Layer.code_size_1: bytes of list numbers < 2^(2 * coarse_bits)
        return (2 * self.coarse_bits + 7) // 8

    @property
    def code_size(self) -> int:
        return self.coarse_bytes + (self.pq_m * self.pq_bits + 7) // 8

    @property
    def meta_rows(self) -> int:
        return 1 + self.head_dim + (1 << self.coarse_bits) + (1 << self.pq_bits)

    @property
    def min_train(self) -> int:
        """Fewest training vectors FAISS accepts: one per centroid of a coarse half, of a fine
        sub-space, and of OPQ's own 256-centroid product quantizer."""
        return max(1 << self.coarse_bits, 1 << self.pq_bits, 256)


def spec_from_meta(meta: Tensor) -> VQSpec:
    """The VQSpec a meta tensor was made for; ValueError if meta is not a vq meta."""
    if not isinstance(meta, Tensor) or meta.dim() != 2 or meta.dtype != torch.float32:
        raise ValueError(f"vq meta must be float32 [1 + D + 2^coarse_bits + 2^pq_bits, D], got {_describe(meta)}")
    D = meta.shape[1]
    if D < 5:
        raise ValueError(f"vq meta must be float32 [1 + D + 2^coarse_bits + 2^pq_bits, D], got {_describe(meta)}")
    head = meta[0, :5].tolist()
    if head[0] != VQ_FORMAT or any(h != int(h) for h in head):
        raise ValueError(f"vq meta row 0 must be the header [{VQ_FORMAT}, coarse_bits, pq_m, pq_bits, opq_m], got {head}")
    spec = VQSpec(D, coarse_bits=int(head[1]), pq_m=int(head[2]), pq_bits=int(head[3]), opq_m=int(head[4]))
    if meta.shape[0] != spec.meta_rows:
        raise ValueError(f"vq meta for {spec.factory} must have {spec.meta_rows} rows, got {meta.shape[0]}")
    return spec


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


# ---------------------------------------------------------------------------- FAISS <-> meta


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ValueError("the vq codec trains and encodes with FAISS: pip install faiss-cpu") from None
    return faiss


def meta_from_faiss(index, spec: VQSpec) -> Tensor:
    """The meta tensor of a trained FAISS IndexPreTransform(OPQMatrix, Index2Layer)."""
    faiss = _faiss()
    D = spec.head_dim
    pre = faiss.downcast_index(index)
    opq = faiss.downcast_VectorTransform(pre.chain.at(0))
    two = faiss.downcast_index(pre.index)
    multi = faiss.downcast_index(two.q1.quantizer)
    ncoarse, nfine = 1 << spec.coarse_bits, 1 << spec.pq_bits
    rot = faiss.vector_to_array(opq.A).reshape(D, D)
    # ProductQuantizer.centroids is [M, ksub, dsub]; a meta row n is centroid n of every part
    coarse = faiss.vector_to_array(multi.pq.centroids).reshape(2, ncoarse, D // 2).transpose(1, 0, 2)
    fine = faiss.vector_to_array(two.pq.centroids).reshape(spec.pq_m, nfine, D // spec.pq_m).transpose(1, 0, 2)
    header = np.zeros((1, D), np.float32)
    header[0, :5] = (VQ_FORMAT, spec.coarse_bits, spec.pq_m, spec.pq_bits, spec.opq_m)
    rows = [header, rot, coarse.reshape(ncoarse, D), fine.reshape(nfine, D)]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(rows).astype(np.float32)))


def faiss_from_meta(meta: Tensor):
    """A trained FAISS index (IndexPreTransform(OPQMatrix, Index2Layer)) holding exactly the
    rotation and codebooks of meta: what encode_vq runs and what tests decode with."""
    faiss = _faiss()
    spec = spec_from_meta(meta)
    D, ncoarse, nfine = spec.head_dim, 1 << spec.coarse_bits, 1 << spec.pq_bits
    m = meta.detach().cpu().numpy()
    rot = m[1 : 1 + D]
    coarse = m[1 + D : 1 + D + ncoarse].reshape(ncoarse, 2, D // 2).transpose(1, 0, 2)
    fine = m[1 + D + ncoarse :].reshape(nfine, spec.pq_m, D // spec.pq_m).transpose(1, 0, 2)
    index = faiss.index_factory(D, spec.factory)
    pre = faiss.downcast_index(index)
    opq = faiss.downcast_VectorTransform(pre.chain.at(0))
    faiss.copy_array_to_vector(np.ascontiguousarray(rot.ravel()), opq.A)
    opq.is_trained, opq.is_orthonormal = True, True
    two = faiss.downcast_index(pre.index)
    multi = faiss.downcast_index(two.q1.quantizer)
    faiss.copy_array_to_vector(np.ascontiguousarray(coarse.ravel()), multi.pq.centroids)
    multi.is_trained, multi.ntotal = True, ncoarse * ncoarse
    faiss.copy_array_to_vector(np.ascontiguousarray(fine.ravel()), two.pq.centroids)
    two.is_trained = True
    index.is_trained = True
    return index


# ---------------------------------------------------------------------------- train / encode


def train_vq(x: Tensor, spec: VQSpec | None = None, *, seed: int = 0, max_points: int | None = None) -> Tensor:
    """Train a vq quantizer with FAISS on vectors x [..., D] -> meta (module docstring).

    At most max_points vectors are used (a seeded sample; default FAISS's own caps). Needs
    at least spec.min_train vectors (2^coarse_bits): FAISS's k-means refuses fewer points
    than centroids, and so do we, with the numbers.
    """
    faiss = _faiss()
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., D], got {_describe(x)}")
    spec = spec or VQSpec(x.shape[-1])
    if x.shape[-1] != spec.head_dim:
        raise ValueError(f"x must be [..., D={spec.head_dim}] for {spec.factory}, got {tuple(x.shape)}")
    pts = x.detach().reshape(-1, spec.head_dim).float().cpu()
    if pts.shape[0] < spec.min_train:
        raise ValueError(
            f"vq {spec.factory} needs at least {spec.min_train} training vectors (one per centroid of its "
            f"largest k-means; FAISS refuses fewer), got {pts.shape[0]}"
        )
    gen = torch.Generator().manual_seed(seed)
    if max_points is not None and pts.shape[0] > max_points:
        pts = pts[torch.randperm(pts.shape[0], generator=gen)[: max(max_points, spec.min_train)]]
    index = faiss.index_factory(spec.head_dim, spec.factory)
    pre = faiss.downcast_index(index)
    two = faiss.downcast_index(pre.index)
    for pq in (faiss.downcast_index(two.q1.quantizer).pq, two.pq):
        pq.cp.seed = seed
    index.train(np.ascontiguousarray(pts.numpy()))
    return meta_from_faiss(index, spec)


def encode_vq(x: Tensor, meta: Tensor, index=None) -> Tensor:
    """FAISS sa_encode of x [..., D] with the quantizer of meta -> uint8 [..., code_size].
    `index` (faiss_from_meta(meta)) saves rebuilding it on repeated calls."""
    spec = spec_from_meta(meta)
    if not isinstance(x, Tensor) or x.shape[-1:] != (spec.head_dim,) or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., D={spec.head_dim}] for {spec.factory}, got {_describe(x)}")
    index = index if index is not None else faiss_from_meta(meta)
    flat = np.ascontiguousarray(x.detach().reshape(-1, spec.head_dim).float().cpu().numpy())
    codes = index.sa_encode(flat) if len(flat) else np.zeros((0, spec.code_size), np.uint8)
    return torch.from_numpy(codes).reshape(*x.shape[:-1], spec.code_size).to(x.device)
