"""Encoding throughput: knowledge-base references -> memory bank, references per second, and
where the time goes (the model's memory layers, the retrieval embedder, the bank write).

    python bench/bench_encode.py                       # small preset, 128 references, int8, CPU
    python bench/bench_encode.py --preset tiny --refs 512 --codec pq --batch-size 64

Runs the pipeline `memory3 encode` runs (memory3.memory.encode.encode_into) on references of
the synthetic knowledge base, into a fresh bank in a temporary directory. The ratio printed
against "what a user would run instead": the model-side cost of encoding a reference once
into explicit memory, against one full forward pass of the model over the same reference
text, which is what RAG pays each time a retrieved reference is read in a context.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from memory3.memory.codecs import codec_names
from memory3.memory.encode import EncodeStats, KBRecord, encode_into, open_or_create_bank
from memory3.model import load_model
from memory3.retrieval import DEFAULT_EMBEDDER, Embedder
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase


def references(n: int) -> list[KBRecord]:
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=n, n_heldout=0, n_names=max(1500, n)))
    return [KBRecord(r["id"], r["text"], r["source"]) for r in kb.references()]


@torch.inference_mode()
def full_forward_time(model, tokenizer, records: list[KBRecord], batch_size: int) -> float:
    """Seconds for plain full-model forwards over every reference (as context text, padded
    like the encoder's batches): the per-read cost of a reference under RAG."""
    c = model.config
    ids = [tokenizer.reference_ids(r.text, c.ref_len) for r in records]
    batches = []
    for start in range(0, len(ids), batch_size):
        part = ids[start : start + batch_size]
        tokens = torch.full((len(part), max(map(len, part))), c.pad_id, dtype=torch.long)
        for row, seq in enumerate(part):
            tokens[row, : len(seq)] = torch.tensor(seq)
        batches.append(tokens)
    model(batches[0], plain=True)  # warm-up
    t0 = time.perf_counter()
    for t in batches:
        model(t, plain=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (untrained; default small)")
    parser.add_argument("--refs", type=int, default=128, help="references to encode (default 128)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--codec", default="int8", choices=codec_names())
    parser.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.preset)
    embedder = Embedder(args.embedder, device="cpu")
    records = references(args.refs)
    embedder.embed([r.text for r in records[:8]])  # warm-up: first-call allocations
    with tempfile.TemporaryDirectory() as tmp:
        bank = open_or_create_bank(Path(tmp) / "bank", model, tokenizer, embedder, args.codec)
        t0 = time.perf_counter()
        stats: EncodeStats = encode_into(bank, model, tokenizer, embedder, records, batch_size=args.batch_size,
                                         progress=False)
        wall = time.perf_counter() - t0
        bytes_written, memory_bytes = bank.nbytes(), bank.bytes_per_memory()
        bank.close()
    forward_s = full_forward_time(model, tokenizer, records, args.batch_size)

    n, t = stats.references, stats.total_s
    tokens = sum(len(tokenizer.reference_ids(r.text, model.config.ref_len)) for r in records)
    print(f"encode: preset {args.preset}, {n} references ({tokens / n:.0f} tokens each), codec {args.codec}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads")
    print(f"{'part':<28} {'seconds':>8} {'share':>6} {'refs/s':>9}")
    for name, s in (("model (memory layers+top-8)", stats.model_s), ("embedder", stats.embed_s),
                    ("bank write (codec+fsync)", stats.bank_s)):
        print(f"{name:<28} {s:>8.2f} {100 * s / t:>5.0f}% {n / s:>9.1f}")
    print(f"{'total':<28} {wall:>8.2f} {'':>6} {n / wall:>9.1f}")
    print(f"bank: {memory_bytes} bytes per memory + {bytes_written / n - memory_bytes:.0f} of embedding per reference; "
          f"bank write {bytes_written / stats.bank_s / 2**20:.1f} MiB/s (codec, files, fsync, SQLite)")
    print(f"vs a full forward over the references (RAG's cost per read): {n / forward_s:.1f} refs/s; "
          f"encoding once costs {stats.model_s / forward_s:.2f}x one read")


if __name__ == "__main__":
    main()
