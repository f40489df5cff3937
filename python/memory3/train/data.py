"""Training text -> memory-mapped token shards, and the batch sampler that reads them.

On disk (a folder)::

    manifest.json     {"format": "memory3-tokens", "version": 1, "dtype": "uint16"|"uint32",
                       "vocab_size", "eos_id", "tokenizer_sha256", "documents",
                       "shards": [{"file": "shard_00000.bin", "tokens": n}, ...]}
    shard_00000.bin   raw little-endian token ids, documents joined, each followed by EOS

No pickle anywhere: shards are raw arrays read with ``numpy.memmap`` and checked against
the manifest (file size, dtype, names inside the folder) before use.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

FORMAT, VERSION = "memory3-tokens", 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of a corpus file: ``.jsonl`` -> the ``text`` field of every line; any other
    file is plain text whose documents are separated by blank lines."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'text'")
                yield row["text"]
        return
    paragraph: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                paragraph.append(line.rstrip("\n"))
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _raw(tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a `Memory3Tokenizer` (or the tokenizer itself)."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(_raw(tokenizer).to_str().encode()).hexdigest()


def write_token_shards(documents: Iterable[str], tokenizer, out_dir: str | Path, *,
                       eos_id: int, shard_tokens: int = 1 << 24, batch_size: int = 1024,
                       progress: bool = True) -> "TokenShards":
    """Tokenize ``documents`` with a `tokenizers.Tokenizer` or `Memory3Tokenizer` (each
    document followed by ``eos_id``) into shards of at most
    ``shard_tokens`` tokens under ``out_dir``; the manifest is written last, atomically."""
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be > 0, got {shard_tokens}")
    tokenizer = _raw(tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id must be a token id in [0, {vocab}), got {eos_id}")
    dtype_name = "uint16" if vocab <= 1 << 16 else "uint32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    buffer: list[np.ndarray] = []
    buffered = n_docs = 0

    def flush(final: bool) -> None:
        nonlocal buffer, buffered
        data = np.concatenate(buffer) if buffer else np.zeros(0, dtype=_DTYPES[dtype_name])
        while len(data) >= shard_tokens or (final and len(data)):
            piece, data = data[:shard_tokens], data[shard_tokens:]
            name = f"shard_{len(shards):05d}.bin"
            with open(out / name, "wb") as f:
                f.write(piece.astype(_DTYPES[dtype_name]).tobytes())
                f.flush()
                os.fsync(f.fileno())
            shards.append({"file": name, "tokens": int(len(piece))})
        buffer, buffered = ([data] if len(data) else []), len(data)

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
    for batch in batches():
        for enc in tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = np.asarray(enc.ids + [eos_id], dtype=_DTYPES[dtype_name])
            buffer.append(ids)
            buffered += len(ids)
        n_docs += len(batch)
        bar.update(len(batch))
        if buffered >= shard_tokens:
            flush(final=False)
    flush(final=True)
    bar.close()
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype_name, "vocab_size": vocab,
                "eos_id": eos_id, "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "documents": n_docs, "shards": shards}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return TokenShards(out)


class TokenShards:
    """Read-only view of a shard folder as one token stream (``len``, ``window``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        dtype = _DTYPES[self.manifest["dtype"]]
        self.vocab_size = self.manifest["vocab_size"]
        self.eos_id = self.manifest["eos_id"]
        self._arrays = [np.memmap(self.folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                        if s["tokens"] else np.zeros(0, dtype) for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def check_tokenizer(self, tokenizer) -> None:
        if tokenizer_sha256(tokenizer) != self.manifest["tokenizer_sha256"]:
            raise ValueError(f"{self.folder} was tokenized with another tokenizer "
                             f"(sha256 {self.manifest['tokenizer_sha256'][:12]}...)")

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1 of the stream (int64), across shard borders."""
        if start < 0 or length < 0 or start + length > len(self):
            raise ValueError(f"window [{start}, {start + length}) is outside the {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - self._starts[shard]
            take = min(length - filled, len(self._arrays[shard]) - offset)
            out[filled:filled + take] = self._arrays[shard][offset:offset + take]
            filled += take
            shard += 1
        return out


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read token shards manifest {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise bad(f"not a {FORMAT} v{VERSION} manifest")
    if m.get("dtype") not in _DTYPES:
        raise bad(f"dtype must be one of {sorted(_DTYPES)}, got {m.get('dtype')!r}")
    for key in ("vocab_size", "eos_id", "documents"):
        if not isinstance(m.get(key), int) or m[key] < 0:
            raise bad(f"{key} must be a non-negative int")
    if not isinstance(m.get("shards"), list):
        raise bad("shards must be a list")
    itemsize = _DTYPES[m["dtype"]].itemsize
    for s in m["shards"]:
        name = s.get("file") if isinstance(s, dict) else None
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".bin"):
            raise bad(f"shard file must be a plain .bin name inside the folder, got {name!r}")
        if not isinstance(s.get("tokens"), int) or s["tokens"] < 0:
            raise bad(f"shard {name} must give a non-negative int 'tokens'")
        size = (folder / name).stat().st_size if (folder / name).exists() else None
        if size != s["tokens"] * itemsize:
            raise bad(f"shard {name} holds {size} bytes, the manifest says {s['tokens']} x {itemsize}")
    return m


@dataclass
class WindowSampler:
    """Random training windows of ``seq_len + 1`` tokens (inputs and shifted targets).

    The batch of a step is a pure function of (seed, step, rank): resuming at a step needs no
    sampler state, and the ``world_size`` ranks of a DDP run draw disjoint slices of the same
    global batch, so 2 ranks x batch B see exactly what 1 rank x batch 2B sees."""
    shards: TokenShards
    seq_len: int
    batch_size: int          # per rank
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.seq_len <= 0 or self.batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be > 0, got {self.seq_len}, {self.batch_size}")
        if len(self.shards) < self.seq_len + 1:
            raise ValueError(f"the shards hold {len(self.shards)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    def batch(self, step: int, micro: int = 0) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1] for micro-batch ``micro`` of ``step``."""
        rng = np.random.default_rng([self.seed, step, micro])
        global_batch = self.batch_size * self.world_size
        starts = rng.integers(0, len(self.shards) - self.seq_len, size=global_batch)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.from_numpy(np.stack([self.shards.window(int(s), self.seq_len + 1) for s in mine]))


def corpus_to_shards(paths: Sequence[str | Path], tokenizer, out_dir: str | Path, *,
                     eos_id: int, shard_tokens: int = 1 << 24, progress: bool = True) -> TokenShards:
    """Every document of the given jsonl / plain-text files, tokenized into ``out_dir``."""
    def documents() -> Iterator[str]:
        for p in paths:
            yield from read_documents(p)
    return write_token_shards(documents(), tokenizer, out_dir, eos_id=eos_id,
                              shard_tokens=shard_tokens, progress=progress)
