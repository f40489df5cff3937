"""Storage codecs of a memory bank, and their registry.

A codec turns one memory layer's keys and values, k and v [n, Hkv, M, D] float, into
fixed-size rows of named arrays (one file per array per shard, see shards.py), and back:

    codec = make_codec("int8", shape)            # shape: manifest.MemoryShape
    arrays = codec.encode(layer, k, v)           # {"k": int8 [n, Hkv, M, D], "k_scale": ..., ...}
    k, v = codec.decode(layer, arrays, ids, out_dtype)   # rows ids (int64 [n]) -> [n, Hkv, M, D]

Decoding goes through gather_rows / dequantize_rows: the compiled ops, or their reference on
a device whose kernel is not built yet (so a GPU bank works before its CUDA kernels land).

Built in:  bf16 / fp16 / fp32 (raw), int8 (one scale per memory/head/token), int4 (groups of
32 along D), pq (product quantization, codebooks trained on the bank's first append), vq
(the paper's FAISS OPQ,Residual2x14,PQ8x10: memory/vq_codec.py, imported on first use). Raw
and int8 banks are `in_place`: ops.memory_attention reads their rows by id directly
(`layer_bank`). The others are read by gather + decode (ops.dequantize_memory with ids).

Plugging in a codec (e.g. the paper's vq): subclass Codec, then

    register_codec("vq", VQCodec)                       # or, imported on first use:
    register_codec("vq", "memory3.memory.vq:VQCodec")

A codec with learned state returns it from state_dict() (tensors only: it is stored as
safetensors in the bank and handed back through load_state_dict()); needs_training() says
whether train(memories) must run before the first encode. config() must be JSON and is
passed back as keyword arguments when a bank is reopened.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from math import prod

import torch
from torch import Tensor

from memory3 import ops, reference
from memory3.memory.manifest import MemoryShape


def _has_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{op}", key)


def gather_rows(mem_k: Tensor, mem_v: Tensor, ids: Tensor, out_dtype, k_scale=None, v_scale=None) -> tuple[Tensor, Tensor]:
    """ops.gather_memory, or its reference on a device whose kernel is not built yet."""
    if _has_kernel("gather_memory", ids.device):
        return ops.gather_memory(mem_k, mem_v, ids, out_dtype, k_scale, v_scale)
    return reference.gather_memory_ref(mem_k, mem_v, ids, out_dtype, k_scale, v_scale)


def dequantize_rows(codes: Tensor, meta: Tensor, codec: str, ids: Tensor, out_dtype) -> Tensor:
    """ops.dequantize_memory with ids, or its reference where the kernel is not built yet."""
    if _has_kernel("dequantize_memory", ids.device):
        return ops.dequantize_memory(codes, meta, codec, ids, out_dtype)
    return reference.dequantize_memory_ref(codes, meta, codec, ids, out_dtype)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a layer's rows: `shape` per row, stored as `dtype`."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Codec:
    """Base class: subclasses set `name`, `in_place` and implement arrays/encode/decode."""

    name: str = ""
    in_place: bool = False  # ops.memory_attention reads the rows as stored (float or int8+scales)

    def __init__(self, shape: MemoryShape):
        self.shape = shape

    def config(self) -> dict:
        return {}

    def arrays(self) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def needs_training(self) -> bool:
        return False

    def train(self, memories: Tensor) -> None:
        """Fit learned state on a sample of memories [n, L, 2, Hkv, M, D]."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"codec {self.name} has no state, got {sorted(state)}")

    def encode(self, layer: int, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, layer: int, arrays: dict[str, Tensor], ids: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def layer_bank(self, arrays: dict[str, Tensor]) -> dict[str, Tensor | None]:
        """mem_k, mem_v, mem_k_scale, mem_v_scale for ops.memory_attention (in_place codecs)."""
        raise ValueError(
            f"codec {self.name} cannot be read in place by memory_attention; gather the rows "
            f"with Bank.gather (in-place codecs: {', '.join(n for n in codec_names() if _lookup(n).in_place)})"
        )


class RawCodec(Codec):
    in_place = True
    dtype: torch.dtype = torch.bfloat16

    def arrays(self):
        return {"k": ArraySpec(self.dtype, self.shape.layer), "v": ArraySpec(self.dtype, self.shape.layer)}

    def encode(self, layer, k, v):
        return {"k": k.to(self.dtype), "v": v.to(self.dtype)}

    def decode(self, layer, arrays, ids, out_dtype):
        return gather_rows(arrays["k"], arrays["v"], ids, out_dtype)

    def layer_bank(self, arrays):
        return {"mem_k": arrays["k"], "mem_v": arrays["v"], "mem_k_scale": None, "mem_v_scale": None}


class BF16Codec(RawCodec):
    name, dtype = "bf16", torch.bfloat16


class FP16Codec(RawCodec):
    name, dtype = "fp16", torch.float16


class FP32Codec(RawCodec):
    name, dtype = "fp32", torch.float32


class Int8Codec(Codec):
    name, in_place = "int8", True

    def arrays(self):
        codes, scale = ArraySpec(torch.int8, self.shape.layer), ArraySpec(torch.float32, self.shape.layer[:2])
        return {"k": codes, "v": codes, "k_scale": scale, "v_scale": scale}

    def encode(self, layer, k, v):
        (kc, ks), (vc, vs) = ops.quantize_memory(k, "int8"), ops.quantize_memory(v, "int8")
        return {"k": kc, "v": vc, "k_scale": ks, "v_scale": vs}

    def decode(self, layer, arrays, ids, out_dtype):
        a = arrays
        return gather_rows(a["k"], a["v"], ids, out_dtype, a["k_scale"], a["v_scale"])

    def layer_bank(self, arrays):
        a = arrays
        return {"mem_k": a["k"], "mem_v": a["v"], "mem_k_scale": a["k_scale"], "mem_v_scale": a["v_scale"]}


class Int4Codec(Codec):
    name = "int4"

    def __init__(self, shape):
        if shape.head_dim % 2:
            raise ValueError(f"int4 packs two values per byte: head_dim must be even, got {shape.head_dim}")
        super().__init__(shape)

    def arrays(self):
        Hkv, M, D = self.shape.layer
        codes, meta = ArraySpec(torch.uint8, (Hkv, M, D // 2)), ArraySpec(torch.float32, (Hkv, M, (D + 31) // 32, 2))
        return {"k": codes, "v": codes, "k_meta": meta, "v_meta": meta}

    def encode(self, layer, k, v):
        (kc, km), (vc, vm) = ops.quantize_memory(k, "int4"), ops.quantize_memory(v, "int4")
        return {"k": kc, "v": vc, "k_meta": km, "v_meta": vm}

    def decode(self, layer, arrays, ids, out_dtype):
        a = arrays
        return (
            dequantize_rows(a["k"], a["k_meta"], "int4", ids, out_dtype),
            dequantize_rows(a["v"], a["v_meta"], "int4", ids, out_dtype),
        )


class PQCodec(Codec):
    """One 256-entry codebook per (layer, keys/values, KV head, sub-space), trained with
    ops.train_pq_codebook on the first memories appended (or Bank.train_codec)."""

    name = "pq"

    def __init__(self, shape, sub_dim: int = 8, iters: int = 20, seed: int = 0):
        if sub_dim <= 0 or shape.head_dim % sub_dim:
            raise ValueError(f"pq sub_dim must divide head_dim={shape.head_dim}, got {sub_dim}")
        super().__init__(shape)
        self.sub_dim, self.iters, self.seed = sub_dim, iters, seed
        self.codebooks: dict[str, Tensor] = {}

    def config(self):
        return {"sub_dim": self.sub_dim, "iters": self.iters, "seed": self.seed}

    def arrays(self):
        Hkv, M, D = self.shape.layer
        codes = ArraySpec(torch.uint8, (Hkv, M, D // self.sub_dim))
        return {"k": codes, "v": codes}

    def _keys(self):
        return [f"layer{l}.{kv}" for l in range(self.shape.layers) for kv in ("k", "v")]

    def needs_training(self):
        return not self.codebooks

    def train(self, memories):
        for l in range(self.shape.layers):
            for i, kv in enumerate(("k", "v")):
                x = memories[:, l, i].float()
                self.codebooks[f"layer{l}.{kv}"] = ops.train_pq_codebook(x, sub_dim=self.sub_dim, iters=self.iters, seed=self.seed)

    def state_dict(self):
        return dict(self.codebooks)

    def load_state_dict(self, state):
        Hkv, _, D = self.shape.layer
        want = (Hkv, D // self.sub_dim, 256, self.sub_dim)
        if sorted(state) != sorted(self._keys()):
            raise ValueError(f"pq codec state must hold codebooks {self._keys()[:2]}..., got {sorted(state)[:4]}")
        for key, cb in state.items():
            if tuple(cb.shape) != want or cb.dtype != torch.float32:
                raise ValueError(f"pq codebook {key} must be float32 {want}, got {cb.dtype} {tuple(cb.shape)}")
        self.codebooks = {k: v.contiguous() for k, v in state.items()}

    def encode(self, layer, k, v):
        if self.needs_training():
            raise ValueError("the pq codec is not trained yet: call train(memories) first")
        out = {}
        for kv, x in (("k", k), ("v", v)):
            out[kv], _ = ops.quantize_memory(x, "pq", codebook=self.codebooks[f"layer{layer}.{kv}"])
        return out

    def decode(self, layer, arrays, ids, out_dtype):
        return tuple(
            dequantize_rows(arrays[kv], self.codebooks[f"layer{layer}.{kv}"].to(arrays[kv].device), "pq", ids, out_dtype)
            for kv in ("k", "v")
        )


_REGISTRY: dict[str, type[Codec] | str] = {}


def register_codec(name: str, codec: type[Codec] | str) -> None:
    """Make `name` usable in banks: a Codec subclass, or "module:Class" imported on first use."""
    if not isinstance(codec, str) and not (isinstance(codec, type) and issubclass(codec, Codec)):
        raise ValueError(f"codec must be a Codec subclass or a 'module:Class' string, got {codec!r}")
    _REGISTRY[name] = codec


def codec_names() -> list[str]:
    return list(_REGISTRY)


def _lookup(name: str) -> type[Codec]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown memory codec {name!r}; registered codecs: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"memory codec {name!r} is registered as {_REGISTRY[name]!r}, which cannot be loaded: {exc}") from None
        _REGISTRY[name] = entry
    return entry


def make_codec(name: str, shape: MemoryShape, config: dict | None = None) -> Codec:
    """A codec instance for memories of `shape`; `config` are its keyword options."""
    try:
        return _lookup(name)(shape, **(config or {}))
    except TypeError as exc:
        raise ValueError(f"bad options {config} for memory codec {name!r}: {exc}") from None


for _cls in (BF16Codec, FP16Codec, FP32Codec, Int8Codec, Int4Codec, PQCodec):
    register_codec(_cls.name, _cls)
register_codec("vq", "memory3.memory.vq_codec:VQCodec")  # the paper's FAISS composite; imports FAISS on first use
