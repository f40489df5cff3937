"""The CUDA prefill kernels (forward, and the tensor-core backward) run on the CPU by a host
emulator of their own code (csrc/cuda/nvcc_check/prefill_emulator.cpp: threads as fibers,
ldmatrix and mma.sync by the PTX fragment layouts, shared memory poisoned), held to
memory3.reference in float64 with the tolerances of tests/test_cuda_prefill.py. This tests
the kernels' indexing, masks, tile schedule and fragment plumbing on any machine with a C++
compiler; timing and inter-warp races need the GPU (tests/test_cuda_prefill.py, bench/gpu.sh)."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase, low_precision_errors

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc/cuda/nvcc_check/prefill_emulator.cpp"
REL_L2 = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRAD_REL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    """The emulator built from this tree, or MEMORY3_PREFILL_EMULATOR (a prebuilt one: e.g.
    built from deliberately broken headers, to see these tests fail)."""
    if os.environ.get("MEMORY3_PREFILL_EMULATOR"):
        return Path(os.environ["MEMORY3_PREFILL_EMULATOR"])
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("emulator") / "prefill_emulator"
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
                    f"-I{ROOT / 'csrc/include'}", str(SOURCE), "-o", str(exe)], check=True)
    return exe


def raw16(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()


def run_emulator(exe: Path, tmp: Path, args: dict, dout: torch.Tensor, dlse: torch.Tensor, mem_grad: bool,
                 exact_p: bool = True, simt: bool = False) -> dict:
    q, k, v, mk, mv, ids = (args[n] for n in ("q", "k", "v", "mem_k", "mem_v", "mem_ids"))
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    N, M = mk.shape[0], mk.shape[2]
    C, R = ids.shape[1], ids.shape[2]
    lens = args.get("kv_lens")
    int8 = mk.dtype == torch.int8
    header = (f"{B} {T} {S} {Hq} {Hkv} {D} {N} {M} {C} {R} {args['chunk_size']} {args['chunk_start']} "
              f"{int(lens is not None)} {int(int8)} {int(q.dtype == torch.float16)} {int(mem_grad)} {int(exact_p)} "
              f"{int(simt)} {D ** -0.5!r}\n")
    blob = [header.encode(), raw16(q), raw16(k), raw16(v)]
    if int8:
        blob += [mk.numpy().tobytes(), mv.numpy().tobytes(), args["mem_k_scale"].float().numpy().tobytes(),
                 args["mem_v_scale"].float().numpy().tobytes()]
    else:
        blob += [raw16(mk), raw16(mv)]
    blob.append(ids.to(torch.int32).numpy().tobytes())
    if lens is not None:
        blob.append(lens.to(torch.int32).numpy().tobytes())
    blob += [raw16(dout), dlse.float().numpy().tobytes()]
    (tmp / "in.bin").write_bytes(b"".join(blob))
    run = subprocess.run([str(exe), str(tmp / "in.bin"), str(tmp / "out.bin")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    data = (tmp / "out.bin").read_bytes()
    pos = 0

    def take(shape, dtype):
        nonlocal pos
        n = int(np.prod(shape)) * (2 if dtype in (torch.bfloat16, torch.float16) else 4)
        chunk = data[pos : pos + n]
        pos += n
        if dtype in (torch.bfloat16, torch.float16):
            return torch.frombuffer(bytearray(chunk), dtype=torch.int16).view(dtype).reshape(shape)
        return torch.frombuffer(bytearray(chunk), dtype=torch.float32).reshape(shape)

    out = {"out": take((B, T, Hq, D), q.dtype), "lse": take((B, Hq, T), torch.float32),
           "q": take((B, T, Hq, D), q.dtype), "k": take((B, S, Hkv, D), q.dtype), "v": take((B, S, Hkv, D), q.dtype)}
    if mem_grad:
        out["mem_k"] = take(mk.shape, torch.float32)
        out["mem_v"] = take(mv.shape, torch.float32)
    assert pos == len(data), "output file size"
    return out


@dataclasses.dataclass
class FreshCase(AttentionCase):
    salt: int = dataclasses.field(default_factory=lambda: random.SystemRandom().randrange(2**31))


CASES = {
    # GQA 5, D=80, chunks of 16 (tiles over several chunks), chunk_start 3, ragged, bank grads
    "paper_heads_ragged": FreshCase(B=2, T=30, S=50, Hq=10, Hkv=2, D=80, N=6, chunk_size=16, chunk_start=3,
                                    kv_lens=[50, 40], dtype=torch.bfloat16),
    # int8 bank in fp16, padded queries (kv_lens < T), 64-token chunks
    "int8_padded_fp16": FreshCase(B=2, T=40, S=60, Hq=4, Hkv=2, D=64, N=9, chunk_size=64, chunk_start=0,
                                  kv_lens=[60, 25], dtype=torch.float16, int8_bank=True),
    # R * M = 72 > 64: two memory blocks per chunk; D=128; odd chunk size
    "two_memory_blocks": FreshCase(B=1, T=30, S=40, Hq=2, Hkv=1, D=128, N=5, R=9, M=8, chunk_size=7, chunk_start=1,
                                   dtype=torch.bfloat16),
    # no GQA: 64 queries per tile, two 64-token chunks in one tile; D=32; S > 64 keys per row
    "no_gqa_d32": FreshCase(B=1, T=100, S=140, Hq=2, Hkv=2, D=32, N=7, chunk_size=64, chunk_start=5,
                            dtype=torch.bfloat16),
    # D=96, fp16, GQA 3
    "d96_fp16": FreshCase(B=1, T=33, S=50, Hq=6, Hkv=2, D=96, N=4, chunk_size=16, chunk_start=0, dtype=torch.float16),
    # a chunk per query: a tile of 8 queries x 8 heads visits 8 chunks' memories; 6 keys each
    "chunk_per_query": FreshCase(B=1, T=20, S=24, Hq=8, Hkv=1, D=64, N=5, R=2, M=3, chunk_size=1, chunk_start=0,
                                 dtype=torch.bfloat16),
    # small cases for the CUDA-core backward (one warp per row: slow to emulate)
    "simt_ragged": FreshCase(B=2, T=20, S=36, Hq=4, Hkv=2, D=32, N=4, chunk_size=8, chunk_start=3,
                             kv_lens=[36, 15], dtype=torch.bfloat16),
    "simt_int8_fp16": FreshCase(B=1, T=20, S=30, Hq=4, Hkv=1, D=32, N=5, chunk_size=16, chunk_start=0,
                                dtype=torch.float16, int8_bank=True),
}


# Every tensor-core case in both P modes: rounded (the default, FlashAttention's one-term P)
# and exact (MEMORY3_PREFILL_P=exact, two terms).
RUNS = [(name, True, False) for name in CASES if name.startswith("simt")] + [
    (name, False, exact_p) for name in CASES if not name.startswith("simt") for exact_p in (False, True)]


@pytest.mark.parametrize("name,simt,exact_p", RUNS, ids=[
    f"{n}-{'cuda_cores' if s else 'tensor_cores'}-{'exact' if e else 'rounded'}_p" for n, s, e in RUNS])
def test_emulated_kernels_match_reference(name, simt, exact_p, emulator, tmp_path):
    """Forward, then the backward: the tensor-core passes, or (simt) the CUDA-core backward that
    serves float32/float64 and the other head dims. The forward with rounded P is held to
    FlashAttention's 2x rule against the same computation in bf16/fp16; with exact P, also to
    the float32-accumulation cap."""
    case = dataclasses.replace(CASES[name])  # a fresh salt per run
    case = dataclasses.replace(case, salt=random.SystemRandom().randrange(2**31))
    args = case.make("cpu")
    g = torch.Generator().manual_seed(case.salt)
    dout = torch.randn(case.B, case.T, case.Hq, case.D, generator=g).to(case.dtype)
    dlse = torch.randn(case.B, case.Hq, case.T, generator=g)
    mem_grad = not case.int8_bank
    got = run_emulator(emulator, tmp_path, args, dout, dlse, mem_grad, exact_p, simt)

    # Forward: FlashAttention's rule (max error vs float64 at most 2x that of the reference
    # computed in bf16/fp16: gather, concatenate, masked softmax in that dtype), and with exact
    # P the float32-accumulation cap.
    names = ("q", "k", "v") + (("mem_k", "mem_v") if mem_grad else ())
    leaves = [args[n].double().requires_grad_() for n in names]
    wide = dict(args, **dict(zip(names, leaves)))
    if case.int8_bank:
        wide.update(q=wide["q"], k=wide["k"], v=wide["v"])
    ref_out, ref_lse = memory_attention_ref(**wide)
    low_out, _ = memory_attention_ref(**args, compute_dtype=case.dtype)
    out = got["out"].double()
    assert not torch.isnan(out).any(), f"{case}: unwritten or NaN outputs"
    err, low_err, worst = low_precision_errors(got["out"], ref_out, low_out)
    print(f"\n{name} {'exact' if exact_p else 'rounded'} P: max error {err:.3g}, {err / max(low_err, 1e-30):.2f}x the "
          f"{case.dtype} composition's {low_err:.3g}; {worst:.3g}x the float32-accumulation cap")
    assert err <= 2 * low_err + 1e-5, f"{case}: max error {err:.3g} > 2 x {low_err:.3g}"
    if exact_p:
        assert worst <= 1, f"{case}: error {worst:.3g} x the float32-accumulation cap"
    rel = ((out - ref_out.detach()).norm() / ref_out.detach().norm()).item()
    assert rel < REL_L2[case.dtype], f"{case}: relative error {rel:.3g}"
    assert torch.equal(torch.isneginf(got["lse"]), torch.isneginf(ref_lse.detach())), f"{case}: lse -inf rows"
    seen = torch.isfinite(ref_lse.detach())
    torch.testing.assert_close(got["lse"][seen], ref_lse.detach()[seen].float(), atol=1e-4, rtol=1e-4)

    # Backward: the gradients of sum(out * dout) + sum(lse * dlse) against autograd.
    ref_loss = (ref_out * dout.double()).sum() + (ref_lse.double()[seen] * dlse.double()[seen]).sum()
    for name, want in zip(names, torch.autograd.grad(ref_loss, leaves)):
        have = got[name].double()
        assert not torch.isnan(have).any(), f"{case}: d{name} has NaN (unwritten)"
        rel = ((have - want).norm() / want.norm()).item()
        assert rel < GRAD_REL[case.dtype], f"{case}: d{name} relative error {rel:.3g}"
