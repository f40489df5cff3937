"""Corpora -> memory-mapped token shards (manifest checked, no pickle) and the window sampler."""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memory3.train.data import (
    TokenShards, WindowSampler, corpus_to_shards, read_documents, write_token_shards)

DOCS = [f"document {i} says the number {i * 7} is {'odd' if i % 2 else 'even'} ." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def expected_stream(tokenizer, docs, eos=2):
    return np.concatenate([tokenizer.encode(d).ids + [eos] for d in docs])


def test_read_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert list(read_documents(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "b.txt").write_text("first line\nsame doc\n\n\nsecond doc\n")
    assert list(read_documents(tmp_path / "b.txt")) == ["first line\nsame doc", "second doc"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_documents(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("shard_tokens", [10_000, 97])
def test_shards_hold_the_token_stream(tmp_path, tokenizer, shard_tokens):
    shards = write_token_shards(DOCS, tokenizer, tmp_path, eos_id=2, shard_tokens=shard_tokens,
                                batch_size=7, progress=False)
    stream = expected_stream(tokenizer, DOCS)
    assert len(shards) == len(stream)
    assert (len(shards.manifest["shards"]) > 1) == (shard_tokens < len(stream))
    assert np.array_equal(shards.window(0, len(stream)), stream)
    for start in (0, 96, 97, 150, len(stream) - 13):       # across shard borders
        assert np.array_equal(shards.window(start, 13), stream[start:start + 13])
    reopened = TokenShards(tmp_path)
    assert reopened.manifest["documents"] == len(DOCS) and reopened.manifest["dtype"] == "uint16"
    reopened.check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="outside"):
        shards.window(len(stream) - 5, 6)


def test_corpus_files_to_shards(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:30]))
    (tmp_path / "b.txt").write_text("\n\n".join(DOCS[30:]) + "\n")
    shards = corpus_to_shards([tmp_path / "a.jsonl", tmp_path / "b.txt"], tokenizer, tmp_path / "out",
                              eos_id=2, progress=False)
    assert np.array_equal(shards.window(0, len(shards)), expected_stream(tokenizer, DOCS))


def test_manifest_is_checked(tmp_path, tokenizer):
    write_token_shards(DOCS, tokenizer, tmp_path, eos_id=2, shard_tokens=200, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    def with_manifest(m):
        (tmp_path / "manifest.json").write_text(json.dumps(m))
        return lambda: TokenShards(tmp_path)

    cases = [
        ({**manifest, "dtype": "float64"}, "dtype"),
        ({**manifest, "format": "pickle"}, "manifest"),
        ({**manifest, "shards": [{"file": "../x.bin", "tokens": 1}]}, "plain .bin name"),
        ({**manifest, "shards": [{**manifest["shards"][0], "tokens": 201}]}, "bytes"),
    ]
    for m, message in cases:
        with pytest.raises(ValueError, match=message):
            with_manifest(m)()
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenShards(tmp_path)


def test_tokenizer_mismatch(tmp_path, tokenizer):
    shards = write_token_shards(DOCS, tokenizer, tmp_path, eos_id=2, progress=False)
    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_tokens(["zzz"])
    with pytest.raises(ValueError, match="another tokenizer"):
        shards.check_tokenizer(other)


def test_window_sampler_is_deterministic_and_splits_ranks(tmp_path, tokenizer):
    shards = write_token_shards(DOCS, tokenizer, tmp_path, eos_id=2, shard_tokens=150, progress=False)
    stream = shards.window(0, len(shards))
    one = WindowSampler(shards, seq_len=16, batch_size=6, seed=1)
    b = one.batch(step=5)
    assert b.shape == (6, 17) and b.dtype == torch.int64
    assert torch.equal(b, one.batch(step=5)) and not torch.equal(b, one.batch(step=6))
    assert not torch.equal(one.batch(step=5, micro=1), b)
    for row in b.numpy():                                    # every row is a window of the stream
        assert any(np.array_equal(row, stream[s:s + 17]) for s in range(len(stream) - 16))
    halves = [WindowSampler(shards, 16, 3, seed=1, rank=r, world_size=2).batch(step=5) for r in range(2)]
    assert torch.equal(torch.cat(halves), b)
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(shards, 16, 3, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        WindowSampler(shards, len(shards), 3)


def test_memory3_tokenizer_shards(tmp_path):
    """The model's own tokenizer (Memory3Tokenizer) works as well, its hash checked."""
    from memory3.model.tokenizer import train_bpe
    tok = train_bpe(DOCS, 400)
    shards = write_token_shards(DOCS, tok, tmp_path, eos_id=tok.eos_id, progress=False)
    assert shards.window(0, len(shards)).tolist() == [i for d in DOCS for i in tok.encode(d) + [tok.eos_id]]
    shards.check_tokenizer(tok)
    shards.check_tokenizer(tok.tokenizer)
