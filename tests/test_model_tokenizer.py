"""Tokenizers: the byte-level one every preset gets, trained byte-level BPE, the layout ids."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models

from memory3.model import Memory3Config, Memory3Tokenizer, train_bpe
from memory3.model.tokenizer import SPECIAL_TOKENS

TEXTS = ["Ada Lovelace was born in London. Ada studied mathematics.",
         "Reference: the city of Paris lies on the Seine.", "日本語のテキスト, émigré café"] * 40


def test_byte_level_round_trips_any_text_and_fits_every_preset():
    tok = Memory3Tokenizer.byte_level()
    assert tok.vocab_size == 260
    for text in TEXTS[:3] + ["\x00\x7f tabs\tand\nnewlines  ", "🙂"]:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")) and min(ids) >= 4
        assert tok.decode(ids) == text
    for name in ("tiny", "small", "2.4b"):
        assert tok.vocab_size <= Memory3Config.preset(name).vocab_size


def test_special_tokens_and_layout():
    tok = Memory3Tokenizer.byte_level()
    assert [tok.encode(s) for s in SPECIAL_TOKENS] == [[0], [1], [2], [3]]
    config = Memory3Config.preset("tiny")
    assert tok.encode(config.reference_prefix) == list(config.prefix_ids) == tok.prefix_ids
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (config.pad_id, config.bos_id, config.eos_id)
    assert tok.context_ids("hi") == [3, 1] + tok.encode("hi")
    assert tok.encode("<s>Reference:x")[0] == 3 and tok.encode("<s>x")[0] == 1  # longest special wins
    assert len(tok.reference_ids("x" * 300)) == 128
    assert tok.decode(tok.context_ids("hi")) == "hi"


def test_train_bpe_merges_and_is_deterministic(tmp_path):
    tok = train_bpe(TEXTS, 320)
    assert 260 < tok.vocab_size <= 320
    assert [tok.encode(s) for s in SPECIAL_TOKENS] == [[0], [1], [2], [3]]
    text = "Ada Lovelace was born in London."
    assert len(tok.encode(text)) < len(text) / 2
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    assert tok.decode(tok.encode("unseen ✓ bytes")) == "unseen ✓ bytes"
    assert train_bpe(TEXTS, 320).encode(TEXTS[0]) == tok.encode(TEXTS[0])
    tok.save(tmp_path / "tokenizer.json")
    assert Memory3Tokenizer.from_pretrained(tmp_path).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_bad_tokenizers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        train_bpe(TEXTS, 100)
    with pytest.raises(ValueError, match="special token '<pad>' to id 0"):
        Memory3Tokenizer(Tokenizer(models.BPE()))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Memory3Tokenizer.from_pretrained(tmp_path)
