"""References -> explicit memories (PAPER.md §2 and "Project decisions").

Each reference (cut to ref_len = 128 tokens) runs through the model's memory layers only,
as `<s>Reference:` + reference at positions 0..P+127. In every memory layer and KV head the
M = 8 reference tokens that receive the most attention are kept: the score of key j is
sum over the reference's query tokens i and the group's query heads of exp(q_i·k_j/sqrt(d)),
pre-RoPE, no mask, prefix and padding excluded (ranked here by its logarithm, a logsumexp,
so it cannot overflow; exact ties go to the earlier token). Their post-RoPE keys and their values form the memory,
[n_memory_layers, 2, Hkv, M, D] per reference; the M tokens are stored in reference order.

A reference shorter than M tokens fills its spare slots with the prefix's last token (a key
every context already holds in its prefix), so every memory has M rows.

`encode_references` is differentiable (the trainer encodes in its own forward pass;
the top-k choice itself carries no gradient); `encode_texts` encodes a list of texts in
padded batches under inference_mode with a progress bar.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from memory3.model.tokenizer import Memory3Tokenizer
from memory3.model.transformer import Memory3Model, apply_rope, causal_attention, rope_cos_sin


def encode_references(model: Memory3Model, tokens: Tensor, lengths: Tensor | None = None, *,
                      return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Memories of a batch of references.

    Args:
        model: a Memory3Model with memory layers.
        tokens: int [N, L], L <= ref_len: reference tokens WITHOUT the prefix, right-padded.
        lengths: int [N], the true length of each (1..L); default L for all.
        return_indices: also return the kept tokens' reference indices, int64
            [N, n_memory_layers, Hkv, M] (-1 = a spare slot filled with the prefix token).

    Returns:
        memory [N, n_memory_layers, 2, Hkv, M, D] in the model's dtype: post-RoPE keys
        ([:, :, 0]) and values ([:, :, 1]). Differentiable in the model's weights.
    """
    c = model.config
    if not c.memory_layers:
        raise ValueError("the model has no memory layers (config.memory_layers is empty): nothing to encode")
    tokens, lengths = _check_references(c, tokens, lengths)
    N, L = tokens.shape
    P, M, Hkv, D = c.prefix_len, c.memory_tokens, c.n_kv_heads, c.head_dim
    prefix = torch.tensor(c.prefix_ids, dtype=tokens.dtype, device=tokens.device).expand(N, P)
    seq = torch.cat([prefix, tokens], dim=1)  # [N, P + L] at positions 0..P+L-1
    S = P + L
    cos, sin = rope_cos_sin(torch.arange(S, device=tokens.device), D, c.rope_base, model.dtype)
    valid = torch.arange(L, device=tokens.device)[None, :] < lengths[:, None]  # [N, L] reference tokens

    x = model.tok_embeddings(seq)
    memory, kept = [], []
    for i in c.memory_layers:
        layer = model.layers[i]
        q, k, v = layer.attention.project(layer.attention_norm(x))  # pre-RoPE, [N, S, H, D]
        index = _top_tokens(q[:, P:], k[:, P:], valid, M)  # [N, Hkv, M] reference indices, -1 spare
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = torch.where(index >= 0, index + P, P - 1)[..., None].expand(N, Hkv, M, D)
        memory.append(torch.stack([k.transpose(1, 2).gather(2, rows), v.transpose(1, 2).gather(2, rows)], dim=1))
        kept.append(index)
        if i == c.memory_layers[-1]:
            break  # the last memory layer's attention output and MLP are not needed
        out = causal_attention(q, k, v, None)  # right padding: causal, so it is never seen
        x = x + layer.attention.wo(out.reshape(N, S, -1))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    memory = torch.stack(memory, dim=1)  # [N, n_memory_layers, 2, Hkv, M, D]
    return (memory, torch.stack(kept, dim=1)) if return_indices else memory


def _top_tokens(q: Tensor, k: Tensor, valid: Tensor, M: int) -> Tensor:
    """Reference indices [N, Hkv, M] (ascending, -1 for spare slots) of the M keys with the largest
    log sum_{i valid, h in group} exp(q_i·k_j / sqrt(d)); q [N, L, Hq, D], k [N, L, Hkv, D]."""
    N, L, Hq, D = q.shape
    Hkv = k.shape[2]
    with torch.no_grad():
        qg = q.detach().float().view(N, L, Hkv, Hq // Hkv, D)
        logits = torch.einsum("nighd,njgd->nghij", qg, k.detach().float()) * D**-0.5  # [N, Hkv, G, Lq, Lk]
        logits = logits.masked_fill(~valid[:, None, None, :, None], float("-inf"))
        score = logits.flatten(2, 3).logsumexp(dim=2)  # [N, Hkv, Lk]
        score = score.masked_fill(~valid[:, None, :], float("-inf"))
        # Stable sort: exact ties (a repeated token's layer-0 key is position-free) go to the
        # earlier token, whatever the batch shape.
        top, index = score.sort(dim=-1, descending=True, stable=True)
        top, index = top[..., :M], index[..., :M]
        index = torch.where(torch.isfinite(top), index, -1)
        if L < M:
            index = torch.cat([index, index.new_full((N, Hkv, M - L), -1)], dim=-1)
        return index.sort(dim=-1).values


def _check_references(c, tokens, lengths) -> tuple[Tensor, Tensor]:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be an int tensor [N, L] of reference tokens, got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    N, L = tokens.shape
    if L > c.ref_len:
        raise ValueError(f"tokens has L={L} per reference but references are cut to ref_len={c.ref_len}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
        raise ValueError(f"tokens must be ids in [0, vocab_size={c.vocab_size})")
    if lengths is None:
        lengths = torch.full((N,), L, dtype=torch.long, device=tokens.device)
    if not isinstance(lengths, Tensor) or lengths.shape != (N,) or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be an int tensor [N={N}], got {getattr(lengths, 'shape', lengths)}")
    if N and (int(lengths.min()) < 1 or int(lengths.max()) > L):
        raise ValueError(f"lengths must lie in [1, L={L}] (an empty reference has no memory), got {lengths.tolist()}")
    return tokens, lengths.to(tokens.device)


@torch.inference_mode()
def encode_texts(model: Memory3Model, tokenizer: Memory3Tokenizer, texts: list[str], *, batch_size: int = 32,
                 progress: bool = True) -> Tensor:
    """Memories [len(texts), n_memory_layers, 2, Hkv, M, D] of texts, each cut to ref_len tokens.
    Batches group references of similar length (padding changes nothing, it only costs time)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c = model.config
    ids = [tokenizer.reference_ids(t, c.ref_len) for t in texts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"reference {i} encodes to no tokens (empty text)")
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    out = torch.empty((len(ids), *c.memory_shape), dtype=model.dtype, device=model.device)
    with tqdm(total=len(ids), desc="encoding references", unit="ref", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            L = len(ids[batch[0]])
            tokens = torch.full((len(batch), L), c.pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(ids[i])] = torch.tensor(ids[i])
            lengths = torch.tensor([len(ids[i]) for i in batch])
            out[torch.tensor(batch)] = encode_references(model, tokens.to(model.device), lengths.to(model.device))
            bar.update(len(batch))
    return out
