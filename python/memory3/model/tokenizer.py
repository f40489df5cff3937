"""The model's tokenizer: Hugging Face `tokenizers`, byte-level, with the layout's special tokens.

Every tokenizer made here has the special tokens at fixed ids (config.py): `<pad>` 0, `<s>` 1,
`</s>` 2 and `<s>Reference:` 3, the reference prefix as ONE token (the paper's "modified BOS"),
so P = 1. `byte_level()` is the untrained tokenizer (260 ids: the specials and 256 bytes):
any text, any preset. `train_bpe(texts, vocab_size)` learns byte-level BPE merges on top.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memory3.model.config import BOS_ID, EOS_ID, PAD_ID, REF_ID

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<s>Reference:")  # ids 0, 1, 2, 3
REFERENCE_PREFIX = SPECIAL_TOKENS[REF_ID]
BYTE_LEVEL_VOCAB = len(SPECIAL_TOKENS) + 256


class Memory3Tokenizer:
    """A `tokenizers.Tokenizer` with the sequence layout's helpers."""

    pad_id, bos_id, eos_id, ref_id = PAD_ID, BOS_ID, EOS_ID, REF_ID

    def __init__(self, tokenizer: Tokenizer) -> None:
        for i, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != i:
                raise ValueError(f"tokenizer must map the special token {token!r} to id {i}, "
                                 f"got {tokenizer.token_to_id(token)}")
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ construction

    @classmethod
    def byte_level(cls) -> "Memory3Tokenizer":
        """The untrained tokenizer: one token per byte (ids 4..259) after the special tokens."""
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch] = len(vocab)
        return cls(_assemble(models.BPE(vocab=vocab, merges=[])))

    @classmethod
    def from_file(cls, path: str | Path) -> "Memory3Tokenizer":
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a bad file
            raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        return cls(tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Memory3Tokenizer":
        """`tokenizer.json` of a saved model directory."""
        return cls.from_file(Path(directory) / "tokenizer.json")

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    # ------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def prefix_ids(self) -> list[int]:
        """Ids of the reference prefix `<s>Reference:`, which opens references and contexts."""
        return [self.ref_id]

    def encode(self, text: str) -> list[int]:
        """Ids of text, no special tokens added (special token strings in text are honoured)."""
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def context_ids(self, text: str) -> list[int]:
        """A context in the model's layout: `<s>Reference:` `<s>` text (PAPER.md decisions)."""
        return self.prefix_ids + [self.bos_id] + self.encode(text)

    def reference_ids(self, text: str, max_len: int = 128) -> list[int]:
        """A reference's tokens, cut to max_len (the encoder prepends the prefix)."""
        return self.encode(text)[:max_len]


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> Memory3Tokenizer:
    """Train a byte-level BPE of vocab_size ids (specials and the 256 bytes included) on texts."""
    if not isinstance(vocab_size, int) or vocab_size < BYTE_LEVEL_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {BYTE_LEVEL_VOCAB} (special tokens + 256 bytes), "
                         f"got {vocab_size!r}")
    tokenizer = _assemble(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return Memory3Tokenizer(tokenizer)


def _assemble(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
