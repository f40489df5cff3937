"""Shard files: fixed-size rows of one array, appended in place, read memory-mapped.

A bank's rows are split into shards (manifest "shards", in order). Each shard holds, per
memory layer and codec array, one file `layer_XX/<shard>.<array>.bin` of C-contiguous rows
(ArraySpec: dtype and per-row shape), and `index/<shard>.emb.bin` (float32 embeddings) when
the bank has an embedder. Only the first `rows` rows the manifest commits count: bytes past
them are the remains of an interrupted append and are cut off before the next append.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from memory3.memory.codecs import ArraySpec
from memory3.memory.errors import BankCorruptError
from memory3.memory.manifest import fsync_dir

EMBEDDINGS = "emb"


def shard_path(bank: Path, layer: int | None, shard: str, array: str) -> Path:
    """layer None: the embeddings of the shard (array "emb") under index/."""
    folder = "index" if layer is None else f"layer_{layer:02d}"
    return bank / folder / f"{shard}.{array}.bin"


def _as_bytes(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def append_rows(path: Path, committed_rows: int, spec: ArraySpec, data: Tensor) -> int:
    """Write rows `data` [n, *spec.shape] after the first `committed_rows` rows of the file
    (created if missing), fsync, and return the crc32 of the bytes written."""
    if tuple(data.shape[1:]) != spec.shape or data.dtype != spec.dtype:
        raise ValueError(f"rows for {path.name} must be {spec.dtype} [n, {', '.join(map(str, spec.shape))}], "
                         f"got {data.dtype} {list(data.shape)}")
    start = committed_rows * spec.row_bytes
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    buf = _as_bytes(data)
    with open(path, "r+b" if not created else "wb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < start:
            raise BankCorruptError(f"{path} holds {size} bytes, fewer than its {committed_rows} committed rows ({start} bytes)")
        f.truncate(start)  # drop what an interrupted append left behind
        f.seek(start)
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_dir(path.parent)
    return zlib.crc32(buf)


def _check_size(path: Path, rows: int, spec: ArraySpec) -> None:
    need = rows * spec.row_bytes
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BankCorruptError(f"shard file {path} is missing (the manifest commits {rows} rows in it)") from None
    if size < need:
        raise BankCorruptError(
            f"shard file {path} is truncated: {size} bytes, but its {rows} committed rows need {need} bytes"
        )


def map_rows(path: Path, rows: int, spec: ArraySpec) -> Tensor:
    """The committed rows as a memory-mapped tensor [rows, *spec.shape] (copy-on-write: the
    file is never modified through it)."""
    if rows == 0:
        return torch.empty((0, *spec.shape), dtype=spec.dtype)
    _check_size(path, rows, spec)
    raw = np.memmap(path, dtype=np.uint8, mode="c", shape=(rows * spec.row_bytes,))
    return torch.from_numpy(raw).view(spec.dtype).reshape(rows, *spec.shape)


def read_rows(path: Path, rows: int, spec: ArraySpec, pin: bool = False) -> Tensor:
    """The committed rows read into (optionally pinned) host memory."""
    out = torch.empty((rows, *spec.shape), dtype=spec.dtype, pin_memory=pin)
    if rows == 0:
        return out
    _check_size(path, rows, spec)
    with open(path, "rb") as f:
        got = f.readinto(_as_bytes_view(out))
    if got != rows * spec.row_bytes:
        raise BankCorruptError(f"shard file {path}: read {got} bytes, expected {rows * spec.row_bytes}")
    return out


def _as_bytes_view(t: Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def file_crc(path: Path, start: int, stop: int) -> int:
    """crc32 of bytes [start, stop) of a file (BankCorruptError when they are not there)."""
    crc, pos = 0, start
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while pos < stop:
                block = f.read(min(1 << 22, stop - pos))
                if not block:
                    raise BankCorruptError(f"shard file {path} ends at byte {pos}, before its committed byte {stop}")
                crc, pos = zlib.crc32(block, crc), pos + len(block)
    except FileNotFoundError:
        raise BankCorruptError(f"shard file {path} is missing") from None
    return crc
