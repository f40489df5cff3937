"""Hugging Face parity: the same weights give equal fp32 logits (no memory) and equal greedy
generations as `transformers.LlamaForCausalLM`, converted in both directions."""
from __future__ import annotations

import pytest
import torch

from memory3.model import Memory3Config, Memory3Model
from memory3.model.hf import from_hf, llama_config, to_hf

transformers = pytest.importorskip("transformers")


def scaled(model, std=0.3, seed=0):
    """Weights large enough that logits spread and greedy choices are far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std if p.dim() > 1 else 1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy_ours(model, prompt, n):
    """Prefill then one token per step through the KV cache (plain positions, like Llama)."""
    B, T = prompt.shape
    cache = model.new_cache(B, T + n)
    logits = model(prompt, cache=cache, kv_lens=torch.full((B,), T, dtype=torch.int32), plain=True)
    out = prompt
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        if i + 1 < n:
            lens = torch.full((B,), T + i + 1, dtype=torch.int32)
            logits = model(nxt, cache=cache, kv_lens=lens, plain=True)
    return out


def greedy_hf(llama, prompt, n):
    return llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)


def check_parity(ours, llama):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ours.config.vocab_size, (3, 45), generator=g)
    with torch.no_grad():
        a, b = ours(tokens, plain=True), llama(tokens).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
        assert a.std() > 1  # logits that mean something
        prompt = tokens[:, :7]
        torch.testing.assert_close(greedy_ours(ours, prompt, 24), greedy_hf(llama, prompt, 24), rtol=0, atol=0)


def test_ours_to_llama():
    ours = scaled(Memory3Model(Memory3Config.preset("tiny")))
    check_parity(ours, to_hf(ours))


def test_llama_to_ours():
    torch.manual_seed(0)
    config = llama_config(Memory3Config.preset("tiny", dim=96, n_layers=3, n_heads=6, n_kv_heads=3, rope_base=500.0))
    llama = scaled(transformers.LlamaForCausalLM(config), seed=2)
    ours = from_hf(llama)
    assert ours.config.memory_layers == () and ours.config.rope_base == 500.0 and ours.config.n_kv_heads == 3
    check_parity(ours, llama)
    # memory layers on a converted Llama: the same weights, now a Memory³ model
    assert from_hf(llama, memory_layers=(0,)).config.memory_layers == (0,)


def test_unconvertible_llama_is_refused():
    config = llama_config(Memory3Config.preset("tiny"))
    config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias"):
        from_hf(transformers.LlamaForCausalLM(config))
