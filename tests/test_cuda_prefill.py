"""memory_attention on CUDA for prefill and chunked prefill (T > 16: the tensor-core kernel of
csrc/include/memory3/prefill_attention.cuh for bf16/fp16 at head dims 32, 64, 80, 96, 128)
and its backward (tensor cores: prefill_backward.cuh; every other dtype and head dim: CUDA
cores, memory_attention_backward.cuh), held to
memory3.reference in float64 on fresh random inputs. Skipped without a CUDA device.

Tolerances. By default the kernel rounds P to bf16/fp16 before P V, as FlashAttention does:
its outputs meet FlashAttention's rule (max error against float64 at most twice that of the
reference computed in the low precision itself: gather, concatenate, masked softmax in that
dtype) and the relative error of bf16/fp16 operands. With MEMORY3_PREFILL_P=exact (P fed as
two terms) they also meet the float32-accumulation cap of the CPU tests (within half an ulp
of the exact answer, plus float32's own error). lse is computed from float32 scores: 1e-4.
Every output is poisoned (NaN in the allocator's cached blocks) before each run."""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from memory3 import ops
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase, low_precision_errors, require_kernel

pytestmark = pytest.mark.cuda

LOW = [torch.bfloat16, torch.float16]
REL_L2 = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_kernel("memory_attention", "cuda")
    require_kernel("memory_attention_backward", "cuda")


@dataclasses.dataclass
class FreshCase(AttentionCase):
    """An AttentionCase whose inputs are drawn fresh per run (salt enters the seed); the salt
    is in every failure message, so a failure reproduces."""

    salt: int = dataclasses.field(default_factory=lambda: random.SystemRandom().randrange(2**31))


def poison(*like: tuple[tuple, torch.dtype]) -> None:
    """Fill blocks of the caching allocator of these sizes with NaN and free them: the op's own
    outputs of the same sizes reuse them, so an element the kernel never writes stays NaN."""
    junk = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like]
    del junk


def run(args: dict):
    q = args["q"]
    B, T, Hq, _ = q.shape
    poison((tuple(q.shape), q.dtype), ((B, Hq, T), torch.float32))
    out, lse = ops.memory_attention(**args)
    torch.cuda.synchronize()
    return out, lse


def exact(args: dict):
    """The reference on the same inputs upcast to float64 (on the CPU)."""
    wide = {n: (t.detach().cpu().double() if t.is_floating_point() and n not in ("mem_k_scale", "mem_v_scale")
                else t.detach().cpu()) if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    return memory_attention_ref(**wide)


def assert_flash_rule(out, lse, args, case, exact_p: bool = False):
    ref_out, ref_lse = exact(args)
    low_out, _ = memory_attention_ref(**args, compute_dtype=out.dtype)
    got = out.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{case}: unwritten (NaN) outputs"
    err, low_err, worst = low_precision_errors(out, ref_out, low_out)
    assert err <= 2 * low_err + 1e-5, f"{case}: max error {err:.3g} > 2 x {low_err:.3g} (reference in {out.dtype})"
    if exact_p:  # float32 accumulation, one final rounding: the CPU tests' cap
        assert worst <= 1, f"{case}: error {worst:.3g} x the float32-accumulation cap"
    rel = ((got - ref_out).norm() / ref_out.norm().clamp(min=1e-30)).item()
    assert rel < REL_L2[out.dtype], f"{case}: relative L2 error {rel:.3g}"
    lse = lse.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{case}: queries that see nothing differ"
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen].float(), atol=1e-4, rtol=1e-4, msg=lambda m: f"{case}: {m}")
    padded = ~seen  # queries that see no key: zero output
    assert (got.transpose(1, 2)[padded] == 0).all(), f"{case}: padded queries must give 0"


SHAPES = {  # T, S, kv_lens, chunk grid: every T > 16 (the prefill kernel)
    "prefill": dict(T=150, S=150, chunk_size=64, chunk_start=0),
    "chunked_prefill": dict(T=77, S=300, chunk_size=64, chunk_start=5),
    "ragged": dict(T=90, S=200, kv_lens=[200, 60], chunk_size=64, chunk_start=0),  # 30 padded queries
    "odd_chunks": dict(T=45, S=110, chunk_size=7, chunk_start=3),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", LOW)
def test_prefill_forward(dtype, D, shape):
    case = FreshCase(B=2, Hq=10, Hkv=2, D=D, N=50, M=8, R=5, dtype=dtype, **SHAPES[shape])  # GQA 5
    args = case.make("cuda")
    out, lse = run(args)
    assert_flash_rule(out, lse, args, case)


@pytest.mark.parametrize("Hq,Hkv,D", [(40, 8, 80), (32, 8, 128), (8, 8, 64), (16, 1, 64)])
def test_prefill_forward_model_shapes(Hq, Hkv, D):
    """The paper's shape (GQA 5, D=80), D=128 with GQA 4, no GQA, and GQA 16 (a tile of 4 queries)."""
    case = FreshCase(B=2, T=130, S=130, Hq=Hq, Hkv=Hkv, D=D, N=300, chunk_size=64, chunk_start=0,
                     dtype=torch.bfloat16)
    args = case.make("cuda")
    assert_flash_rule(*run(args), args, case)


@pytest.mark.parametrize("R,M", [(9, 8), (1, 1), (0, 8)])
def test_prefill_memory_blocks(R, M):
    """More memory keys per chunk than one block (72 > 64), a single key, and no memory at all."""
    case = FreshCase(B=2, T=70, S=100, Hq=8, Hkv=2, D=64, R=R, M=M, N=20, chunk_size=16, chunk_start=2,
                     dtype=torch.bfloat16)
    args = case.make("cuda")
    assert_flash_rule(*run(args), args, case)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 80, 128])
def test_prefill_int8_bank(dtype, D):
    """int8 codes go through the MMAs exactly; the scales are applied to S and P in float32."""
    case = FreshCase(B=2, T=100, S=160, Hq=10, Hkv=2, D=D, N=40, int8_bank=True, dtype=dtype,
                     kv_lens=[160, 120], chunk_size=64, chunk_start=4)
    args = case.make("cuda")
    assert_flash_rule(*run(args), args, case)


@pytest.mark.parametrize("int8_bank", [False, True])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("dtype", LOW)
def test_prefill_exact_p_mode(dtype, D, int8_bank, monkeypatch):
    """MEMORY3_PREFILL_P=exact: P fed to P V as two terms, held to the float32-accumulation cap
    as well as the 2x rule."""
    monkeypatch.setenv("MEMORY3_PREFILL_P", "exact")
    case = FreshCase(B=2, T=100, S=160, Hq=10, Hkv=2, D=D, N=40, dtype=dtype, kv_lens=[160, 120], chunk_size=64,
                     chunk_start=3, int8_bank=int8_bank)
    args = case.make("cuda")
    assert_flash_rule(*run(args), args, case, exact_p=True)


def test_prefill_bad_data_raises_after_the_kernel(monkeypatch):
    """The prefill kernel records bad ids and lengths in the device range-error words (the
    launcher raises the CPU op's message)."""
    monkeypatch.delenv("MEMORY3_RANGE_CHECK", raising=False)
    case = FreshCase(B=2, T=40, S=60, Hq=8, Hkv=2, D=64, N=33, dtype=torch.bfloat16)
    args = case.make("cuda")
    args["mem_ids"][1, -1, 0] = 33  # a chunk the queries see
    with pytest.raises(RuntimeError, match=r"mem_ids holds 33 at flat index \d+, outside \[-1, N=33\)"):
        ops.memory_attention(**args)
    args = case.make("cuda")
    unread = torch.full_like(args["mem_ids"][:, :1], -1)
    unread[0, 0, 1] = 40  # an extra chunk past every query: the CPU op refuses its ids too
    args["mem_ids"] = torch.cat([args["mem_ids"], unread], dim=1)
    with pytest.raises(RuntimeError, match=r"mem_ids holds 40 at flat index \d+, outside \[-1, N=33\)"):
        ops.memory_attention(**args)
    args = case.make("cuda")
    args["kv_lens"] = torch.tensor([60, 61], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=r"kv_lens\[1\] = 61 is outside \[0, S=60\]"):
        ops.memory_attention(**args)
    ops.memory_attention(**case.make("cuda"))  # and a good call passes


def test_prefill_all_slots_empty_is_causal_sdpa():
    case = FreshCase(B=2, T=120, S=120, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16, empty_slot_frac=1.0)
    args = case.make("cuda")
    out, _ = run(args)
    q, k, v = (args[n].transpose(1, 2) for n in ("q", "k", "v"))
    k, v = (x.repeat_interleave(4, dim=1) for x in (k, v))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).transpose(1, 2)
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel


def test_prefill_agrees_with_cpu_kernel():
    case = FreshCase(B=2, T=64, S=130, Hq=10, Hkv=2, D=80, dtype=torch.bfloat16, kv_lens=[130, 70], chunk_size=64)
    args = case.make("cuda")
    out, lse = run(args)
    cpu_out, cpu_lse = ops.memory_attention(**{n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in args.items()})
    rel = ((out.cpu().float() - cpu_out.float()).norm() / cpu_out.float().norm()).item()
    assert rel < 1e-2, (case, rel)
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(cpu_lse))


def test_prefill_strided_and_unaligned_inputs():
    """k/v a prefix of a bigger cache, q a view (the kernel reads strides); q at an odd element
    offset (not 16-byte aligned: the launcher falls back to a correct path)."""
    case = FreshCase(B=2, T=40, S=60, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16)
    args = case.make("cuda")
    want, _ = run(args)
    big_k = torch.randn(2, 100, 2, 64, device="cuda", dtype=torch.bfloat16)
    big_k[:, :60] = args["k"]
    strided = dict(args, k=big_k[:, :60], q=args["q"].transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(run(strided)[0], want, rtol=0, atol=0)
    flat = torch.empty(args["q"].numel() + 1, device="cuda", dtype=torch.bfloat16)
    odd_q = flat[1:].view_as(args["q"])
    odd_q.copy_(args["q"])
    got, _ = run(dict(args, q=odd_q))
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_prefill_is_deterministic():
    case = FreshCase(B=2, T=100, S=100, Hq=10, Hkv=2, D=80, dtype=torch.bfloat16)
    args = case.make("cuda")
    a, b = run(args), run(args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_prefill_and_backward_captured_in_a_cuda_graph():
    """A chunked-prefill step (forward and the backward op) syncs nowhere and allocates only
    from the caching allocator: it captures into a CUDA graph and replays on new inputs."""
    case = FreshCase(B=2, T=64, S=128, Hq=10, Hkv=2, D=80, N=30, dtype=torch.bfloat16, kv_lens=[128, 100],
                     chunk_size=64)
    static = case.make("cuda")
    names = ("q", "k", "v", "mem_k", "mem_v")
    dout = torch.randn(case.B, case.T, case.Hq, case.D, device="cuda", dtype=torch.bfloat16)

    def step(a):
        out, lse = ops.memory_attention(**a)
        grads = torch.ops.memory3.memory_attention_backward(
            dout, None, a["q"], a["k"], a["v"], a["mem_k"], a["mem_v"], a["mem_ids"], out, lse, a["kv_lens"],
            a["chunk_size"], a["chunk_start"], case.D ** -0.5, None, None, True)
        return (out, lse) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    fresh = dataclasses.replace(case, salt=case.salt + 1).make("cuda")
    for n in names:
        static[n].copy_(fresh[n])
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step(static)):  # eager on the same (refilled) inputs
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    ops.check_range_errors()


# ---------------------------------------------------------------------------- backward


def grads_against_reference(args: dict, names: tuple, case, rel_tol: float):
    leaves = [args[n] for n in names]
    out, lse = ops.memory_attention(**args)
    g = torch.Generator().manual_seed(case.salt)
    dout = torch.randn(out.shape, generator=g).to("cuda")
    dlse = torch.randn(lse.shape, generator=g).to("cuda")
    loss = (out.float() * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    rest = {n: (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items() if n not in names}
    ref_out, ref_lse = memory_attention_ref(**rest, **dict(zip(names, ref_leaves)))
    seen = torch.isfinite(ref_lse)
    ref_loss = (ref_out * dout.cpu().double()).sum() + (ref_lse.double()[seen] * dlse.cpu().double()[seen]).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, got, want in zip(names, grads, ref_grads):
        assert want.abs().sum() > 0, f"d{name} is all zero: the case does not exercise it"
        got = got.cpu().double()
        assert not torch.isnan(got).any(), f"{case}: d{name} has NaN"
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < rel_tol, f"{case}: d{name} relative error {rel:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,rel_tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-4),
                                           (torch.float64, 1e-6)])
def test_backward_matches_reference(dtype, rel_tol, shape):
    """dq, dk, dv, dmem_k, dmem_v with dlse, repeated ids (a bank of 6 rows), GQA 5, D=80."""
    case = FreshCase(B=2, Hq=10, Hkv=2, D=80, N=6, dtype=dtype, **SHAPES[shape])
    grads_against_reference(case.make("cuda", requires_grad=True), ("q", "k", "v", "mem_k", "mem_v"), case, rel_tol)


@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", LOW)
def test_backward_tensor_cores_every_head_dim(dtype, D):
    """The tensor-core backward at each head dim it serves, chunked and ragged, repeated ids."""
    case = FreshCase(B=2, T=70, S=150, Hq=8, Hkv=2, D=D, N=6, dtype=dtype, kv_lens=[150, 60], chunk_size=64,
                     chunk_start=2)
    grads_against_reference(case.make("cuda", requires_grad=True), ("q", "k", "v", "mem_k", "mem_v"), case,
                            2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize("int8", [False, True])
def test_backward_tensor_cores_agree_with_cuda_cores(int8, monkeypatch):
    """MEMORY3_CUDA_BACKWARD=simt runs the CUDA-core backward: the two agree to bf16 rounding."""
    case = FreshCase(B=2, T=100, S=130, Hq=10, Hkv=2, D=80, N=6, dtype=torch.bfloat16, int8_bank=int8,
                     kv_lens=[130, 90])
    args = case.make("cuda", requires_grad=True)
    names = ("q", "k", "v") + (() if int8 else ("mem_k", "mem_v"))
    leaves = [args[n] for n in names]
    dout = torch.randn(case.B, case.T, case.Hq, case.D, device="cuda", dtype=torch.bfloat16)

    def grads():
        return torch.autograd.grad(ops.memory_attention(**args)[0], leaves, dout)

    tc = grads()
    monkeypatch.setenv("MEMORY3_CUDA_BACKWARD", "simt")
    simt = grads()
    for name, a, b in zip(names, tc, simt):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 1e-2, f"{case}: d{name} tensor cores vs CUDA cores: {rel:.3g}"


def test_backward_int8_bank():
    case = FreshCase(B=2, T=50, S=90, Hq=8, Hkv=2, D=64, N=6, int8_bank=True, dtype=torch.float32,
                     kv_lens=[90, 40], chunk_size=16)
    grads_against_reference(case.make("cuda", requires_grad=True), ("q", "k", "v"), case, 1e-4)


def test_backward_memory_grads_are_deterministic():
    """Repeated ids add up slot by slot in a fixed order: two runs agree bit for bit."""
    case = FreshCase(B=3, T=64, S=128, Hq=8, Hkv=2, D=64, N=3, dtype=torch.float32, chunk_size=16)
    args = case.make("cuda", requires_grad=True)
    leaves = [args[n] for n in ("q", "k", "v", "mem_k", "mem_v")]

    def grads():
        out, lse = ops.memory_attention(**args)
        return torch.autograd.grad(out.square().sum() + lse.nan_to_num(neginf=0.0).sum(), leaves)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_backward():
    case = FreshCase(B=2, T=48, S=100, Hq=10, Hkv=2, D=80, dtype=torch.bfloat16)
    args = case.make("cuda", requires_grad=True)

    def layer(q, k, v, mem_k, mem_v):
        out, lse = ops.memory_attention(q, k, v, mem_k, mem_v, args["mem_ids"], chunk_size=case.chunk_size,
                                        chunk_start=case.chunk_start)
        return F.silu(out.float()).square().mean() + lse.mean()

    leaves = [args[n] for n in ("q", "k", "v", "mem_k", "mem_v")]
    loss = torch.compile(layer, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = layer(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- the model


def test_training_step_small_preset_matches_cpu():
    """One training step of the `small` preset (head dim 32, GQA 4) with memories on CUDA: the
    loss and every gradient (memories included) match the same step on the CPU in float32; under
    bf16 autocast (the trainer's default on CUDA) the loss stays within bf16 rounding of it and
    an AdamW step lowers it."""
    from memory3.model import Memories, Memory3Config, Memory3Model

    torch.manual_seed(0)
    config = Memory3Config.preset("small", vocab_size=512)
    model = Memory3Model(config)
    g = torch.Generator().manual_seed(1)
    B, S = 2, 150
    tokens = torch.randint(4, config.vocab_size, (B, S), generator=g)
    C = -(-S // config.chunk_size)
    memory = torch.randn(9, *config.memory_shape, generator=g) * 0.5
    ids = torch.randint(0, 9, (B, C, config.memories_per_chunk), generator=g, dtype=torch.int32)
    ids[torch.rand(ids.shape, generator=g) < 0.2] = -1

    def step(m, device, autocast=False):
        dtype = torch.bfloat16 if autocast else torch.float32  # memories come in the model's compute dtype
        mem = memory.detach().to(device, dtype).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = m(tokens.to(device), Memories.from_stacked(mem, ids.to(device)))
            loss = F.cross_entropy(logits.float().flatten(0, 1)[:-1], tokens.to(device).flatten()[1:])
        loss.backward()
        return loss, mem.grad

    cpu_model, cuda_model = model, copy.deepcopy(model).cuda()
    cpu_loss, cpu_mem_grad = step(cpu_model, "cpu")
    cuda_loss, cuda_mem_grad = step(cuda_model, "cuda")
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda_mem_grad.cpu(), cpu_mem_grad, rtol=2e-3, atol=1e-5)
    for (name, a), b in zip(cpu_model.named_parameters(), cuda_model.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=2e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")

    cuda_model.zero_grad()
    opt = torch.optim.AdamW(cuda_model.parameters(), lr=1e-3)
    bf16_loss, _ = step(cuda_model, "cuda", autocast=True)
    assert abs(bf16_loss.item() - cuda_loss.item()) < 0.02 * cuda_loss.item()
    opt.step()
    cuda_model.zero_grad()
    after, _ = step(cuda_model, "cuda", autocast=True)
    assert after.item() < bf16_loss.item()


@pytest.mark.parametrize("name", ["MEMORY3_PREFILL_P", "MEMORY3_CUDA_BACKWARD", "MEMORY3_RANGE_CHECK"])
def test_a_mistyped_switch_is_refused(monkeypatch, name):
    """A MEMORY3_* switch with an unknown value is an error naming it, never the default path."""
    monkeypatch.setenv(name, "exactt")
    case = FreshCase(B=1, T=40, S=40, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16)
    args = case.make("cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match=f"{name}=exactt is not one of"):
        out, lse = ops.memory_attention(**args)
        out.float().sum().backward()
