"""The memory bank on disk (DESIGN §4): create, open, append, delete, gather.

    bank = Bank.create("bank/", shape=MemoryShape(layers, Hkv, 8, D), fingerprint=model.fingerprint(),
                       codec="int8", embedder={"name": emb.name, "dim": emb.dim})
    bank.append(ids, texts, memories, embeddings=emb.embed(texts), tokens=token_lists)
    bank = Bank.open("bank/", expect_fingerprint=model.fingerprint(), mode="pinned")
    kv = bank.gather_layers(row_ids)      # per layer (k, v) [*row_ids.shape, Hkv, M, D]; -1 -> zeros
    mem = bank.gather(row_ids)            # the same stacked: [L, 2, *row_ids.shape, Hkv, M, D]
    ops.memory_attention(q, k, v, mem_ids=row_ids, **bank.layer_bank(l))   # float/int8 banks, in place
    bank.cache_stats()                    # hits, misses, hit rate of the decoded-memory cache

Layout: manifest.json, meta.sqlite (meta.py), layer_XX/<shard>.<array>.bin and
index/<shard>.emb.bin (shards.py), codec/state-N.safetensors (learned codec state), index/
(the retrieval index, retrieval/index.py). A memory's row id, in shard order, is what the
model's mem_ids hold; it is stable until `compact` (rewrite.py) renumbers the rows.

Order of writes (crash safety): 1. rows are appended to the shard files after their
committed rows and fsynced (codec state: a new file, fsynced); 2. one SQLite transaction
adds the references' metadata, tombstones, checksums and the new manifest: its commit is
the commit point; 3. manifest.json is replaced atomically (rename). A crash before 2 leaves
bytes past the committed rows, ignored and cut off by the next append; a crash between 2 and
3 leaves manifest.json one commit behind meta.sqlite's copy, which opening rolls forward.

Loading modes (`mode`): "gpu" — every array on `device`, read in place by the ops;
"pinned" — arrays in pinned host memory, an LRU cache of decoded memories on `device`;
"mmap" — arrays memory-mapped from disk (the default without CUDA), a cache on `device`.
One writer at a time (a lock file); any number of read-only openers.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from memory3.memory import shards
from memory3.memory.cache import MemoryCache
from memory3.memory.codecs import ArraySpec, Codec, make_codec
from memory3.memory.errors import BankCorruptError, BankError, BankMismatchError
from memory3.memory.manifest import MANIFEST, Manifest, MemoryShape, fsync_dir, read_manifest, write_manifest
from memory3.memory.meta import META, MetaStore, Reference, text_hash, tokens_to_blob
from memory3.memory.reader import BankReader

LOAD_MODES = ("gpu", "pinned", "mmap")
DEFAULT_CACHE = {"gpu": 0, "pinned": 4096, "mmap": 1024}  # memories
VERIFY_AUTO_BYTES = 64 << 20  # open() checks every checksum of banks up to this size


@dataclass
class AppendResult:
    added: int  # new ids
    replaced: int  # ids whose text changed: old memory tombstoned, new one appended
    unchanged: int  # same id and text already there: nothing done
    rows: list[int | None]  # the row of each input reference after the append

    def __str__(self):
        return f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged"


class Bank(BankReader):
    """A memory bank directory. Use Bank.create or Bank.open, not the constructor."""

    def __init__(self, path: Path, manifest: Manifest, meta: MetaStore, writable: bool, mode: str, device, dtype, cache_size):
        self.path, self.manifest, self.meta, self.writable = path, manifest, meta, writable
        self.mode, self.device, self.dtype = mode, torch.device(device), dtype
        self.codec: Codec = make_codec(manifest.codec["name"], manifest.shape, manifest.codec.get("config"))
        self._load_codec_state()
        self._lock_fd: int | None = None
        self._parts: list[dict[str, list[Tensor]]] | None = None  # [layer][array] -> per-shard tensors
        self._starts: Tensor | None = None  # first row of each shard
        self._cache = MemoryCache(cache_size, manifest.shape.memory, self.device, dtype)
        self._read_lock = threading.Lock()

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path, *, shape: MemoryShape, fingerprint: str, codec: str = "bf16", codec_config: dict | None = None,
               embedder: dict | None = None, shard_rows: int = 65536, **open_kwargs) -> "Bank":
        """A new, empty, writable bank at `path` (an empty or missing directory).

        shape: MemoryShape(layers, kv_heads, tokens, head_dim); fingerprint: the model's hex
        string; codec: a registered codec name (codecs.codec_names()); embedder: {"name", "dim"}
        of the retrieval embedder, or None for a bank without embeddings."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise BankError(f"cannot create a memory bank in {path}: the directory is not empty")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        if embedder is not None and (set(embedder) != {"name", "dim"} or int(embedder["dim"]) <= 0):
            raise ValueError(f"embedder must be {{'name': str, 'dim': int > 0}} or None, got {embedder!r}")
        if shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {shard_rows}")
        config = make_codec(codec, shape, codec_config).config()  # validates name and options
        now = time.time()
        m = Manifest(fingerprint, shape, {"name": codec, "config": config, "state": None, "state_sha256": None},
                     shard_rows=shard_rows, embedder=None if embedder is None else {"name": str(embedder["name"]), "dim": int(embedder["dim"])},
                     created_at=now, updated_at=now)
        # built beside `path` and renamed into place: a crash leaves no half-made bank
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = MetaStore(tmp / META, writable=True, create=True)
        with meta.transaction() as db:
            MetaStore.save_manifest(db, m.to_json())
        meta.close()
        write_manifest(tmp, m)
        os.replace(tmp, path)  # also replaces an empty directory
        fsync_dir(path.parent)
        return cls.open(path, writable=True, **open_kwargs)

    @classmethod
    def open(cls, path, *, writable: bool = False, mode: str | None = None, device=None, dtype: torch.dtype = torch.bfloat16,
             cache_size: int | None = None, expect_fingerprint: str | None = None, verify: bool | None = None) -> "Bank":
        """Open a bank. mode: "gpu" | "pinned" | "mmap" (default: "pinned" with CUDA, else
        "mmap"); device: where gathered memories go (default cuda if available, else cpu);
        dtype: of gathered memories; cache_size: memories in the LRU cache (default per mode,
        DEFAULT_CACHE); expect_fingerprint: raise BankMismatchError unless the bank has it;
        verify: check every shard checksum (default: when the bank is at most 64 MiB)."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"memory bank {path} does not exist (or is not a directory)")
        cuda = torch.cuda.is_available()
        mode = mode or ("pinned" if cuda else "mmap")
        if mode not in LOAD_MODES:
            raise ValueError(f"mode must be one of {', '.join(LOAD_MODES)}, got {mode!r}")
        device = torch.device(device or ("cuda" if cuda else "cpu"))
        lock = _lock(path) if writable else None
        try:
            manifest = read_manifest(path)
            meta = MetaStore(path / META, writable=writable)
            manifest = _reconcile(path, manifest, meta, writable)
            if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
                raise BankMismatchError(path, manifest.fingerprint, expect_fingerprint)
            bank = cls(path, manifest, meta, writable, mode, device, dtype, DEFAULT_CACHE[mode] if cache_size is None else cache_size)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        bank._lock_fd = lock
        bank._check_files()
        if verify or (verify is None and bank.nbytes() <= VERIFY_AUTO_BYTES):
            bank.verify()
        return bank

    def close(self) -> None:
        self.meta.close()
        self._parts = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        m = self.manifest
        return (f"Bank({str(self.path)!r}, {m.counts['live']} live memories ({m.counts['deleted']} deleted), "
                f"shape {m.shape.memory}, codec {self.codec.name}, mode {self.mode})")

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> MemoryShape:
        return self.manifest.shape

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def rows(self) -> int:
        """Rows stored, tombstoned ones included: valid row ids are 0..rows-1."""
        return self.manifest.rows

    def __len__(self) -> int:
        """Live (not deleted) references."""
        return self.manifest.counts["live"]

    @property
    def embedder(self) -> dict | None:
        return self.manifest.embedder

    def _files(self):
        """(path, rows, ArraySpec) of every committed shard file."""
        arrays = self.codec.arrays()
        for s in self.manifest.shards:
            for layer in range(self.shape.layers):
                for name, spec in arrays.items():
                    yield shards.shard_path(self.path, layer, s["name"], name), s["rows"], spec
            if self.embedder:
                yield shards.shard_path(self.path, None, s["name"], shards.EMBEDDINGS), s["rows"], self._emb_spec()

    def _emb_spec(self) -> ArraySpec:
        return ArraySpec(torch.float32, (self.embedder["dim"],))

    def bytes_per_memory(self) -> int:
        """Stored bytes of one memory (all layers, keys and values, codec side data)."""
        return self.shape.layers * sum(spec.row_bytes for spec in self.codec.arrays().values())

    def nbytes(self) -> int:
        return sum(rows * spec.row_bytes for _, rows, spec in self._files())

    def _check_files(self) -> None:
        for path, rows, spec in self._files():
            shards._check_size(path, rows, spec)

    def verify(self) -> None:
        """Check every committed byte range against its crc32 (BankCorruptError naming the file)."""
        for rel, start, stop, crc in self.meta.checksums():
            if shards.file_crc(self.path / rel, start, stop) != crc:
                raise BankCorruptError(f"shard file {self.path / rel} is damaged: bytes {start}..{stop} fail their checksum")

    # ------------------------------------------------------------------ codec state

    def _load_codec_state(self) -> None:
        rel, want = self.manifest.codec.get("state"), self.manifest.codec.get("state_sha256")
        if rel is None:
            return
        path = self.path / rel
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BankCorruptError(f"codec state {path} is missing") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise BankCorruptError(f"codec state {path} is damaged (its sha256 differs from the manifest's)")
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise BankCorruptError(f"codec state {path} is not a readable safetensors file ({exc})") from None
        try:
            self.codec.load_state_dict(state)
        except ValueError as exc:
            raise BankCorruptError(f"codec state {path}: {exc}") from None

    def _save_codec_state(self, manifest: Manifest, codec: Codec | None = None) -> Manifest:
        """Write the codec's state to a new file (fsynced); the returned manifest names it."""
        rel = f"codec/state-{manifest.commit + 1}.safetensors"
        path = self.path / rel
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in (codec or self.codec).state_dict().items()}, path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
        return replace(manifest, codec={**manifest.codec, "state": rel, "state_sha256": digest})

    def train_codec(self, memories: Tensor) -> None:
        """Train a codec with learned state (pq, vq) on a sample [n, L, 2, Hkv, M, D] before the
        first append (otherwise the first append's memories are the sample)."""
        self._require_writable()
        if self.rows:
            raise BankError("the codec can only be trained before the first memory is appended")
        self._check_memories(memories, len(memories))
        self.codec.train(memories)
        self._commit(self._save_codec_state(self.manifest), lambda db: None)

    # ------------------------------------------------------------------ writing

    def _require_writable(self) -> None:
        if not self.writable:
            raise BankError(f"memory bank {self.path} is open read-only; open it with writable=True to change it")

    def _check_memories(self, memories: Tensor, n: int) -> None:
        want = (n, *self.shape.memory)
        if not isinstance(memories, Tensor) or tuple(memories.shape) != want or not memories.is_floating_point():
            got = tuple(memories.shape) if isinstance(memories, Tensor) else type(memories).__name__
            raise ValueError(f"memories must be a float tensor [n, layers, 2, Hkv, M, D] = {list(want)}, got {got}")

    def needs(self, ids, texts) -> list[bool]:
        """For each (id, text): True when append would store it (new id or changed text), so
        callers encode only those."""
        ids = [str(i) for i in ids]
        have = self.meta.live_by_id(ids)
        return [i not in have or have[i][1] != text_hash(t) for i, t in zip(ids, texts)]

    def append(self, ids, texts, memories: Tensor, *, embeddings: Tensor | None = None, sources=None, tokens=None) -> AppendResult:
        """Store references and their memories in one commit.

        ids, texts: sequences of n; memories [n, L, 2, Hkv, M, D] float (rows of references
        that need no change are skipped, see needs()); embeddings [n, dim] float when the bank
        has an embedder; sources: n strings or None; tokens: n token-id lists or None.
        An id already stored with the same text is left as is; with another text, its old
        memory is tombstoned and the new one appended."""
        self._require_writable()
        ids = [str(i) for i in ids]
        texts = list(texts)
        n = len(ids)
        sources = [None] * n if sources is None else list(sources)
        tokens = [None] * n if tokens is None else list(tokens)
        if not (len(texts) == len(sources) == len(tokens) == n):
            raise ValueError(f"ids, texts, sources and tokens must have the same length, got {n}, {len(texts)}, {len(sources)}, {len(tokens)}")
        if len(set(ids)) != n:
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"ids must be distinct within one append; {dup!r} appears more than once")
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be strings")
        self._check_memories(memories, n)
        if self.embedder:
            dim = self.embedder["dim"]
            if not isinstance(embeddings, Tensor) or tuple(embeddings.shape) != (n, dim):
                got = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else embeddings
                raise ValueError(f"embeddings must be a float tensor [n, {dim}] = [{n}, {dim}] for this bank's embedder, got {got}")
        elif embeddings is not None:
            raise ValueError("this bank has no embedder: pass embeddings=None (or create it with embedder=...)")
        hashes = [text_hash(t) for t in texts]
        have = self.meta.live_by_id(ids)
        todo = [i for i in range(n) if ids[i] not in have or have[ids[i]][1] != hashes[i]]
        rows: list[int | None] = [have[i][0] if i in have else None for i in ids]
        if not todo:
            return AppendResult(0, 0, n, rows)
        replaced = [have[ids[i]][0] for i in todo if ids[i] in have]
        manifest = self.manifest
        new = memories[todo].detach().cpu()  # codecs encode on the host (the kernels every build has)
        if self.codec.needs_training():
            self.codec.train(new)
            manifest = self._save_codec_state(manifest)
        encoded = [self.codec.encode(l, new[:, l, 0], new[:, l, 1]) for l in range(self.shape.layers)]
        manifest, crcs = self._write_rows(manifest, self.codec, encoded, None if embeddings is None else embeddings[todo].detach().cpu())
        first = self.rows
        now = time.time()
        for k, i in enumerate(todo):
            rows[i] = first + k
        records = [(first + k, ids[i], texts[i], sources[i], hashes[i], tokens_to_blob(tokens[i]), now) for k, i in enumerate(todo)]
        live, dead = manifest.counts["live"] + len(todo) - len(replaced), manifest.counts["deleted"] + len(replaced)
        manifest = replace(manifest, counts={"rows": manifest.rows, "live": live, "deleted": dead})

        def change(db):
            db.executemany("UPDATE refs SET deleted = 1 WHERE row = ?", [(r,) for r in replaced])
            db.executemany("INSERT INTO refs(row, id, text, source, text_hash, tokens, added_at) VALUES (?,?,?,?,?,?,?)", records)
            db.executemany("INSERT INTO checksums(file, start, stop, crc) VALUES (?,?,?,?)", crcs)

        self._commit(manifest, change)
        return AppendResult(len(todo) - len(replaced), len(replaced), n - len(todo), rows)

    def _write_rows(self, manifest: Manifest, codec: Codec, encoded: list[dict[str, Tensor]], embeddings: Tensor | None) -> tuple[Manifest, list]:
        """Append encoded rows (per layer: codec array name -> [n, ...]) to the shard files
        (step 1); returns the manifest that commits them and the checksum records."""
        shard_list = [dict(s) for s in manifest.shards]
        n = len(next(iter(encoded[0].values())))
        next_shard, crcs, done = manifest.next_shard, [], 0
        while done < n:
            if not shard_list or shard_list[-1]["rows"] >= manifest.shard_rows:
                shard_list.append({"name": f"s{next_shard:06d}", "rows": 0})
                next_shard += 1
            shard = shard_list[-1]
            take = min(n - done, manifest.shard_rows - shard["rows"])
            pieces = [(l, name, arr[done : done + take]) for l in range(len(encoded)) for name, arr in encoded[l].items()]
            if embeddings is not None:
                pieces.append((None, shards.EMBEDDINGS, embeddings[done : done + take].float()))
            for layer, name, data in pieces:
                spec = self._emb_spec() if layer is None else codec.arrays()[name]
                path = shards.shard_path(self.path, layer, shard["name"], name)
                crc = shards.append_rows(path, shard["rows"], spec, data.cpu().contiguous())
                start = shard["rows"] * spec.row_bytes
                crcs.append((str(path.relative_to(self.path)), start, start + take * spec.row_bytes, crc))
            shard["rows"] += take
            done += take
        return replace(manifest, shards=shard_list, next_shard=next_shard), crcs

    def _commit(self, manifest: Manifest, change) -> None:
        """Steps 2 and 3: one SQLite transaction (change(db) + the manifest), then manifest.json."""
        manifest = replace(manifest, commit=manifest.commit + 1, updated_at=time.time())
        with self.meta.transaction() as db:
            change(db)
            MetaStore.save_manifest(db, manifest.to_json())
        write_manifest(self.path, manifest)
        with self._read_lock:
            self.manifest = manifest
            self._parts = None  # the readers map the new rows on next use

    def delete(self, ids) -> int:
        """Tombstone the live references with these ids (retrieval skips them; compact drops
        them). Returns how many were deleted; unknown ids are ignored."""
        self._require_writable()
        rows = [row for row, _ in self.meta.live_by_id([str(i) for i in ids]).values()]
        if not rows:
            return 0
        c = self.manifest.counts
        manifest = replace(self.manifest, counts={**c, "live": c["live"] - len(rows), "deleted": c["deleted"] + len(rows)})
        self._commit(manifest, lambda db: db.executemany("UPDATE refs SET deleted = 1 WHERE row = ?", [(r,) for r in rows]))
        return len(rows)

    # ------------------------------------------------------------------ metadata reads

    def lookup(self, ids) -> list[int | None]:
        """Row of each live id (None when absent or deleted)."""
        ids = [str(i) for i in ids]
        have = self.meta.live_by_id(ids)
        return [have[i][0] if i in have else None for i in ids]

    def references(self, rows) -> list[Reference | None]:
        """Metadata (id, text, source, tokens, deleted...) of rows; None for unknown rows."""
        return self.meta.references([int(r) for r in rows])

    def deleted_mask(self) -> Tensor:
        """bool [rows]: True where the row is tombstoned."""
        mask = torch.zeros(self.rows, dtype=torch.bool)
        dead = self.meta.deleted_rows()
        if dead:
            mask[torch.tensor(dead)] = True
        return mask

    def embeddings(self) -> Tensor:
        """float32 [rows, dim] embeddings of every row (memory-mapped when in one shard)."""
        if not self.embedder:
            raise BankError(f"memory bank {self.path} has no embeddings (it was created without an embedder)")
        spec = self._emb_spec()
        parts = [shards.map_rows(shards.shard_path(self.path, None, s["name"], shards.EMBEDDINGS), s["rows"], spec)
                 for s in self.manifest.shards]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty((0, spec.shape[0]))


def _lock(path: Path) -> int:
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BankError(f"memory bank {path} is open for writing by another process") from None
    return fd


def _reconcile(path: Path, manifest: Manifest, meta: MetaStore, writable: bool) -> Manifest:
    """Agree manifest.json with meta.sqlite's committed copy (see the order of writes)."""
    text = meta.manifest_json()
    if text is None:
        raise BankCorruptError(f"{path / META} holds no manifest: the bank's metadata is damaged")
    committed = Manifest.from_json(text, f"{path / META} (its manifest copy)")
    if committed.commit == manifest.commit:
        if committed != manifest:
            raise BankCorruptError(f"{path / MANIFEST} differs from the manifest committed in {path / META} (same commit {manifest.commit})")
        return manifest
    if committed.commit == manifest.commit + 1:  # crashed between the SQLite commit and the rename
        if writable:
            write_manifest(path, committed)
        return committed
    raise BankCorruptError(f"{path / MANIFEST} is at commit {manifest.commit} but {path / META} at commit {committed.commit}")
