"""The memory encoder against an oracle written here: the model's own cached keys/values of
`<s>Reference:` + reference, and the top-8 by an explicit float64 sum of exp(q·k/sqrt(d))."""
from __future__ import annotations

import pytest
import torch

from memory3.memory.encoder import encode_references, encode_texts
from memory3.model import Memory3Config, Memory3Model, Memory3Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Memory3Model(Memory3Config.preset("tiny", n_layers=5, memory_layers=(0, 1, 2)))
    with torch.no_grad():  # spread the scores so the top-8 is far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def oracle(model, ref: torch.Tensor):
    """Memory [n_mem, 2, Hkv, M, D] and kept indices of one reference (1-D tokens)."""
    c = model.config
    P, M, Hkv, H, D = c.prefix_len, c.memory_tokens, c.n_kv_heads, c.n_heads, c.head_dim
    seq = torch.cat([torch.tensor(c.prefix_ids), ref])[None]
    hidden = {}
    def keep(i):
        def hook(module, inputs, output):
            hidden[i] = output[0]
        return hook

    hooks = [model.layers[i].attention_norm.register_forward_hook(keep(i)) for i in c.memory_layers]
    cache = model.new_cache(1, seq.shape[1])
    with torch.no_grad():
        model(seq, cache=cache, kv_lens=torch.tensor([seq.shape[1]], dtype=torch.int32), plain=True)
    for h in hooks:
        h.remove()
    memory, kept = [], []
    for i in c.memory_layers:
        a = model.layers[i].attention
        h = hidden[i][P:].double()
        q = (h @ a.wq.weight.double().T).view(-1, H, D)
        k = (h @ a.wk.weight.double().T).view(-1, Hkv, D)
        rows_k, rows_v, layer_kept = [], [], []
        for g in range(Hkv):
            heads = range(g * H // Hkv, (g + 1) * H // Hkv)
            w = sum(torch.exp(q[:, hq] @ k[:, g].T / D**0.5).sum(0) for hq in heads)  # [L] received
            top = sorted(torch.topk(w, min(M, len(w))).indices.tolist())
            top = [-1] * (M - len(top)) + top
            layer_kept.append(top)
            rows = [t + P if t >= 0 else P - 1 for t in top]
            rows_k.append(cache.k[i, 0, rows, g])
            rows_v.append(cache.v[i, 0, rows, g])
        memory.append(torch.stack([torch.stack(rows_k), torch.stack(rows_v)]))
        kept.append(layer_kept)
    return torch.stack(memory), torch.tensor(kept)


def refs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 260, (n,), generator=g) for n in lengths]


def padded(rs):
    tokens = torch.zeros(len(rs), max(len(r) for r in rs), dtype=torch.long)
    for i, r in enumerate(rs):
        tokens[i, : len(r)] = r
    return tokens, torch.tensor([len(r) for r in rs])


def test_matches_oracle(model):
    rs = refs([128, 37, 5])  # full length, ragged, shorter than M
    with torch.no_grad():
        memory, kept = encode_references(model, *padded(rs), return_indices=True)
    assert memory.shape == (3, 3, 2, 2, 8, 16)
    for b, r in enumerate(rs):
        want, want_kept = oracle(model, r)
        assert kept[b].tolist() == want_kept.tolist()
        torch.testing.assert_close(memory[b], want, rtol=1e-5, atol=1e-5)
    assert (kept[2] == -1).sum(-1).eq(3).all()  # 5 tokens fill 5 of 8 slots
    assert len({tuple(kept[0, layer, 0].tolist()) for layer in range(3)}) > 1  # layers choose differently


def test_padding_changes_nothing_and_is_deterministic(model):
    rs = refs([19, 128, 64, 3], seed=1)
    with torch.no_grad():
        batch, kept = encode_references(model, *padded(rs), return_indices=True)
        again = encode_references(model, *padded(rs))
        for b, r in enumerate(rs):
            alone, alone_kept = encode_references(model, r[None], return_indices=True)
            assert torch.equal(alone_kept[0], kept[b])
            torch.testing.assert_close(alone[0], batch[b], rtol=1e-5, atol=1e-5)  # fp32 rounding only
    assert torch.equal(batch, again)


def test_differentiable_through_memory_layers_only(model):
    tokens, lengths = padded(refs([30, 12], seed=2))
    memory = encode_references(model, tokens, lengths)
    assert memory.requires_grad
    model.zero_grad()
    memory.square().sum().backward()
    last = model.config.memory_layers[-1]
    assert model.tok_embeddings.weight.grad.abs().sum() > 0
    assert model.layers[0].feed_forward.w2.weight.grad.abs().sum() > 0
    assert model.layers[last].attention.wk.weight.grad.abs().sum() > 0
    assert model.layers[last].attention.wo.weight.grad is None  # L_mem attentions, L_mem - 1 MLPs
    assert model.layers[last].feed_forward.w1.weight.grad is None
    assert model.layers[last + 1].attention.wq.weight.grad is None
    model.zero_grad()


def test_encode_texts(model, capsys):
    tok = Memory3Tokenizer.byte_level()
    # repeated tokens tie exactly in layer 0 (pre-RoPE keys are position-free): padding
    # next to a longer reference must not change which of them is kept
    texts = ["Ada was born in London.", "x" * 400, "Paris is on the Seine, " * 3]
    out = encode_texts(model, tok, texts, batch_size=2)
    assert "encoding references" in capsys.readouterr().err
    for i, text in enumerate(texts):
        ids = torch.tensor(tok.encode(text)[:128])
        with torch.no_grad():
            torch.testing.assert_close(out[i], encode_references(model, ids[None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reference 1 encodes to no tokens"):
        encode_texts(model, tok, ["a", ""], progress=False)


def test_bad_input(model):
    with pytest.raises(ValueError, match="references are cut to ref_len=128"):
        encode_references(model, torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, L=4\]"):
        encode_references(model, torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=260\)"):
        encode_references(model, torch.full((1, 4), 300))
    plain = Memory3Model(Memory3Config.preset("tiny", memory_layers=()))
    with pytest.raises(ValueError, match="no memory layers"):
        encode_references(plain, torch.zeros(1, 4, dtype=torch.long))
