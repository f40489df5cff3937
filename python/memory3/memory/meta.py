"""meta.sqlite: one row per reference, a copy of the manifest, and checksums of the shards.

    refs(row INTEGER PRIMARY KEY,  -- the memory's row id in the shards (what mem_ids hold)
         id TEXT, text TEXT, source TEXT, text_hash TEXT, tokens BLOB (int32 little-endian
         token ids, or NULL), added_at REAL, deleted INTEGER (1 = tombstone))
    state(key TEXT PRIMARY KEY, value TEXT)     -- 'manifest': the committed manifest JSON
    checksums(file TEXT, start INTEGER, stop INTEGER, crc INTEGER)   -- crc32 of byte ranges

Every change is one transaction (`with store.transaction():`); committing it is the commit
point of a bank change (see bank.py). Only plain SQL values are stored: nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memory3.memory.errors import BankCorruptError

META = "meta.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS refs(
    row INTEGER PRIMARY KEY, id TEXT NOT NULL, text TEXT NOT NULL, source TEXT,
    text_hash TEXT NOT NULL, tokens BLOB, added_at REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS refs_live_id ON refs(id) WHERE deleted = 0;
CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checksums(file TEXT NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL, crc INTEGER NOT NULL);
"""


def _hot_journal(path: Path) -> bool:
    journal = path.with_name(path.name + "-journal")
    return journal.exists() and journal.stat().st_size > 0


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokens_to_blob(tokens) -> bytes | None:
    """Token ids (a list, tuple, numpy array or 1-D tensor) as int32 little-endian bytes."""
    if tokens is None:
        return None
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return np.asarray(list(tokens), dtype="<i4").tobytes()


def blob_to_tokens(blob: bytes | None) -> list[int] | None:
    return None if blob is None else np.frombuffer(blob, dtype="<i4").tolist()


@dataclass
class Reference:
    """One stored reference: its row id, id, text, source, token ids (or None), deletion."""

    row: int
    id: str
    text: str
    source: str | None
    text_hash: str
    tokens: list[int] | None
    added_at: float
    deleted: bool


class MetaStore:
    def __init__(self, path: Path, writable: bool, create: bool = False):
        # check_same_thread=False: generation reads metadata from a prefetch thread (one user
        # at a time; sqlite3 is built serialized, threadsafety 3).
        self.path = path
        if not create and not path.exists():
            raise BankCorruptError(f"{path} is missing: the bank's metadata is gone")
        try:
            if writable:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA synchronous = FULL")
                self.db.executescript(_SCHEMA)
            elif _hot_journal(path) and os.access(path, os.W_OK):
                # a writer died mid-transaction: SQLite rolls its journal back on the first
                # read, which needs write access; then query_only keeps this reader from writing
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self.db.execute("SELECT count(*) FROM refs").fetchone()
                self.db.execute("PRAGMA query_only = ON")
            else:
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                          check_same_thread=False)
            self.db.execute("SELECT count(*) FROM refs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BankCorruptError(f"{path} is not a readable bank metadata database ({exc})") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _query(self, sql: str, args=()) -> list:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise BankCorruptError(f"{self.path}: {exc}") from None

    def manifest_json(self) -> str | None:
        rows = self._query("SELECT value FROM state WHERE key = 'manifest'")
        return rows[0][0] if rows else None

    @staticmethod
    def save_manifest(db, text: str) -> None:
        db.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('manifest', ?)", (text,))

    def live_by_id(self, ids: list[str]) -> dict[str, tuple[int, str]]:
        """id -> (row, text_hash) of the live references among ids."""
        out = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            for row, id_, h in self._query(f"SELECT row, id, text_hash FROM refs WHERE deleted = 0 AND id IN ({marks})", part):
                out[id_] = (row, h)
        return out

    def references(self, rows: list[int]) -> list[Reference | None]:
        found = {}
        for i in range(0, len(rows), 500):
            part = [int(r) for r in rows[i : i + 500]]
            marks = ",".join("?" * len(part))
            for rec in self._query(f"SELECT * FROM refs WHERE row IN ({marks})", part):
                found[rec[0]] = _reference(rec)
        return [found.get(int(r)) for r in rows]

    def iter_live(self, batch: int = 1024):
        """Live references in row order, in lists of up to `batch`."""
        last = -1
        while True:
            recs = self._query("SELECT * FROM refs WHERE deleted = 0 AND row > ? ORDER BY row LIMIT ?", (last, batch))
            if not recs:
                return
            yield [_reference(r) for r in recs]
            last = recs[-1][0]

    def deleted_rows(self) -> list[int]:
        return [r for (r,) in self._query("SELECT row FROM refs WHERE deleted = 1")]

    def count(self) -> tuple[int, int]:
        """(live, deleted) references."""
        (live, dead), = self._query("SELECT coalesce(sum(deleted = 0), 0), coalesce(sum(deleted = 1), 0) FROM refs")
        return live, dead

    def checksums(self) -> list[tuple[str, int, int, int]]:
        return self._query("SELECT file, start, stop, crc FROM checksums ORDER BY file, start")


def _reference(rec) -> Reference:
    row, id_, text, source, h, tokens, added, deleted = rec
    return Reference(row, id_, text, source, h, blob_to_tokens(tokens), added, bool(deleted))
