"""The memory bank's read path: memories/s gathered from each loading mode, against the disk
read rate and the host copy rate measured in the same run, and bytes per memory per codec.

    python bench/bench_bank.py                       # paper shape, 512-memory bank, bf16 + int8
    python bench/bench_bank.py --memories 2048 --codecs bf16,int8,int4,pq --shape paper
    pytest bench/bench_bank.py --benchmark-enable    # pytest-benchmark of one gather

Workload: batches of 160 row ids (32 sequences x 5 memories, one chunk each), either drawn
uniformly (a cold working set: the cache cannot help) or with 60% of each batch repeated from
the previous one (adjacent chunks retrieving the same references, PAPER §3.3). A batch is
gathered (Bank.gather_layers) into dense bf16 [160, Hkv, M, D] keys and values per layer on
the mode's device. Modes: mmap cold
(pages evicted with posix_fadvise before the pass: the disk is read), mmap warm (page
cache), gpu (all arrays on the device; host RAM without CUDA) and pinned (host arrays, LRU
cache on the device). Stored GB/s = memories/s x stored bytes per memory, compared with the
disk's sequential read rate; output GB/s = memories/s x dense bf16 bytes per memory, compared
with the host memcpy rate (bytes copied per second): a gather of raw bf16 rows is a copy.
"Cold" evicts the bank's pages before the pass; repeated ids within the pass hit the page cache.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memory3.memory.bank import Bank
from memory3.memory.codecs import codec_names, make_codec
from memory3.memory.manifest import MemoryShape

PRESETS = {"paper": MemoryShape(22, 8, 8, 80), "small": MemoryShape(4, 2, 8, 64)}
IDS_PER_BATCH = 160
REUSE = 0.6  # fraction of a batch repeated from the previous batch in the "reuse" workload


@dataclass
class Result:
    codec: str
    mode: str
    workload: str
    memories_per_s: float
    stored_gbps: float  # bytes read from the bank's arrays
    output_gbps: float  # bytes of dense bf16 memories produced
    hit_rate: float | None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(path: Path, codec: str, shape: MemoryShape, n: int, seed: int = 0) -> Path:
    """A bank of n random memories (keys/values ~ N(0, 1)), written 128 at a time."""
    g = torch.Generator().manual_seed(seed)
    # a learned codec trains briefly: the read rate does not depend on its codebooks' quality
    config = {"iters": 4} if codec == "pq" else None
    with Bank.create(path, shape=shape, fingerprint="bench", codec=codec, codec_config=config) as bank:
        if make_codec(codec, shape, config).needs_training():
            bank.train_codec(torch.randn(min(n, 64), *shape.memory, generator=g))
        for start in range(0, n, 128):
            k = min(128, n - start)
            bank.append([str(start + i) for i in range(k)], [str(start + i) for i in range(k)],
                        torch.randn(k, *shape.memory, generator=g).bfloat16())
    return path


def shard_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.bin"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next read comes from the disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_gbps(files: list[Path]) -> float:
    """Sequential read rate of the bank's files from the disk (evicted first)."""
    evict(files)
    buf = bytearray(1 << 24)
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while (got := f.readinto(buf)) > 0:
                total += got
    return total / (time.perf_counter() - t0) / 1e9


def copy_gbps(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Host memcpy rate, bytes copied per second (each byte is read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def workloads(n: int, batches: int, seed: int = 1) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    uniform = [torch.randint(0, n, (IDS_PER_BATCH,), generator=g) for _ in range(batches)]
    reuse, prev = [], torch.randint(0, n, (IDS_PER_BATCH,), generator=g)
    keep = int(REUSE * IDS_PER_BATCH)
    for _ in range(batches):
        prev = torch.cat([prev[torch.randperm(IDS_PER_BATCH, generator=g)[:keep]],
                          torch.randint(0, n, (IDS_PER_BATCH - keep,), generator=g)])
        reuse.append(prev)
    return {"uniform": uniform, "reuse": reuse}


def run_pass(bank: Bank, batches: list[torch.Tensor]) -> float:
    """memories/s over one pass of the batches (gather_layers: the per-layer fast path)."""
    sync(bank.device)
    t0 = time.perf_counter()
    for ids in batches:
        bank.gather_layers(ids)
    sync(bank.device)
    return len(batches) * IDS_PER_BATCH / (time.perf_counter() - t0)


@torch.inference_mode()
def measure(path: Path, codec: str, batches: int, cache_size: int) -> list[Result]:
    files = shard_files(path)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    with Bank.open(path, mode="mmap", device=device, cache_size=0) as probe:
        n, per_memory = probe.rows, probe.bytes_per_memory()
        dense = 2 * probe.shape.layers * 2 * probe.shape.kv_heads * probe.shape.tokens * probe.shape.head_dim
    work = workloads(n, batches)
    cases = [("mmap cold", "mmap", 0, True), ("mmap warm", "mmap", 0, False),
             ("gpu" if cuda else "all in RAM (gpu mode, cpu)", "gpu", 0, False),
             ("pinned + cache" if cuda else "host + cache (pinned mode, cpu)", "pinned", cache_size, False)]
    out = []
    for label, mode, cache, cold in cases:
        with Bank.open(path, mode=mode, device=device, cache_size=cache, verify=False) as bank:
            bank.gather_layers(torch.tensor([0]))  # loads the arrays (gpu/pinned) before the clock
            for workload, ids in work.items():
                if cold:
                    evict(files)
                    rate = run_pass(bank, ids)
                else:
                    run_pass(bank, ids)  # warm-up pass: page cache, allocator
                    bank.cache_clear()  # then a pass from an empty cache: hits come from reuse within it
                    rate = run_pass(bank, ids)
                hit = bank.cache_stats().hit_rate if cache else None
                out.append(Result(codec, label, workload, rate, rate * per_memory / 1e9, rate * dense / 1e9, hit))
    return out


def bytes_table(shape: MemoryShape) -> list[tuple[str, int, float]]:
    """(codec, stored bytes per memory, compression vs bf16) for every registered codec."""
    bf16 = 2 * shape.layers * 2 * shape.kv_heads * shape.tokens * shape.head_dim
    rows = []
    for name in codec_names():
        try:
            codec = make_codec(name, shape)
        except ValueError:  # a codec that does not fit this shape
            continue
        nbytes = shape.layers * sum(spec.row_bytes for spec in codec.arrays().values())
        rows.append((name, nbytes, bf16 / nbytes))
    return rows


# ---------------------------------------------------------------------------- pytest-benchmark


def test_bank_gather(benchmark, tmp_path):
    shape = PRESETS["small"]
    build(tmp_path / "bank", "int8", shape, 256)
    ids = workloads(256, 1)["uniform"][0]
    with Bank.open(tmp_path / "bank", mode="mmap", device="cpu", cache_size=0) as bank:
        benchmark.group = "bank gather_layers 160 memories"
        out = benchmark(bank.gather_layers, ids)
    assert len(out) == shape.layers and out[0][0].shape == (IDS_PER_BATCH, *shape.layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--memories", type=int, default=512, help="memories in each bank")
    parser.add_argument("--codecs", default="bf16,int8", help="comma-separated codecs to read")
    parser.add_argument("--batches", type=int, default=4, help=f"batches of {IDS_PER_BATCH} ids per pass")
    parser.add_argument("--cache", type=int, default=1024, help="cache size (memories) of the pinned mode")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dir", default=None, help="where to write the banks (default: a temporary directory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = PRESETS[args.shape]
    print(f"# bank read path — shape {args.shape} {shape.memory}, {args.memories} memories, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}\n")
    print("| codec | bytes per memory | vs bf16 |\n|---|---:|---:|")
    for name, nbytes, ratio in bytes_table(shape):
        print(f"| {name} | {nbytes:,} | {ratio:.2f}x |")
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_bank_"))
    try:
        copy = copy_gbps()
        print(f"\nhost copy rate {copy:.2f} GB/s (bytes copied per second)")
        print("\n| codec | mode | workload | memories/s | stored GB/s | vs disk read | output GB/s | vs copy | cache hit rate |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for codec in args.codecs.split(","):
            t0 = time.perf_counter()
            path = build(root / codec, codec, shape, args.memories)
            disk = disk_read_gbps(shard_files(path))
            print(f"| {codec} | (disk read rate {disk:.2f} GB/s; bank built in {time.perf_counter() - t0:.1f} s) | | | | | | | |")
            for r in measure(path, codec, args.batches, args.cache):
                hit = "" if r.hit_rate is None else f"{100 * r.hit_rate:.0f}%"
                print(f"| {codec} | {r.mode} | {r.workload} | {r.memories_per_s:,.0f} | {r.stored_gbps:.2f} | "
                      f"{r.stored_gbps / disk:.2f}x | {r.output_gbps:.2f} | {r.output_gbps / copy:.2f}x | {hit} |")
            shutil.rmtree(path)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
