"""Whole-bank rewrites: compact (drop tombstones), reencode (new model), merge (per-rank banks).

Each writes its rows to new shard files, then commits once exactly as an append does (one
SQLite transaction holding the row renumbering and the new manifest, then manifest.json),
and only then removes the old files: a crash at any point leaves the old bank or the new
one, never a mix. Row ids change (live rows are renumbered in order): row ids held from
before (a retrieval index, a cache) must be rebuilt, which retrieval.index does by itself.
"""
from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from memory3.memory.bank import Bank
from memory3.memory.cache import MemoryCache
from memory3.memory.codecs import Codec, make_codec
from memory3.memory.errors import BankError
from memory3.memory.manifest import Manifest, MemoryShape


def _replace_rows(bank: Bank, manifest: Manifest, codec: Codec, batches, total: int, desc: str, progress: bool = True) -> None:
    """Write `batches` of (old rows, encoded arrays per layer, embeddings or None) as the
    bank's new rows 0..total-1, commit, then delete the old files."""
    old_files = [p for p, _, _ in bank._files()]
    old_state = bank.manifest.codec.get("state")
    new = replace(manifest, shards=[], counts={"rows": 0, "live": 0, "deleted": 0})
    renumber, crcs = [], []
    with tqdm(total=total, desc=desc, unit="memory", disable=not progress) as bar:
        for old_rows, encoded, emb in batches:
            first = new.rows
            new, c = bank._write_rows(new, codec, encoded, emb)
            crcs += c
            renumber += [(first + k, r) for k, r in enumerate(old_rows)]
            bar.update(len(old_rows))
    new = replace(new, counts={"rows": new.rows, "live": new.rows, "deleted": 0})

    def change(db):
        db.execute("DELETE FROM refs WHERE deleted = 1")
        db.executemany("UPDATE refs SET row = ? WHERE row = ?", renumber)  # ascending, new <= old: no collision
        db.execute("DELETE FROM checksums")
        db.executemany("INSERT INTO checksums(file, start, stop, crc) VALUES (?,?,?,?)", crcs)

    bank._commit(new, change)
    bank.codec = codec
    bank._cache = MemoryCache(bank._cache.capacity, bank.shape.memory, bank.device, bank.dtype)  # row ids changed
    keep = {p for p, _, _ in bank._files()}
    for p in old_files:
        if p not in keep:
            p.unlink(missing_ok=True)
    if old_state and old_state != bank.manifest.codec.get("state"):
        (bank.path / old_state).unlink(missing_ok=True)


def _live_batches(bank: Bank, batch: int):
    for refs in bank.meta.iter_live(batch):
        yield refs, torch.tensor([r.row for r in refs], dtype=torch.long)


def compact(bank: Bank, batch: int = 4096) -> int:
    """Drop tombstoned rows, renumbering the live ones in order (codes copied as stored, no
    re-encoding). Returns the number of rows dropped."""
    bank._require_writable()
    dropped = bank.manifest.counts["deleted"]
    if not dropped:
        return 0

    def batches():
        emb = bank.embeddings() if bank.embedder else None
        for refs, rows in _live_batches(bank, batch):
            yield [r.row for r in refs], bank.stored_rows(rows), None if emb is None else emb[rows]

    _replace_rows(bank, bank.manifest, bank.codec, batches(), len(bank), "compact", progress=len(bank) >= 10000)
    return dropped


def reencode(bank: Bank | str | os.PathLike, encode_fn: Callable[[list[str]], Tensor], fingerprint: str, *,
             batch_size: int = 64, codec_sample: int = 1024, progress: bool = True) -> Bank:
    """Rebuild every live memory from its stored text with another model.

    encode_fn(texts) -> memories [n, L, 2, Hkv, M, D] (the new model's encoder; its shape
    may differ from the old one); fingerprint: the new model's. Tombstones are dropped,
    embeddings kept; a codec with learned state is retrained on the first `codec_sample`
    memories (held in memory until then). Returns the
    bank (opened writable when a path was given)."""
    if not isinstance(bank, Bank):
        bank = Bank.open(bank, writable=True)
    bank._require_writable()
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    state = {"manifest": bank.manifest, "codec": None}

    def encoded_batches():
        emb = bank.embeddings() if bank.embedder else None
        for refs, rows in _live_batches(bank, batch_size):
            mem = encode_fn([r.text for r in refs])
            if not isinstance(mem, Tensor) or mem.dim() != 6 or mem.shape[0] != len(refs) or mem.shape[2] != 2:
                raise ValueError(f"encode_fn must return memories [n={len(refs)}, L, 2, Hkv, M, D], got "
                                 f"{tuple(mem.shape) if isinstance(mem, Tensor) else type(mem).__name__}")
            yield [r.row for r in refs], mem, None if emb is None else emb[rows]

    def setup(sample: Tensor) -> None:
        """The first memories fix the shape; a codec with learned state trains on them."""
        shape = MemoryShape(*(int(x) for x in (sample.shape[1], sample.shape[3], sample.shape[4], sample.shape[5])))
        m = bank.manifest
        codec = make_codec(m.codec["name"], shape, m.codec.get("config"))
        m = replace(m, fingerprint=fingerprint, shape=shape, codec={**m.codec, "state": None, "state_sha256": None})
        if codec.needs_training():
            codec.train(sample)
            m = bank._save_codec_state(m, codec)
        state["manifest"], state["codec"] = m, codec

    def batches():
        source, held = encoded_batches(), []
        for item in source:  # hold the first batches until the codec's training sample is full
            held.append(item)
            if sum(len(h[0]) for h in held) >= codec_sample:
                break
        if not held:
            return
        setup(torch.cat([h[1] for h in held])[:codec_sample])
        codec, shape = state["codec"], state["manifest"].shape
        for old_rows, mem, emb in itertools.chain(held, source):
            if tuple(mem.shape) != (len(old_rows), *shape.memory):
                raise ValueError(f"encode_fn returned {tuple(mem.shape)}, expected {(len(old_rows), *shape.memory)}")
            yield old_rows, [codec.encode(l, mem[:, l, 0], mem[:, l, 1]) for l in range(shape.layers)], emb

    gen = batches()
    first = next(gen, None)
    if first is None:  # an empty bank: only the fingerprint changes
        bank._commit(replace(bank.manifest, fingerprint=fingerprint), lambda db: None)
        return bank

    def all_batches():
        yield first
        yield from gen

    _replace_rows(bank, state["manifest"], state["codec"], all_batches(), len(bank), "reencode", progress)
    bank._parts = None
    return bank


def merge(out, parts: list, **open_kwargs) -> Bank:
    """Join complete banks written separately (e.g. one per torchrun rank, same model, codec
    and embedder; a learned codec state must be the same file) into a new bank `out`, rows in
    the order of `parts`. Shard files are moved, not copied; the parts are removed after the
    commit. Ids must be distinct across parts."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BankError(f"cannot merge into {out}: the directory is not empty")
    banks = [Bank.open(p, writable=True, verify=True) for p in parts]
    try:
        if not banks:
            raise ValueError("merge needs at least one bank")
        m0 = banks[0].manifest
        for b in banks[1:]:
            m = b.manifest
            for field in ("fingerprint", "shape", "embedder"):
                if getattr(m, field) != getattr(m0, field):
                    raise BankError(f"cannot merge {b.path} into {banks[0].path}: their {field} differ ({getattr(m, field)} vs {getattr(m0, field)})")
            if {k: m.codec[k] for k in ("name", "config", "state_sha256")} != {k: m0.codec[k] for k in ("name", "config", "state_sha256")}:
                raise BankError(f"cannot merge {b.path} into {banks[0].path}: their codecs differ ({m.codec} vs {m0.codec})")
        merged = Bank.create(out, shape=m0.shape, fingerprint=m0.fingerprint, codec=m0.codec["name"], codec_config=m0.codec["config"],
                             embedder=m0.embedder, shard_rows=m0.shard_rows, **open_kwargs)
        manifest = merged.manifest
        if m0.codec["state"]:
            merged.codec.load_state_dict(banks[0].codec.state_dict())
            manifest = merged._save_codec_state(manifest)
        shard_list, records, crcs, seen, offset = [], [], [], set(), 0
        for b in banks:
            moved = {}
            for s in b.manifest.shards:
                name = f"s{len(shard_list):06d}"
                for src, _, _ in _shard_files(b, s["name"]):
                    dst = out / src.relative_to(b.path).parent / src.name.replace(s["name"], name, 1)
                    dst.parent.mkdir(exist_ok=True)
                    _link_or_copy(src, dst)
                    moved[str(src.relative_to(b.path))] = str(dst.relative_to(out))
                shard_list.append({"name": name, "rows": s["rows"]})
            for rel, start, stop, crc in b.meta.checksums():
                crcs.append((moved[rel], start, stop, crc))
            rows = b.meta.db.execute("SELECT row, id, text, source, text_hash, tokens, added_at, deleted FROM refs ORDER BY row").fetchall()
            for rec in rows:
                if not rec[7]:
                    if rec[1] in seen:
                        raise BankError(f"cannot merge: id {rec[1]!r} is live in more than one bank")
                    seen.add(rec[1])
                records.append((rec[0] + offset, *rec[1:]))
            offset += b.rows
        live = sum(len(b) for b in banks)
        manifest = replace(manifest, shards=shard_list, next_shard=len(shard_list),
                           counts={"rows": offset, "live": live, "deleted": offset - live})

        def change(db):
            db.executemany("INSERT INTO refs(row, id, text, source, text_hash, tokens, added_at, deleted) VALUES (?,?,?,?,?,?,?,?)", records)
            db.executemany("INSERT INTO checksums(file, start, stop, crc) VALUES (?,?,?,?)", crcs)

        merged._commit(manifest, change)
        merged.verify()
    except BaseException:
        if "merged" in locals():
            merged.close()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        for b in banks:
            b.close()
    for b in banks:
        shutil.rmtree(b.path)
    return merged


def _shard_files(bank: Bank, shard: str):
    return [(p, r, s) for p, r, s in bank._files() if p.name.startswith(shard + ".")]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
