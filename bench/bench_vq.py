"""The paper's vq codec (FAISS OPQ,Residual2x14,PQ8x10) against int8 / int4 / pq, as banks store
them: bytes per memory, relative L2 reconstruction error on held-out memories, decode rate;
and our vq decoder against FAISS's own sa_decode on the same codes, in the same run.

    python bench/bench_vq.py                          # tiny preset's memories, vq 2x14
    python bench/bench_vq.py --preset small --refs 2048
    python bench/bench_vq.py --data gaussian          # Gaussian [Hkv=8, M=8, D=80] memories
    python bench/bench_vq.py --vq-coarse-bits 10      # faster training, 13 bytes per vector

Memories come from memory3.memory.encoder.encode_texts on a model preset with its untrained
(random) weights, over the synthetic knowledge base's biographies: real encoder outputs
(post-RoPE keys, values of the top-8 tokens), but of an untrained model, so their structure
is not a trained model's. --data gaussian is the other extreme (no structure at all).
Codecs with learned state (pq, vq) train on the first 90% of the memories and are measured on
the last 10%. vq needs 2^coarse_bits vectors per quantizer (one per (layer, keys/values)):
with the tiny preset (2 heads x 8 tokens) that is 1,024 references for 2x14.

The decode-rate rows time ops.dequantize_memory(codes, meta, "vq") against FAISS's
IndexPreTransform.sa_decode on the same codes (FAISS built from the same meta), both with
the same thread count, and print the largest difference between their outputs.
"""
from __future__ import annotations

import argparse
import time

import faiss
import torch
from timing import median_time

from memory3 import ops
from memory3.memory.codecs import make_codec
from memory3.memory.manifest import MemoryShape
from memory3.vq import VQSpec, faiss_from_meta

CODECS = ("int8", "int4", "pq", "vq")


def model_memories(preset: str, n: int) -> tuple[torch.Tensor, str]:
    from memory3.memory.encoder import encode_texts
    from memory3.model import load_model
    from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

    model, tokenizer, _ = load_model(preset)
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=n, n_heldout=0, n_names=max(1500, n)))
    texts = [r["text"] for r in kb.references()][:n]
    with torch.inference_mode():
        mem = encode_texts(model, tokenizer, texts, batch_size=64).float()
    return mem, f"{preset} preset (untrained weights), {len(texts)} synthetic biographies"


def gaussian_memories(n: int, layers: int = 2) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, layers, 2, 8, 8, 80), generator=g), f"Gaussian, {n} memories of [{layers}, 2, 8, 8, 80]"


def codec_row(name: str, config: dict, shape: MemoryShape, train: torch.Tensor, test: torch.Tensor) -> dict:
    codec = make_codec(name, shape, config)
    t0 = time.perf_counter()
    if codec.needs_training():
        codec.train(train)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stored = [codec.encode(l, test[:, l, 0], test[:, l, 1]) for l in range(shape.layers)]
    encode_s = time.perf_counter() - t0
    ids = torch.arange(len(test))

    def decode_all():
        return [codec.decode(l, stored[l], ids, torch.bfloat16) for l in range(shape.layers)]

    got = torch.stack([torch.stack([k, v], 1) for k, v in decode_all()], 1).float()  # [n, L, 2, Hkv, M, D]
    rel = ((got - test).flatten(1).norm(dim=1) / test.flatten(1).norm(dim=1)).mean().item()
    decode_s = median_time(decode_all, repeats=10)
    row_bytes = shape.layers * sum(spec.row_bytes for spec in codec.arrays().values())
    state_bytes = sum(t.numel() * t.element_size() for t in codec.state_dict().values())
    return {"codec": name, "bytes_per_memory": row_bytes, "state_bytes": state_bytes, "rel_l2": rel,
            "train_s": train_s, "encode_memories_per_s": len(test) / encode_s,
            "decode_memories_per_s": len(test) / decode_s, "codec_obj": codec, "stored": stored}


def vq_against_faiss(codec, stored, threads: int) -> dict:
    """Our kernel and FAISS decoding the same codes (layer 0 keys), same thread count."""
    meta = codec.metas["layer0.k"]
    codes = stored[0]["k"]  # [n, Hkv, M, code_size]
    flat = codes.reshape(-1, codes.shape[-1]).numpy()
    index = faiss_from_meta(meta)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    ours = ops.dequantize_memory(codes, meta, "vq", out_dtype=torch.float32).reshape(flat.shape[0], -1)
    theirs = torch.from_numpy(index.sa_decode(flat))
    ours_s = median_time(lambda: ops.dequantize_memory(codes, meta, "vq", out_dtype=torch.float32), repeats=20)
    ours_bf16_s = median_time(lambda: ops.dequantize_memory(codes, meta, "vq", out_dtype=torch.bfloat16), repeats=20)
    faiss_s = median_time(lambda: index.sa_decode(flat), repeats=20)
    n = flat.shape[0]
    return {"threads": threads, "vectors": n, "ours_vectors_per_s": n / ours_s, "ours_bf16_vectors_per_s": n / ours_bf16_s,
            "faiss_vectors_per_s": n / faiss_s, "speedup": faiss_s / ours_s,
            "max_abs_diff": (ours - theirs).abs().max().item(), "max_abs": theirs.abs().max().item()}


def paper_shape_rate(threads: int, n: int = 65536) -> dict:
    """Decode rate at the paper's D = 80 with 2x14 + 8x10 (random codebooks: the decode cost
    does not depend on the values), ours against FAISS on FAISS-valid random codes."""
    spec = VQSpec(80)
    g = torch.Generator().manual_seed(0)
    meta = torch.zeros(spec.meta_rows, 80)
    meta[0, :5] = torch.tensor([1.0, spec.coarse_bits, spec.pq_m, spec.pq_bits, spec.opq_m])
    meta[1:81] = torch.linalg.qr(torch.randn(80, 80, generator=g))[0]
    meta[81:] = torch.randn(spec.meta_rows - 81, 80, generator=g)
    codes = torch.randint(0, 256, (n // 64, 8, 8, 14), dtype=torch.uint8, generator=g)
    codes[..., 3] &= 0x0F  # list numbers below 2^28 (FAISS aborts on others)
    class _Codec:  # the two fields vq_against_faiss reads
        metas = {"layer0.k": meta}
    return vq_against_faiss(_Codec, [{"k": codes}], threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("model", "gaussian"), default="model")
    parser.add_argument("--preset", default="tiny", help="model preset for --data model (default tiny)")
    parser.add_argument("--refs", type=int, default=1152, help="memories (default 1152: 90%% train 1,024+)")
    parser.add_argument("--vq-coarse-bits", type=int, default=14, help="Residual2xB (the paper: 14)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    mem, what = model_memories(args.preset, args.refs) if args.data == "model" else gaussian_memories(args.refs)
    L, _, Hkv, M, D = mem.shape[1:]
    shape = MemoryShape(L, Hkv, M, D)
    split = int(0.9 * len(mem))
    train, test = mem[:split], mem[split:]
    print(f"memories: {what}; shape [L={L}, 2, Hkv={Hkv}, M={M}, D={D}]; train {split}, test {len(test)}; "
          f"{args.threads} threads")
    print(f"bf16 memory: {2 * mem[0].numel()} bytes")
    configs = {"pq": {"iters": 20}, "vq": {"coarse_bits": args.vq_coarse_bits}}
    rows = {}
    for name in CODECS:
        r = rows[name] = codec_row(name, configs.get(name, {}), shape, train, test)
        print(f"{name:5s} {r['bytes_per_memory']:8d} B/memory ({2 * mem[0].numel() / r['bytes_per_memory']:5.1f}x vs bf16)"
              f"  shared state {r['state_bytes'] / 2**20:6.2f} MiB  rel L2 {r['rel_l2']:.4f}"
              f"  train {r['train_s']:7.1f} s  encode {r['encode_memories_per_s']:9.1f} mem/s"
              f"  decode (gather, bf16) {r['decode_memories_per_s']:9.1f} mem/s")
    vq = rows["vq"]
    for t in sorted({1, args.threads}):
        for label, r in (("bank codes", vq_against_faiss(vq["codec_obj"], vq["stored"], t)),
                         ("paper D=80 2x14+8x10", paper_shape_rate(t))):
            print(f"vq decode, {label}, {t} thread(s), {r['vectors']} vectors: ours {r['ours_vectors_per_s'] / 1e6:.2f} M/s "
                  f"(bf16 out {r['ours_bf16_vectors_per_s'] / 1e6:.2f} M/s), FAISS sa_decode {r['faiss_vectors_per_s'] / 1e6:.2f} M/s"
                  f" -> {r['speedup']:.2f}x; max |ours - FAISS| {r['max_abs_diff']:.2e} (max |x| {r['max_abs']:.2f})")


if __name__ == "__main__":
    main()
