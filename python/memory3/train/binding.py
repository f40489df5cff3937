"""Binding supervision: an auxiliary loss that tells the memory layers which memory is right.

With the paper's parallel memory positions a question must pick the memory whose *name*
matches its own (TRAINING.md, "the open problem"); trained on the answer loss alone, a small
model never starts: the answer query's attention over 5 memories puts 0.16-0.24 of its mass
on the right one in every memory-layer head (0.20 = no preference). This loss gives that
attention a direct gradient. At every answer position (a token whose next token is a
target) and for each supervised memory layer and query head:

    share = sum over the right memory's M keys of softmax(q · k * scale) over the R x M memory keys
    aux   = -log share, averaged over layers and heads, summed over answer positions

q is the layer's post-RoPE query at that position (captured from ``wq`` by a forward hook
and rotated here, so the attention kernel is untouched), k the memories' post-RoPE keys as
the model reads them. The softmax is over memory keys only: it asks *which* memory, not how
much memory versus context. Inference is unchanged.

Layer 0 is left out by default: its query at an answer position is the embedding of the
prompt's last token (``:``) and cannot know whose question it is; binding needs an earlier
layer to move the name there first.

Measured (bench/RESULTS.md, "Binding experiments, third session"): on the demo's small model
in 700 CPU steps it does not make binding start. It drives every layer-1 head to exactly 1/R
on the right memory (the best answer that ignores names), never above, at 2 and at 5
memories, and costs one-memory accuracy (0.69 against 0.93 at weight 1). Kept as an option
for longer runs (a GPU), where it is the cheapest direct signal for the binding circuit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from memory3.model.config import Memory3Config
from memory3.model.transformer import Memory3Model, apply_rope, rope_cos_sin


def default_layers(config: Memory3Config) -> tuple[int, ...]:
    """Every memory layer but the first (see the module docstring)."""
    return tuple(config.memory_layers[1:])


def check_layers(config: Memory3Config, layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    if not layers or any(i not in config.memory_layers for i in layers):
        raise ValueError(f"bind_layers must be a non-empty subset of the memory layers {config.memory_layers}, "
                         f"got {layers}")
    return layers


@contextlib.contextmanager
def capture_queries(model: Memory3Model, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """{layer: wq output [B, T, Hq * D]} of the forward calls made inside the block (the last
    call wins), pre-RoPE and differentiable. Only the model's own forward should run inside:
    the encoder calls ``wq`` too."""
    captured: dict[int, Tensor] = {}
    handles = [model.layers[i].attention.wq.register_forward_hook(
        lambda _m, _inp, out, i=i: captured.__setitem__(i, out)) for i in layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def right_log_share(q: Tensor, mem_k: Tensor, right: Tensor, valid: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """log(attention share on the right memory) per query and head.

    Args:
        q: [K, Hq, D] post-RoPE queries.
        mem_k: [K, R, Hkv, M, D] post-RoPE keys of the R memories each query reads.
        right: int [K], the slot (0..R-1) of the right memory for each query.
        valid: bool [K, R], optional: False for empty slots (their keys are left out).
        scale: the attention scale; default D ** -0.5, as the model's attention.

    Returns:
        [K, Hq] float32, <= 0 (0: all the memory attention on the right memory).
    """
    K, Hq, D = q.shape
    if mem_k.dim() != 5 or mem_k.shape[0] != K or mem_k.shape[-1] != D or Hq % mem_k.shape[2]:
        raise ValueError(f"mem_k must be [K={K}, R, Hkv, M, D={D}] with Hkv dividing Hq={Hq}, "
                         f"got {tuple(mem_k.shape)}")
    R, Hkv, M = mem_k.shape[1:4]
    if right.shape != (K,) or (K and (int(right.min()) < 0 or int(right.max()) >= R)):
        raise ValueError(f"right must be int [K={K}] slots in [0, R={R}), got {tuple(right.shape)}")
    scale = D ** -0.5 if scale is None else scale
    qg = q.float().view(K, Hkv, Hq // Hkv, D)  # query head h reads KV head h // (Hq // Hkv)
    logits = torch.einsum("khgd,krhmd->khgrm", qg, mem_k.float()) * scale  # [K, Hkv, G, R, M]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :, None], float("-inf"))
    logp = logits.flatten(3).log_softmax(-1).view_as(logits)
    pick = right.view(K, 1, 1, 1, 1).expand(K, Hkv, Hq // Hkv, 1, M)
    return logp.gather(3, pick).squeeze(3).logsumexp(-1).reshape(K, Hq)


def answer_log_shares(model: Memory3Model, queries: dict[int, Tensor], where: Tensor, memory: Tensor,
                      mem_ids: Tensor, right: Tensor, layers: Sequence[int]) -> Tensor:
    """log share [K, n_layers, Hq] at the True positions of ``where`` [B, T] (row-major), for
    the model's forward over whole sequences (no cache) that filled ``queries``.

    memory: [N, n_memory_layers, 2, Hkv, M, D] (the encoder's output), mem_ids int [B, C, R]
    rows of it, right int [B]: the slot of the right memory in every chunk of sequence b."""
    c = model.config
    b, t = where.nonzero(as_tuple=True)
    if bool((t < c.prefix_len).any()):
        raise ValueError("where marks a prefix position: the prefix reads no memory")
    chunk = ((t - c.prefix_len) // c.chunk_size).clamp(max=mem_ids.shape[1] - 1)
    ids = mem_ids[b, chunk].long()  # [K, R]
    valid = ids >= 0
    cos, sin = rope_cos_sin(t + c.context_offset, c.head_dim, c.rope_base, torch.float32)  # [K, 1, D]
    R = ids.shape[1]
    if c.memory_positions == "ranked":  # slot r sits a further r * ref_len on (Memory3Model._rank_memories)
        kcos, ksin = rope_cos_sin(torch.arange(R, device=t.device) * c.ref_len, c.head_dim, c.rope_base,
                                  torch.float32)
        kcos, ksin = kcos[:, :, None], ksin[:, :, None]  # [R, 1, 1, D] over [K, R, Hkv, M, D]
    out = []
    for layer in layers:
        q = queries[layer][b, t].float().view(len(t), c.n_heads, c.head_dim)
        q = apply_rope(q, cos, sin)
        k = memory[ids.clamp(min=0), model.memory_slot[layer], 0].float()  # [K, R, Hkv, M, D]
        if c.memory_positions == "ranked":
            k = apply_rope(k, kcos, ksin)
        out.append(right_log_share(q, k, right[b].long(), valid))
    return torch.stack(out, dim=1)
