"""manifest.json: what a bank holds (DESIGN §4).

    {"format": "memory3-bank", "format_version": 1,
     "fingerprint": "<hex string of the model that encoded the memories>",
     "commit": 7,                                   # bumped by every committed change
     "shape": {"layers": L, "kv_heads": Hkv, "tokens": M, "head_dim": D},
     "codec": {"name": "int8", "config": {}, "state": "codec/state-3.safetensors" | null,
               "state_sha256": "..." | null},
     "shards": [{"name": "s000000", "rows": 65536}, ...],   # rows in order: row ids
     "shard_rows": 65536, "next_shard": 2,
     "counts": {"rows": R, "live": R - deleted, "deleted": ...},
     "embedder": {"name": "all-MiniLM-L6-v2", "dim": 384} | null,
     "created_at": 1.7e9, "updated_at": 1.7e9}

The manifest is written atomically (temporary file, fsync, rename, fsync of the directory).
meta.sqlite keeps a copy of it, committed in the same transaction as the rows' metadata:
that transaction is a change's commit point (bank.py explains the order of writes).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memory3.memory.errors import BankCorruptError

FORMAT = "memory3-bank"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class MemoryShape:
    """One memory is a [layers, 2, kv_heads, tokens, head_dim] tensor (2 = keys, values)."""

    layers: int
    kv_heads: int
    tokens: int
    head_dim: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"memory shape {name} must be a positive int, got {value!r}")

    @property
    def memory(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, self.tokens, self.head_dim)

    @property
    def layer(self) -> tuple[int, int, int]:
        """One layer's keys (or values) of one memory: [Hkv, M, D]."""
        return (self.kv_heads, self.tokens, self.head_dim)


@dataclass
class Manifest:
    fingerprint: str
    shape: MemoryShape
    codec: dict
    shards: list[dict] = field(default_factory=list)
    shard_rows: int = 65536
    next_shard: int = 0
    counts: dict = field(default_factory=lambda: {"rows": 0, "live": 0, "deleted": 0})
    embedder: dict | None = None
    commit: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def to_json(self) -> str:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION}
        d.update(asdict(self))
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """Parse and check a manifest; a BankCorruptError names `where` on any problem."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BankCorruptError(f"{where} is not valid JSON ({exc}): the bank manifest is damaged") from None
        try:
            if d.get("format") != FORMAT:
                raise BankCorruptError(f"{where} is not a memory3 bank manifest (format {d.get('format')!r})")
            if d.get("format_version") != FORMAT_VERSION:
                raise BankCorruptError(
                    f"{where} has format version {d.get('format_version')!r}; this memory3 reads version {FORMAT_VERSION}"
                )
            m = cls(
                fingerprint=str(d["fingerprint"]),
                shape=MemoryShape(**d["shape"]),
                codec=dict(d["codec"]),
                shards=[{"name": str(s["name"]), "rows": int(s["rows"])} for s in d["shards"]],
                shard_rows=int(d["shard_rows"]),
                next_shard=int(d["next_shard"]),
                counts={k: int(d["counts"][k]) for k in ("rows", "live", "deleted")},
                embedder=None if d["embedder"] is None else {"name": str(d["embedder"]["name"]), "dim": int(d["embedder"]["dim"])},
                commit=int(d["commit"]),
                created_at=float(d["created_at"]),
                updated_at=float(d["updated_at"]),
            )
        except BankCorruptError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BankCorruptError(f"{where} is missing or has a bad field ({type(exc).__name__}: {exc})") from None
        if any(s["rows"] < 0 or not s["name"].isalnum() for s in m.shards) or m.shard_rows <= 0:
            raise BankCorruptError(f"{where} has a bad shard list {m.shards} (shard_rows {m.shard_rows})")
        if m.counts["rows"] != m.rows or m.counts["live"] + m.counts["deleted"] != m.rows:
            raise BankCorruptError(f"{where}: counts {m.counts} do not add up to the {m.rows} rows of its shards")
        return m


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(bank: Path) -> Manifest:
    path = bank / MANIFEST
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BankCorruptError(f"{bank} is not a memory bank: {MANIFEST} is missing") from None
    except UnicodeDecodeError:
        raise BankCorruptError(f"{path} is not UTF-8 text: the bank manifest is damaged") from None
    return Manifest.from_json(text, str(path))


def write_manifest(bank: Path, manifest: Manifest) -> None:
    write_atomic(bank / MANIFEST, manifest.to_json().encode())
