"""Conversion between `Memory3Model` and `transformers.LlamaForCausalLM` (same weights).

Both are pre-RMSNorm / rotate-half RoPE / GQA / SwiGLU decoders with untied embeddings, so
the conversion renames tensors and nothing else. A Llama knows no memory: our model run with
`plain=True` (positions 0..S-1, no memory) gives its logits. A converted Llama has no memory
layers unless `memory_layers` is given (then it reads memory with its own weights, untrained).
"""
from __future__ import annotations

import torch

from memory3.model.config import Memory3Config
from memory3.model.transformer import Memory3Model

_LAYER_NAMES = {  # ours -> Llama, inside layer i
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _llama_name(ours: str) -> str:
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    _, i, rest = ours.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


def llama_config(config: Memory3Config, max_position_embeddings: int = 4096):
    """The `transformers.LlamaConfig` of the same shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base}, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=config.bos_id, eos_token_id=config.eos_id, pad_token_id=config.pad_id,
    )


def to_hf(model: Memory3Model):
    """A `LlamaForCausalLM` holding copies of model's weights (same dtype)."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llama_config(model.config)).to(model.dtype)
    state = {_llama_name(name): t.detach().clone() for name, t in model.state_dict().items()}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"Llama conversion left tensors unmatched: missing {missing}, unexpected {unexpected}")
    return llama.eval()


def from_hf(llama, **overrides) -> Memory3Model:
    """A `Memory3Model` holding copies of a `LlamaForCausalLM`'s weights. overrides set
    Memory3Config fields (default memory_layers=(): a plain model)."""
    hf = llama.config
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"llama.config.rope_parameters: only the default RoPE converts, got {rope}")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("llama.config: attention_bias/mlp_bias models do not convert (ours has no biases)")
    if hf.hidden_act != "silu":
        raise ValueError(f"llama.config.hidden_act must be 'silu', got {hf.hidden_act!r}")
    fields = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        mlp_dim=hf.intermediate_size, rope_base=float(rope.get("rope_theta", 10000.0)),
        norm_eps=hf.rms_norm_eps, memory_layers=(),
    )
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(hf, name.replace("_id", "_token_id"), None)
        if isinstance(value, int):
            fields[name] = value
    config = Memory3Config(**{**fields, **overrides})
    with torch.device("meta"):
        model = Memory3Model(config)
    model = model.to_empty(device=llama.device).to(llama.dtype)
    source = llama.state_dict()
    if getattr(hf, "tie_word_embeddings", False):
        source = {**source, "lm_head.weight": source["model.embed_tokens.weight"]}
    model.load_state_dict({name: source[_llama_name(name)].detach().clone() for name in model.state_dict()})
    return model.eval()
