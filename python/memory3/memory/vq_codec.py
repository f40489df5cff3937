"""The bank codec `vq`: the paper's FAISS OPQ,Residual2x14,PQ8x10 (memory3.vq), one quantizer
per (memory layer, keys/values) shared by the KV heads, trained with FAISS on the first
memories appended (or Bank.train_codec), encoded with FAISS, decoded by our kernel
(ops.dequantize_memory(..., "vq")). 14 bytes per vector with the paper's numbers.

Sample size: a quantizer needs at least max(2^coarse_bits, 2^pq_bits, 256) vectors (16,384
with the paper's numbers), i.e. min_train_memories = ceil(16384 / (kv_heads * tokens)): 256
for the 2.4B model (8 heads x 8 tokens), 1,024 for the tiny preset (2 x 8). Fewer is refused
with that number; memory.encode trains on that many references before its first append.
Smaller samples can use codec_config={"coarse_bits": 8} (a 2x8 coarse level, 12 bytes per
vector, 1,024 vectors with PQ8x10).
"""
from __future__ import annotations

from math import ceil

import torch
from tqdm.auto import tqdm

from memory3 import ops
from memory3.memory.codecs import ArraySpec, Codec, dequantize_rows
from memory3.vq import VQSpec, spec_from_meta, train_vq


class VQCodec(Codec):
    name = "vq"

    def __init__(self, shape, coarse_bits: int = 14, pq_m: int = 8, pq_bits: int = 10, opq_m: int = 0,
                 max_train_points: int | None = 1 << 18, seed: int = 0):
        super().__init__(shape)
        self.spec = VQSpec(shape.head_dim, coarse_bits=coarse_bits, pq_m=pq_m, pq_bits=pq_bits, opq_m=opq_m)
        self.max_train_points, self.seed = max_train_points, seed
        self.metas: dict[str, torch.Tensor] = {}

    def config(self):
        s = self.spec
        return {"coarse_bits": s.coarse_bits, "pq_m": s.pq_m, "pq_bits": s.pq_bits, "opq_m": s.opq_m,
                "max_train_points": self.max_train_points, "seed": self.seed}

    def arrays(self):
        Hkv, M, _ = self.shape.layer
        codes = ArraySpec(torch.uint8, (Hkv, M, self.spec.code_size))
        return {"k": codes, "v": codes}

    def _keys(self):
        return [f"layer{l}.{kv}" for l in range(self.shape.layers) for kv in ("k", "v")]

    def needs_training(self):
        return not self.metas

    @property
    def min_train_memories(self) -> int:
        """Fewest memories train() accepts: 2^coarse_bits vectors per quantizer."""
        Hkv, M, _ = self.shape.layer
        return ceil(self.spec.min_train / (Hkv * M))

    def train(self, memories):
        Hkv, M, _ = self.shape.layer
        have = memories.shape[0] * Hkv * M
        if have < self.spec.min_train:
            raise ValueError(
                f"the vq codec ({self.spec.factory}) trains on at least {self.spec.min_train} vectors per "
                f"quantizer, i.e. {self.min_train_memories} memories of {Hkv} heads x {M} tokens; got "
                f"{memories.shape[0]} memories (train it on a larger sample first: Bank.train_codec)"
            )
        metas = {}
        for key in tqdm(self._keys(), desc=f"training vq {self.spec.factory}", unit="quantizer", leave=False):
            l, kv = int(key[5:].split(".")[0]), key[-1]
            x = memories[:, l, 0 if kv == "k" else 1]
            metas[key] = train_vq(x, self.spec, seed=self.seed, max_points=self.max_train_points)
        self.metas = metas

    def state_dict(self):
        return dict(self.metas)

    def load_state_dict(self, state):
        if sorted(state) != sorted(self._keys()):
            raise ValueError(f"vq codec state must hold metas {self._keys()[:2]}..., got {sorted(state)[:4]}")
        for key, meta in state.items():
            if spec_from_meta(meta) != self.spec:
                raise ValueError(f"vq meta {key} is for {spec_from_meta(meta).factory}, not {self.spec.factory}")
        self.metas = {k: v.contiguous() for k, v in state.items()}

    def encode(self, layer, k, v):
        if self.needs_training():
            raise ValueError("the vq codec is not trained yet: call train(memories) first")
        return {kv: ops.quantize_memory(x, "vq", codebook=self.metas[f"layer{layer}.{kv}"])[0] for kv, x in (("k", k), ("v", v))}

    def decode(self, layer, arrays, ids, out_dtype):
        return tuple(
            dequantize_rows(arrays[kv], self.metas[f"layer{layer}.{kv}"].to(arrays[kv].device), "vq", ids, out_dtype)
            for kv in ("k", "v")
        )
