"""A knowledge base (jsonl) -> a memory bank, in one process or sharded over torchrun ranks.

    python -m memory3.memory.encode KB.jsonl --model MODEL --out BANK [--codec int8] [--batch-size 64]
    torchrun --nproc-per-node 4 -m memory3.memory.encode KB.jsonl --model MODEL --out BANK

Each line of KB.jsonl is an object {"id": str | int, "text": str, "source": str (optional)}.
Per batch of references: the model's memory layers make the memories (memory/encoder.py),
the embedder the retrieval vectors, and one bank append commits both (crash-safe; re-running
on an existing bank encodes only new or changed references). With several ranks, rank r
encodes the r-th contiguous slice into its own part bank `BANK.part-r-of-N`, and rank 0
merges the parts in rank order (memory/rewrite.py `merge`), so the bank is the one a single
process writes: same rows, same memories, same metadata. A codec with learned state (pq,
vq) is trained once on rank 0's first batch, sent to every rank, so all parts share it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memory3.memory.bank import Bank
from memory3.memory.codecs import codec_names
from memory3.memory.encoder import encode_texts
from memory3.memory.manifest import MANIFEST, MemoryShape

APPEND_BATCH = 256  # references per bank commit (a crash loses at most this much work)
EMBED_BATCH = 128  # the embedder runs 2-3x faster per text at 128 than at 16-32 on a CPU


@dataclass
class KBRecord:
    id: str
    text: str
    source: str | None = None


@dataclass
class EncodeStats:
    """Where encoding time went (seconds), for the progress summary and bench_encode."""

    references: int = 0  # encoded and stored
    unchanged: int = 0  # already in the bank with the same text
    model_s: float = 0.0
    embed_s: float = 0.0
    bank_s: float = 0.0
    times: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.model_s + self.embed_s + self.bank_s

    def __str__(self) -> str:
        t = max(self.total_s, 1e-9)
        return (f"{self.references} references encoded ({self.unchanged} unchanged) in {self.total_s:.1f} s "
                f"({self.references / t:.1f} refs/s): model {100 * self.model_s / t:.0f}%, "
                f"embedder {100 * self.embed_s / t:.0f}%, bank write {100 * self.bank_s / t:.0f}%")


def read_knowledge_base(path: str | Path) -> list[KBRecord]:
    """Parse a jsonl knowledge base; a bad line is a ValueError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"knowledge base {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read knowledge base {path}: {e}") from None
    records, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object {{\"id\", \"text\", \"source\"?}}, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"id", "text", "source"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a reference has id, text and optional source")
        if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool) or obj.get("id") == "":
            raise ValueError(f"{where}: \"id\" must be a non-empty string or an integer, got {obj.get('id')!r}")
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise ValueError(f"{where}: \"text\" must be a non-empty string, got {obj.get('text')!r}")
        if obj.get("source") is not None and not isinstance(obj["source"], str):
            raise ValueError(f"{where}: \"source\" must be a string, got {obj['source']!r}")
        rid = str(obj["id"])
        if rid in seen:
            raise ValueError(f"{where}: id {rid!r} already appears on line {seen[rid]}")
        seen[rid] = n
        records.append(KBRecord(rid, obj["text"], obj.get("source")))
    if not records:
        raise ValueError(f"knowledge base {path} holds no references")
    return records


def check_existing_bank(out, model, embedder_spec: dict | None, codec: str | None) -> bool:
    """True when `out` holds a bank this encode may append to; raises when it cannot (another
    model, embedder or codec). False when there is no bank yet."""
    from memory3.model import fingerprint

    out = Path(out)
    if not (out / MANIFEST).exists():
        return False
    with Bank.open(out, expect_fingerprint=fingerprint(model), device="cpu", verify=False) as bank:
        if embedder_spec is not None and bank.embedder != embedder_spec:
            raise ValueError(f"memory bank {out} was embedded with {bank.embedder}, not {embedder_spec}")
        if codec is not None and codec != bank.codec.name:
            raise ValueError(f"memory bank {out} stores codec {bank.codec.name}, not {codec} (omit --codec to append to it)")
    return True


def open_or_create_bank(out, model, tokenizer, embedder, codec: str | None = None) -> Bank:
    """The bank at `out`: opened for appending when it exists (it must be this model's, and
    `codec`, when given, its codec), else created for this model, codec (default int8) and
    embedder."""
    from memory3.model import fingerprint

    out = Path(out)
    if check_existing_bank(out, model, embedder.spec(), codec):
        return Bank.open(out, writable=True, expect_fingerprint=fingerprint(model), device="cpu", dtype=model.dtype)
    codec = codec or "int8"
    if codec not in codec_names():
        raise ValueError(f"unknown codec {codec!r}; codecs: {', '.join(codec_names())}")
    c = model.config
    shape = MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens, c.head_dim)
    return Bank.create(out, shape=shape, fingerprint=fingerprint(model), codec=codec, embedder=embedder.spec(),
                       device="cpu", dtype=model.dtype)


def encode_into(bank: Bank, model, tokenizer, embedder, records: list[KBRecord], *, batch_size: int = 64,
                progress: bool = True, stats: EncodeStats | None = None) -> EncodeStats:
    """Encode the records that `bank` lacks (new ids or changed texts) and append them (a
    learned codec not yet trained trains on the first batch)."""
    stats = stats or EncodeStats()
    c = model.config
    want = getattr(bank.codec, "min_train_memories", 0)  # vq: 2^14 vectors, more than a batch on small heads
    if bank.codec.needs_training() and not bank.rows and want > APPEND_BATCH:
        sample = [r.text for r in records[:want]]
        bank.train_codec(encode_texts(model, tokenizer, sample, batch_size=batch_size, progress=False).float().cpu())
    with tqdm(total=len(records), desc="encoding", unit="ref", disable=not progress) as bar:
        for start in range(0, len(records), APPEND_BATCH):
            part = records[start : start + APPEND_BATCH]
            need = bank.needs([r.id for r in part], [r.text for r in part])
            todo = [r for r, n in zip(part, need) if n]
            stats.unchanged += len(part) - len(todo)
            if todo:
                texts = [r.text for r in todo]
                t0 = time.perf_counter()
                memories = encode_texts(model, tokenizer, texts, batch_size=batch_size, progress=False)
                t1 = time.perf_counter()
                embeddings = embedder.embed(texts, batch_size=EMBED_BATCH)
                t2 = time.perf_counter()
                bank.append([r.id for r in todo], texts, memories.float().cpu(), embeddings=embeddings,
                            sources=[r.source for r in todo], tokens=[tokenizer.reference_ids(t, c.ref_len) for t in texts])
                t3 = time.perf_counter()
                stats.model_s += t1 - t0
                stats.embed_s += t2 - t1
                stats.bank_s += t3 - t2
                stats.references += len(todo)
            bar.update(len(part))
    return stats


def encode_knowledge_base(kb, out, model, tokenizer, embedder, *, codec: str | None = None, batch_size: int = 64,
                          progress: bool = True) -> tuple[Bank, EncodeStats]:
    """One process: KB (a jsonl path or a list of KBRecord) -> the bank at `out`."""
    records = read_knowledge_base(kb) if isinstance(kb, (str, Path)) else list(kb)
    bank = open_or_create_bank(out, model, tokenizer, embedder, codec)
    try:
        stats = encode_into(bank, model, tokenizer, embedder, records, batch_size=batch_size, progress=progress)
    except BaseException:
        bank.close()
        raise
    return bank, stats


# ---------------------------------------------------------------------- torchrun


def part_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank}-of-{world}")


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Rank r's contiguous share of n records (merging in rank order keeps the input order)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def encode_distributed(kb, out, model, tokenizer, embedder, *, codec: str | None = None, batch_size: int = 64,
                       progress: bool = True) -> EncodeStats | None:
    """Run on every rank of an initialized torch.distributed group; rank 0 returns after the
    merge with the merged bank at `out` (other ranks return their own stats)."""
    import torch.distributed as dist

    from memory3.memory.rewrite import merge

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    records = read_knowledge_base(kb)
    if (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds a bank: a sharded encode writes a new one "
                         "(append to an existing bank with one process)")
    mine = records[shard_slice(len(records), rank, world)]
    part = part_path(out, rank, world)
    bank = open_or_create_bank(part, model, tokenizer, embedder, codec)

    try:
        if bank.codec.needs_training() and not bank.rows:
            # rank 0's first batch trains the codec on every rank: identical state in every part
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            first = None
            if rank == 0:
                size = max(APPEND_BATCH, getattr(bank.codec, "min_train_memories", 0))  # vq: 2^14 vectors
                first = encode_texts(model, tokenizer, [r.text for r in records[:size]], batch_size=batch_size,
                                     progress=False).float()
            n = torch.tensor([0 if first is None else len(first)], device=device)
            dist.broadcast(n, src=0)
            sample = first.to(device) if rank == 0 else torch.empty((int(n), *model.config.memory_shape), device=device)
            dist.broadcast(sample, src=0)
            bank.train_codec(sample.cpu())
        stats = encode_into(bank, model, tokenizer, embedder, mine, batch_size=batch_size,
                            progress=progress and rank == 0)
    finally:
        bank.close()
    dist.barrier()
    if rank == 0:
        merge(out, [part_path(out, r, world) for r in range(world)]).close()
    dist.barrier()
    return stats


def main(argv: list[str] | None = None) -> int:
    """`python -m memory3.memory.encode` / torchrun entry (RANK and WORLD_SIZE from torchrun)."""
    from memory3.cli import add_encode_arguments, run_command

    parser = argparse.ArgumentParser(prog="python -m memory3.memory.encode",
                                     description="Encode a jsonl knowledge base into a memory bank; under torchrun "
                                                 "the knowledge base is split across ranks and rank 0 merges.")
    add_encode_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(_main, args)


def _main(args) -> int:
    from memory3.cli import load_embedder, load_model_arg, report_bank

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        from memory3.cli import cmd_encode

        return cmd_encode(args)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        read_knowledge_base(args.kb)  # every rank fails the same way on a bad file, before loading anything
        model, tokenizer = load_model_arg(args.model, device=f"cuda:{local}" if cuda else "cpu", quiet=rank != 0)
        embedder = load_embedder(args.embedder, device=f"cuda:{local}" if cuda else "cpu")
        t0 = time.perf_counter()
        stats = encode_distributed(args.kb, args.out, model, tokenizer, embedder, codec=args.codec,
                                   batch_size=args.batch_size, progress=not args.quiet)
        if rank == 0:
            from memory3.retrieval import Retriever

            with Bank.open(args.out, device="cpu") as bank:
                Retriever(bank, embedder, kind=args.index)  # builds and saves the index under BANK/index
            print(f"rank 0 of {world}: {stats}; all ranks, merge and index: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
            report_bank(args.out, model)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
