"""gather_memory and dequantize_memory on the GPU against the hardware rates of the same run:
gather from a GPU bank (bf16, and int8 dequantized to bf16) against the device-to-device
copy rate, gather from a pinned host bank against the pinned host-to-device rate, and each
codec's gather+decode (int8, int4, pq, vq) in output bytes against the copy rate; vq also
against FAISS's CPU sa_decode when faiss is importable. Paper shape: a memory is Hkv=8 x M=8
x D=80, rows drawn from a bank of 200k memories. Every result is checked against
memory3.reference before it is timed.

    python bench/bench_gpu_memory.py [--json OUT.jsonl]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import verify
from gpu_timing import copy_rate, cuda_time_ms, device_name, graph_time_ms, host_to_device_rate

from memory3 import ops, vq
from memory3.pq import train_pq_codebook
from memory3.reference import dequantize_memory_ref, gather_memory_ref

HKV, M, D, BANK, ROWS = 8, 8, 80, 200_000, 8192
HOST_BANK = 20_000  # pinned host banks stay small: pinning 200k memories takes seconds


def gather_rows(rate: float, h2d: float) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for where, n in (("gpu", BANK), ("pinned host", HOST_BANK)):
        for kind in ("bf16", "int8"):
            shape = (n, HKV, M, D)
            if kind == "int8":
                bank = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for _ in range(2)]
                scales = [torch.rand(shape[:3], generator=g) / 64 for _ in range(2)]
            else:
                bank = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2)]
                scales = [None, None]
            move = (lambda t: t.cuda()) if where == "gpu" else (lambda t: t.pin_memory())
            bank = [move(t) for t in bank]
            scales = [None if s is None else move(s) for s in scales]
            ids = torch.randint(0, n, (ROWS,), device="cuda")
            got = ops.gather_memory(*bank, ids, torch.bfloat16, *scales)
            want = gather_memory_ref(bank[0].cuda() if where != "gpu" else bank[0],
                                     bank[1].cuda() if where != "gpu" else bank[1], ids, torch.bfloat16,
                                     *[None if s is None else s.cuda() for s in scales])
            verify.exact(f"gather {kind} from {where}", got, want)
            ms = graph_time_ms(lambda: ops.gather_memory(*bank, ids, torch.bfloat16, *scales))
            read = 2 * ROWS * HKV * M * D * bank[0].element_size() + (2 * ROWS * HKV * M * 4 if kind == "int8" else 0)
            written = 2 * ROWS * HKV * M * D * 2
            if where == "gpu":
                r = dict(name=f"gather {kind} bank on GPU", ms=ms, rate=(read + written) / (ms * 1e-3),
                         versus="copy rate", ceiling=rate, target=0.85)
            else:
                r = dict(name=f"gather {kind} bank in pinned host memory", ms=ms, rate=read / (ms * 1e-3),
                         versus="pinned host-to-device rate", ceiling=h2d, target=0.80)
            r["fraction"] = r["rate"] / r["ceiling"]
            rows.append(r)
            del bank, scales
            torch.cuda.empty_cache()
    return rows


def codec_rows(rate: float) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    n = 20_000  # memories encoded (the rows are drawn from them)
    x = torch.randn(n, HKV, M, D, generator=g)
    ids = torch.randint(0, n, (ROWS,), device="cuda")
    for codec in ("int8", "int4", "pq", "vq"):
        note = ""
        if codec == "vq":
            codes, meta, note = vq_codes(x, n, g)
        elif codec == "pq":  # k-means on a sample (CPU), codes on the GPU
            cb = train_pq_codebook(x[:1000], sub_dim=8, iters=5, seed=0)
            codes, meta = ops.quantize_memory(x.cuda(), "pq", codebook=cb.cuda())
        else:
            codes, meta = ops.quantize_memory(x.cuda(), codec)
        codes, meta = codes.cuda(), meta.cuda()
        got = ops.dequantize_memory(codes, meta, codec, ids, torch.bfloat16)
        want = dequantize_memory_ref(codes, meta, codec, ids, torch.bfloat16)
        if codec == "vq":
            err = (got.float() - want.float()).abs().max().item()
            if not err <= 1e-2 * (1 + want.float().abs().max().item()):
                raise verify.WrongResult(f"dequantize vq: the kernel disagrees with the reference ({err:.3g})")
        else:
            verify.exact(f"dequantize {codec}", [got], [want])
        call = lambda: ops.dequantize_memory(codes, meta, codec, ids, torch.bfloat16)  # noqa: E731
        # CUDA-graph replay (no Python overhead in the time), except vq: its Python face reads
        # the quantizer's header on the host, which a capture forbids.
        ms = cuda_time_ms(call) if codec == "vq" else graph_time_ms(call)
        out_bytes = got.numel() * got.element_size()
        r = dict(name=f"dequantize {codec} (gather+decode to bf16){note}", ms=ms, rate=out_bytes / (ms * 1e-3),
                 versus="copy rate (output bytes)", ceiling=rate, target=0.70)
        r["fraction"] = r["rate"] / r["ceiling"]
        if codec == "vq":
            r.update(vq_versus_faiss(codes.cpu(), meta.cpu(), ms))
        rows.append(r)
    return rows


def vq_codes(x: torch.Tensor, n: int, g: torch.Generator):
    """vq codes of n memories: FAISS-trained on a sample when faiss is importable, else a
    random quantizer and random codes (the decoder's work does not depend on the values)."""
    try:
        codes, meta = ops.quantize_memory(x[:2500], "vq")  # FAISS trains and encodes (CPU)
        return codes[torch.randint(0, codes.shape[0], (n,), generator=g)], meta, ""
    except (ImportError, RuntimeError, ValueError) as e:
        spec = vq.VQSpec(D)
        meta = torch.randn(1 + D + 2**spec.coarse_bits + 2**spec.pq_bits, D, generator=g)
        meta[0] = 0
        meta[0, :4] = torch.tensor([1.0, spec.coarse_bits, spec.pq_m, spec.pq_bits])
        codes = torch.randint(0, 256, (n, HKV, M, spec.code_size), dtype=torch.uint8, generator=g)
        return codes, meta, f" [random quantizer: {type(e).__name__}]"


def vq_versus_faiss(codes: torch.Tensor, meta: torch.Tensor, gpu_ms: float) -> dict:
    """FAISS's CPU sa_decode on the same codes (vectors/s), when faiss is importable."""
    try:
        from memory3.vq import faiss_from_meta
    except ImportError:
        return {"faiss": "memory3.vq has no faiss_from_meta"}
    try:
        index = faiss_from_meta(meta)
    except Exception as e:  # noqa: BLE001 - FAISS missing
        return {"faiss": f"not available: {e}"}
    sample = codes.reshape(-1, codes.shape[-1])[:200_000].numpy()
    t0 = time.perf_counter()
    index.sa_decode(sample)
    faiss_rate = len(sample) / (time.perf_counter() - t0)
    gpu_rate = ROWS * HKV * M / (gpu_ms * 1e-3)
    return {"faiss_vectors_per_s": faiss_rate, "gpu_vectors_per_s": gpu_rate, "x_faiss": gpu_rate / faiss_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="append one JSON line per row to this file")
    a = parser.parse_args()
    torch.manual_seed(0)
    rate, h2d = copy_rate(), host_to_device_rate()
    print(f"# {device_name()}: copy rate {rate / 1e12:.2f} TB/s (read + write), pinned host-to-device "
          f"{h2d / 1e9:.1f} GB/s")
    rows = gather_rows(rate, h2d) + codec_rows(rate)
    print("| case | ms | GB/s | versus | fraction | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        r["target_met"] = r["fraction"] >= r["target"]
        extra = f"; {r['x_faiss']:.0f}x FAISS sa_decode" if "x_faiss" in r else ""
        print(f"| {r['name']} | {r['ms']:.4f} | {r['rate'] / 1e9:.0f} | {r['versus']} | {r['fraction']:.2f}{extra} | "
              f">= {r['target']:.2f} | {'yes' if r['target_met'] else 'NO'} |")
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, bench="memory", device=device_name(), copy_rate=rate, h2d_rate=h2d)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
