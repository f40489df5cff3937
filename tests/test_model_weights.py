"""Model directories: round trip, refusal of a checkpoint that does not match its config
(naming the tensor), no pickle, the fingerprint, presets through load_model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from memory3.model import Memory3Config, Memory3Model, load_model, train_bpe


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Memory3Model(Memory3Config.preset("tiny", vocab_size=300, memory_positions="ranked")).eval()


def test_round_trip(model, tmp_path):
    tokenizer = train_bpe(["alpha beta gamma delta " * 5] * 20, 300)
    model.save_pretrained(tmp_path, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = Memory3Model.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, 260, (2, 30))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    again, tok, trained = load_model(tmp_path)
    assert trained and tok.encode("alpha beta") == tokenizer.encode("alpha beta")
    assert len(tok.encode("alpha beta")) < len("alpha beta")  # the trained merges came back
    bf16 = Memory3Model.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_mismatched_checkpoint_names_the_tensor(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    state["layers.1.attention.wk.weight"] = state["layers.1.attention.wk.weight"][:16]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"'layers.1.attention.wk.weight' has shape \(16, 64\) but config.json makes it \(32, 64\)"):
        Memory3Model.from_pretrained(tmp_path)
    del state["layers.1.attention.wk.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="lacks tensor 'layers.1.attention.wk.weight'"):
        Memory3Model.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    save_file(load_file(weights) | {"layers.9.extra": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match="'layers.9.extra' that config.json does not make"):
        Memory3Model.from_pretrained(tmp_path)
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="cannot read"):
        Memory3Model.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | {"n_kv_heads": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Memory3Config.n_heads must be a multiple of n_kv_heads=3"):
        Memory3Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model directory .* does not exist"):
        Memory3Model.from_pretrained(tmp_path / "nope")


def test_tokenizer_that_does_not_fit_is_refused(model, tmp_path):
    big = train_bpe(["some text here and there " * 30] * 50, 270)
    small_model = Memory3Model(Memory3Config.preset("tiny", vocab_size=262))
    with pytest.raises(ValueError, match="270 tokens but the model's vocab_size is 262"):
        small_model.save_pretrained(tmp_path, big)
    other_prefix = Memory3Model(Memory3Config.preset("tiny", prefix_ids=(1, 2)))
    with pytest.raises(ValueError, match=r"encodes the reference prefix '<s>Reference:' as \[3\], but the config's prefix_ids are \[1, 2\]"):
        other_prefix.save_pretrained(tmp_path)


def test_fingerprint(model):
    fp = model.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp == model.fingerprint()
    twin = Memory3Model(model.config)
    twin.load_state_dict(model.state_dict())
    assert twin.fingerprint() == fp
    assert twin.to(torch.bfloat16).fingerprint() == fp  # a bf16 cast shares banks
    with torch.no_grad():  # a layer after the memory layers does not change memories
        model.layers[3].attention.wq.weight.add_(1.0)
        model.output.weight.add_(1.0)
    assert model.fingerprint() == fp
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] += 0.01
    assert model.fingerprint() != fp
    def with_config(**fields):
        other = Memory3Model(Memory3Config.preset("tiny", vocab_size=300, **fields))
        other.load_state_dict(twin.state_dict())
        return other.fingerprint()

    # how memories are read leaves them valid; how they are made does not
    assert with_config(memory_positions="ranked", chunk_size=32, memories_per_chunk=3) == fp
    assert with_config(memory_positions="ranked", memory_tokens=4) != fp
    assert with_config(memory_positions="ranked", rope_base=500.0) != fp


def test_load_model_preset_and_errors():
    model, tokenizer, trained = load_model("tiny")
    assert not trained and tokenizer.vocab_size == 260 and model.config == Memory3Config.preset("tiny")
    assert load_model("tiny")[0].fingerprint() == model.fingerprint()  # deterministic untrained weights
    with pytest.raises(ValueError, match="neither a model directory nor a preset"):
        load_model("no-such-model")


def test_no_pickle_in_the_directory(model, tmp_path):
    model.save_pretrained(tmp_path)
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # pickle protocol marker
