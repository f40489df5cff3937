"""One small call of every CUDA kernel path of memory3 (decode: 16-byte and element paths,
split-K + merge, int8 bank, T > 16, float64, int64 ids narrowed; gather from a GPU and a
pinned host bank; quantize and dequantize int8/int4/pq; the vq decoder; a bad id recorded),
each checked against memory3.reference, for bench/gpu.sh to run under compute-sanitizer
(memcheck, racecheck). Small on purpose: the sanitizer slows kernels 10-100x.

    compute-sanitizer --tool memcheck python bench/gpu_sanitize_cases.py
"""
from __future__ import annotations

import os

import torch

from memory3 import ops, vq
from memory3.reference import dequantize_memory_ref, gather_memory_ref, memory_attention_ref, quantize_memory_ref
from memory3.testing import AttentionCase

from bench_gpu_prefill import sanitize_case as prefill_cases


def close(a, b, tol):
    err = (a.double().cpu() - b.double().cpu()).abs().nan_to_num(posinf=1e9, neginf=1e9).max().item()
    assert err <= tol, err


def attention(**kw):
    args = AttentionCase(**kw).make("cuda")
    out, lse = ops.memory_attention(**args)
    ref, _ = memory_attention_ref(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()},
                                  compute_dtype=torch.float64)
    close(out, ref, 2e-2 if out.dtype in (torch.bfloat16, torch.float16) else 1e-4)


def main() -> None:
    torch.manual_seed(0)
    # memory_attention
    attention(B=2, T=1, S=70, Hq=10, Hkv=2, D=80, dtype=torch.bfloat16, kv_lens=[70, 33])  # 16-byte path
    attention(B=1, T=1, S=700, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16, int8_bank=True)  # split + merge, int8
    attention(B=2, T=3, S=50, Hq=5, Hkv=1, D=7, dtype=torch.float32)  # element path
    attention(B=1, T=20, S=40, Hq=4, Hkv=2, D=128, dtype=torch.float16, chunk_size=7)  # T > 16
    attention(B=1, T=2, S=30, Hq=4, Hkv=2, D=16, dtype=torch.float64)  # float64
    args = AttentionCase(B=1, T=1, S=40, Hq=4, Hkv=2, D=64).make("cuda")
    args["mem_ids"] = args["mem_ids"].long()  # narrowed on the device
    ops.memory_attention(**args)
    # gather_memory
    shape = (30, 2, 8, 80)
    bank = [torch.randn(shape).to(torch.bfloat16) for _ in range(2)]
    ids = torch.tensor([3, -1, 29, 0], device="cuda")
    for move in (lambda t: t.cuda(), lambda t: t.pin_memory()):
        got = ops.gather_memory(*(move(t) for t in bank), ids)
        want = gather_memory_ref(*bank, ids.cpu())
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    q8 = [torch.randint(-127, 128, shape, dtype=torch.int8) for _ in range(2)]
    sc = [torch.rand(shape[:3]) for _ in range(2)]
    got = ops.gather_memory(*(t.cuda() for t in q8), ids, torch.float32, *(s.cuda() for s in sc))
    want = gather_memory_ref(*q8, ids.cpu(), torch.float32, *sc)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    # codecs
    x = torch.randn(12, 2, 4, 80)
    cb = torch.randn(2, 10, 256, 8)
    for codec in ("int8", "int4", "pq"):
        codes, meta = ops.quantize_memory(x.cuda(), codec, codebook=cb.cuda() if codec == "pq" else None)
        ref_codes, ref_meta = quantize_memory_ref(x, codec, cb if codec == "pq" else None)
        for odd in (False, True):
            c, m, r = ref_codes, ref_meta, ids.cpu().clamp(max=11)
            cc = c.cuda()
            if odd:  # the per-element path: codes one byte off a 16-byte boundary
                buf = torch.empty(c.numel() + 1, dtype=c.dtype, device="cuda")
                buf[1:].copy_(cc.flatten())
                cc = buf[1:].view(c.shape)
            got = ops.dequantize_memory(cc, m.cuda(), codec, r.cuda(), torch.bfloat16)
            assert torch.equal(got.cpu(), dequantize_memory_ref(c, m, codec, r, torch.bfloat16))
        assert codes.shape == ref_codes.shape
    spec = vq.VQSpec(80)
    meta = torch.randn(1 + 80 + 2**spec.coarse_bits + 2**spec.pq_bits, 80)
    meta[0] = 0
    meta[0, :4] = torch.tensor([1.0, spec.coarse_bits, spec.pq_m, spec.pq_bits])
    codes = torch.randint(0, 256, (5, 2, 3, spec.code_size), dtype=torch.uint8)
    got = ops.dequantize_memory(codes.cuda(), meta.cuda(), "vq", None, torch.float32)
    close(got, dequantize_memory_ref(codes, meta, "vq", None, torch.float32), 1e-3)
    # a bad id: recorded on the device, raised after the sync
    os.environ.pop("MEMORY3_RANGE_CHECK", None)
    try:
        ops.gather_memory(bank[0].cuda(), bank[1].cuda(), torch.tensor([30], device="cuda"))
        raise AssertionError("a bad id was not reported")
    except RuntimeError as e:
        assert "ids holds 30" in str(e), e
    torch.cuda.synchronize()
    # Last: the prefill forward and both backwards (bench_gpu_prefill.py), so a failure there
    # (e.g. a build without CUTLASS) leaves the cases above checked.
    prefill_cases()
    print("sanitize cases: all ran and matched the reference")


if __name__ == "__main__":
    main()
