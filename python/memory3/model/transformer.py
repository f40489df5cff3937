"""The Memory³ transformer: a Llama-style decoder whose first layers read explicit memory.

Pre-RMSNorm, RoPE (rotate-half, as Hugging Face Llama), grouped-query attention, SwiGLU MLP,
untied embeddings. Memory layers call `memory3.ops.memory_attention`; every layer without
memories (and every layer when no memories are given) runs the same op with an empty bank:
it takes ragged kv_lens and a partly filled cache without a mask (decode, 1 CPU thread,
B=8, 1024-token cache: 0.63 ms vs 1.39 ms for masked SDPA) and is within ~10% of causal
SDPA on a whole sequence (B=8, T=256: 10.4 vs 9.3 ms forward, 44 vs 43 ms with backward).

Sequence layout (PAPER.md "Project decisions"), with P = config.prefix_len:

    index   0 .. P-1        the reference prefix `<s>Reference:`     position = index
    index   P ..            the context (`<s>` + text)               position = index + G
    memory  slot r of a chunk, token at reference index j            position = P + j (+ r*ref_len, ranked)

G = config.context_offset: ref_len (parallel positions) or memories_per_chunk * ref_len
(ranked); 0 for a model without memory layers. Chunk c covers context indices
P + c*chunk_size .. P + (c+1)*chunk_size - 1. Memory keys arrive rotated at P + j (the
encoder stores them so); ranked slots get their extra r*ref_len rotation here. With
`plain=True` the tokens are plain text at positions 0..S-1 and no memory is read (a Llama:
Hugging Face parity).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memory3 import ops
from memory3.model.cache import KVCache
from memory3.model.config import Memory3Config


@dataclass
class Memories:
    """Explicit memories handed to the model for one forward call (the model never fetches).

    k, v: one bank per memory layer (in config.memory_layers order), each [N, Hkv, M, D]:
        post-RoPE keys (rotated at their in-reference positions P..P+ref_len-1) and values,
        in the model's dtype, or int8 with float32 scales k_scale/v_scale [N, Hkv, M]. The
        banks may hold far more rows than are used (rows are read by id, in place).
    ids: int32 [B, C, R]: the R bank rows chunk c of sequence b reads; -1 = empty slot.
        C must cover every chunk of the context (C >= ceil((S - P) / chunk_size) for a
        context of S tokens, cache included); slot order is retrieval rank (it matters
        only with ranked positions).
    """

    k: list[Tensor]
    v: list[Tensor]
    ids: Tensor
    k_scale: list[Tensor] | None = None
    v_scale: list[Tensor] | None = None

    @classmethod
    def from_stacked(cls, memory: Tensor, ids: Tensor) -> "Memories":
        """From per-reference memories [N, n_memory_layers, 2, Hkv, M, D] (the encoder's output;
        differentiable, so a trainer's gradients reach the encoder) and ids [B, C, R] into N."""
        if memory.dim() != 6 or memory.shape[2] != 2:
            raise ValueError(f"memory must be [N, n_memory_layers, 2, Hkv, M, D], got {tuple(memory.shape)}")
        n_layers = memory.shape[1]
        k = [memory[:, i, 0].contiguous() for i in range(n_layers)]
        v = [memory[:, i, 1].contiguous() for i in range(n_layers)]
        return cls(k, v, ids)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [*positions.shape, 1, head_dim] for rotate-half RoPE at integer positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., D/2]
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., H, D] rotated by the angles of cos/sin [..., 1, D] (pairs i, i + D/2), returned
    in x's dtype: under bf16 autocast q, k come out of the linears in bf16 while cos/sin are
    float32, and the attention op needs q, k, v (and the memories) in one dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] before RoPE (the encoder scores with these)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v


class FeedForward(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.mlp_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.mlp_dim, bias=False)  # up
        self.w2 = nn.Linear(config.mlp_dim, config.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)


class Memory3Model(nn.Module):
    def __init__(self, config: Memory3Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # layer index -> its slot in Memories.k / .v
        self.memory_slot = {layer: i for i, layer in enumerate(config.memory_layers)}
        self._slot_rope: dict = {}  # ranked positions: (R, dtype, device) -> per-slot cos, sin
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def new_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A preallocated KV cache for up to max_batch sequences of max_seq tokens (prefix included)."""
        c = self.config
        return KVCache(c.n_layers, max_batch, max_seq, c.n_kv_heads, c.head_dim,
                       dtype=dtype or self.dtype, device=device or self.device)

    # ------------------------------------------------------------------ files (memory3.model.weights)

    def save_pretrained(self, directory, tokenizer=None):
        """config.json + model.safetensors + tokenizer.json (byte-level when none is given)."""
        from memory3.model.weights import save_pretrained

        return save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, *, dtype=None, device="cpu") -> "Memory3Model":
        from memory3.model.weights import from_pretrained

        return from_pretrained(directory, dtype=dtype, device=device)

    def fingerprint(self) -> str:
        """Hex digest of the config and the weights memories depend on (banks record it)."""
        from memory3.model.weights import fingerprint

        return fingerprint(self)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        tokens: Tensor,
        memories: Memories | None = None,
        *,
        cache: KVCache | None = None,
        kv_lens: Tensor | None = None,
        plain: bool = False,
        logits_at: Tensor | None = None,
        logits_where: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits [B, T, vocab_size] for T new tokens of B sequences.

        Args:
            tokens: int [B, T]. Without a cache, whole sequences in the layout of this
                module's docstring (prefix, then context; right padding is harmless: attention
                is causal). With a cache, the T tokens that follow what the cache holds.
            memories: the memories of every chunk (`Memories`), or None (no memory read).
            cache: a `KVCache` from `new_cache`; the T new keys/values are written into it.
            kv_lens: int32 [B], with a cache only: each sequence's length once the T new
                tokens are in (they go to indices kv_lens - T .. kv_lens - 1). A ragged
                prefill passes the padded length T for every sequence; the next call passes
                each true length + 1, so the padded rows are overwritten.
            plain: plain text at positions 0..S-1, no prefix offset and no memory (a Llama).
            logits_at: int [B], optional: compute logits only at this index of the T new
                tokens of each sequence (its last real token), returning [B, 1, vocab_size].
            logits_where: bool [B, T], optional: logits only at the True positions, returned
                as [K, vocab_size] in row-major order (a trainer whose loss reads a few answer
                tokens skips the output projection everywhere else).

        The decode step (T = 1, tensors for kv_lens) keeps static shapes, so
        `torch.compile` traces it once for every length.
        """
        B, T = self._check_inputs(tokens, memories, cache, kv_lens, plain)
        if logits_at is not None and (not isinstance(logits_at, Tensor) or logits_at.shape != (B,)
                                      or logits_at.dtype.is_floating_point):
            raise ValueError(f"logits_at must be an int tensor [B={B}] of indices into the T new tokens, "
                             f"got {_describe(logits_at)}")
        if logits_where is not None and (logits_at is not None or not isinstance(logits_where, Tensor)
                                         or logits_where.shape != (B, T) or logits_where.dtype != torch.bool):
            raise ValueError(f"logits_where must be a bool tensor [B={B}, T={T}] (and no logits_at), "
                             f"got {_describe(logits_where)}")
        c = self.config
        if cache is None:
            index = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            index = (kv_lens.to(torch.long) - T)[:, None] + torch.arange(T, device=tokens.device)
        offset = 0 if plain else c.context_offset
        positions = index + offset * (index >= c.prefix_len) if offset else index
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base, self.dtype)
        if memories is not None and c.memory_positions == "ranked":
            memories = self._rank_memories(memories)

        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            q, k, v = layer.attention.project(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            lens = None
            if cache is not None:
                k, v = cache.update(i, index, k, v)
                lens = kv_lens
            slot = self.memory_slot.get(i) if memories is not None else None
            if slot is None:
                out = causal_attention(q, k, v, lens)
            else:
                out, _ = ops.memory_attention(
                    q, k, v, memories.k[slot], memories.v[slot], memories.ids, lens,
                    chunk_size=c.chunk_size, chunk_start=c.prefix_len,
                    mem_k_scale=None if memories.k_scale is None else memories.k_scale[slot],
                    mem_v_scale=None if memories.v_scale is None else memories.v_scale[slot],
                )
            x = x + layer.attention.wo(out.reshape(B, T, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        elif logits_where is not None:
            x = x[logits_where]
        return self.output(self.norm(x))

    def _rank_memories(self, memories: Memories) -> Memories:
        """Ranked positions: slot r's keys rotated by a further r*ref_len. Gathers the used rows
        (float, model dtype) once per call; the result is a bank of B*C*R rows with ids 0...
        One slot per chunk is slot 0, which is not shifted: its rows are read in place."""
        c = self.config
        ids = memories.ids
        B, C, R = ids.shape
        if R <= 1:
            return memories
        dtype = self.dtype  # the dtype q will have: the autocast one inside autocast
        if torch.is_autocast_enabled(ids.device.type):
            dtype = torch.get_autocast_dtype(ids.device.type)
        key = (R, self.dtype, ids.device)
        if key not in self._slot_rope:  # a few (R, dtype, device) per model; saves 8 small ops a call
            shift = torch.arange(R, device=ids.device) * c.ref_len  # [R]
            cos, sin = rope_cos_sin(shift, c.head_dim, c.rope_base, self.dtype)  # [R, 1, D]
            self._slot_rope[key] = (cos[:, :, None], sin[:, :, None])  # [R, 1, 1, D] over [R, Hkv, M, D]
        cos, sin = self._slot_rope[key]
        ks, vs = [], []
        for slot in range(len(memories.k)):
            k, v = ops.gather_memory(
                memories.k[slot], memories.v[slot], ids, out_dtype=dtype,
                mem_k_scale=None if memories.k_scale is None else memories.k_scale[slot],
                mem_v_scale=None if memories.v_scale is None else memories.v_scale[slot],
            )  # [B, C, R, Hkv, M, D]
            ks.append(apply_rope(k, cos, sin).flatten(0, 2))
            vs.append(v.flatten(0, 2))
        rows = torch.arange(B * C * R, device=ids.device, dtype=torch.int32).view(B, C, R)
        return Memories(ks, vs, torch.where(ids >= 0, rows, -1))

    def _check_inputs(self, tokens, memories, cache, kv_lens, plain) -> tuple[int, int]:
        c = self.config
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be an int tensor [B, T], got {_describe(tokens)}")
        B, T = tokens.shape
        checking_values = not torch.compiler.is_compiling()  # value checks sync; a compiled step skips them
        if checking_values and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise ValueError(f"tokens must be ids in [0, vocab_size={c.vocab_size}), "
                             f"got values in [{int(tokens.min())}, {int(tokens.max())}]")
        if cache is None:
            if kv_lens is not None:
                raise ValueError("kv_lens is given without a cache; pass cache= too (or neither)")
        else:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
            if B > cache.max_batch:
                raise ValueError(f"tokens has batch B={B} but the cache holds at most {cache.max_batch} sequences")
            if T > cache.max_seq:
                raise ValueError(f"tokens has T={T} new tokens but the cache holds at most {cache.max_seq} per sequence")
            if not isinstance(kv_lens, Tensor) or kv_lens.shape != (B,) or kv_lens.dtype != torch.int32:
                raise ValueError(f"kv_lens must be int32 [B={B}] with a cache, got {_describe(kv_lens)}")
            if checking_values and (int(kv_lens.min()) < T or int(kv_lens.max()) > cache.max_seq):
                raise ValueError(f"kv_lens must lie in [T={T}, cache max_seq={cache.max_seq}] (the sequence "
                                 f"with its {T} new tokens must fit the cache), got {kv_lens.tolist()}")
        if memories is None:
            return B, T
        if plain:
            raise ValueError("plain=True reads no memory; pass memories=None")
        if not isinstance(memories, Memories):
            raise ValueError(f"memories must be a Memories, got {type(memories).__name__}")
        L, shape = c.n_memory_layers, (c.n_kv_heads, c.memory_tokens, c.head_dim)
        for name in ("k", "v", "k_scale", "v_scale"):
            banks = getattr(memories, name)
            if banks is not None and len(banks) != L:
                raise ValueError(f"memories.{name} must hold one bank per memory layer ({L}), got {len(banks)}")
        for name in ("k", "v"):
            for i, bank in enumerate(getattr(memories, name)):
                if bank.dim() != 4 or tuple(bank.shape[1:]) != shape:
                    raise ValueError(f"memories.{name}[{i}] must be [N, Hkv={shape[0]}, M={shape[1]}, "
                                     f"D={shape[2]}], got {tuple(bank.shape)}")
        ids = memories.ids
        if ids.dim() != 3 or ids.shape[0] != B:
            raise ValueError(f"memories.ids must be int32 [B={B}, C, R], got {_describe(ids)}")
        if c.memory_positions == "ranked" and ids.shape[2] > c.memories_per_chunk:
            raise ValueError(f"memories.ids has R={ids.shape[2]} slots per chunk but ranked positions make room "
                             f"for memories_per_chunk={c.memories_per_chunk}")
        return B, T


def causal_attention(q: Tensor, k: Tensor, v: Tensor, kv_lens: Tensor | None) -> Tensor:
    """Causal attention without memory: the op with an empty bank (chunk_start = S, so no
    query reaches the memory grid). Its kernel handles ragged kv_lens and a partly filled
    cache without building a mask."""
    B, S, Hkv, D = k.shape
    empty = k.new_zeros(0, Hkv, 1, D)
    no_ids = torch.zeros(B, 1, 0, dtype=torch.int32, device=q.device)
    out, _ = ops.memory_attention(q, k, v, empty, empty, no_ids, kv_lens, chunk_start=S)
    return out


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return repr(x) if x is None else type(x).__name__
