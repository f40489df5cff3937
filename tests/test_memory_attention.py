"""memory_attention on the CPU, held to memory3.reference (in float64) and, where the two
can be compared, to torch's scaled_dot_product_attention as an independent oracle."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import memory3
from memory3 import ops
from memory3 import testing
from memory3.reference import memory_attention_ref
from memory3.testing import AttentionCase, require_kernel

GQA = [(4, 4), (4, 2), (8, 2), (8, 1), (5, 1), (10, 2)]  # (Hq, Hkv): ratios 1, 2, 4, 8, 5, 5
HEAD_DIMS = [16, 64, 80, 128, 7, 200]  # and odd ones: any head dim
SHAPES = {  # T, S, kv_lens
    "decode": dict(T=1, S=97),
    "prefill": dict(T=113, S=113),
    "chunked_prefill": dict(T=37, S=150),
    "ragged_decode": dict(T=1, S=200, kv_lens=[50, 199]),
    "ragged_prefill": dict(T=40, S=90, kv_lens=[90, 25]),  # sequence 1: 15 padded queries
}


def reference(args: dict, dtype=torch.float64):
    return memory_attention_ref(**args, compute_dtype=dtype)


def assert_lse_close(lse, ref_lse, atol):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "queries that see no key must have lse -inf"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=atol, rtol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Hq,Hkv", GQA)
def test_forward_float32(Hq, Hkv, D, shape, device):
    require_kernel("memory_attention", device)
    case = AttentionCase(Hq=Hq, Hkv=Hkv, D=D, **SHAPES[shape])
    args = case.make(device)
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = reference(args)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=2e-5)
    assert_lse_close(lse, ref_lse, 2e-5)


def exact_reference(args: dict) -> torch.Tensor:
    """out of the reference on the same inputs upcast to float64, and left in float64 (the
    reference casts its answer to q's dtype, a rounding of its own)."""
    wide = {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n not in
            ("mem_k_scale", "mem_v_scale") else t for n, t in args.items()}
    return memory_attention_ref(**wide)[0]


def assert_fp32_accumulation(out, args):
    """A kernel that accumulates in float32 and rounds once to a bf16/fp16 output is within
    half an ulp of the exact answer, plus float32's own error: |err| <= eps/2 * |exact| + 1e-5.
    Accumulating in bf16/fp16, or a kernel a few times worse, breaks it."""
    eps = torch.finfo(out.dtype).eps
    exact = exact_reference(args)
    err = (out.double() - exact).abs()
    cap = 0.5 * eps * exact.abs() * (1 + 1e-3) + 1e-5
    worst = (err / cap).argmax()
    assert bool((err <= cap).all()), (
        f"error {err.flatten()[worst].item():.3g} > cap {cap.flatten()[worst].item():.3g} at "
        f"{exact.flatten()[worst].item():.6g}; max error {err.max().item():.3g}")


@pytest.mark.parametrize("shape", ["decode", "chunked_prefill", "ragged_prefill"])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision(dtype, D, shape, device):
    """FlashAttention's rule (error vs float64 at most twice PyTorch's own in that dtype) and
    a cap tied to the kernel's float32 accumulation (the 2x rule alone lets a kernel 25x
    worse pass at D=80)."""
    require_kernel("memory_attention", device)
    case = AttentionCase(Hq=10, Hkv=2, D=D, dtype=dtype, **SHAPES[shape])
    args = case.make(device)
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = reference(args)
    torch_out, _ = memory_attention_ref(**args, compute_dtype=dtype)
    err = (out.double() - ref_out.double()).abs().max().item()
    torch_err = (torch_out.double() - ref_out.double()).abs().max().item()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)
    assert_fp32_accumulation(out, args)
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["decode", "prefill", "ragged_prefill"])
def test_int8_bank_fused(shape, dtype, device):
    """An int8 bank is dequantized inside the kernel: same answer as a float bank holding
    code * scale."""
    require_kernel("memory_attention", device)
    case = AttentionCase(Hq=8, Hkv=2, D=80, dtype=dtype, int8_bank=True, **SHAPES[shape])
    args = case.make(device)
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = reference(args)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out.double(), atol=2e-5, rtol=2e-5)
    else:
        assert_fp32_accumulation(out, args)
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("chunk_size,chunk_start", [(1, 0), (7, 0), (16, 5), (64, 2), (200, 0)])
def test_chunk_grid(chunk_size, chunk_start, device):
    require_kernel("memory_attention", device)
    case = AttentionCase(T=70, S=130, chunk_size=chunk_size, chunk_start=chunk_start, R=3, M=3)
    args = case.make(device)
    out, lse = ops.memory_attention(**args)
    ref_out, ref_lse = reference(args)
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=2e-5)
    assert_lse_close(lse, ref_lse, 2e-5)


def _sdpa_gqa(q, k, v, mask):
    """SDPA with GQA expanded by hand; q [B,T,Hq,D], k/v [B,L,Hkv,D], mask [B,1|Hq,T,L]."""
    G = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(G, dim=2).transpose(1, 2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask).transpose(1, 2)


def test_no_memory_equals_causal_sdpa():
    """All slots empty: plain causal attention (the second half of the model's layers)."""
    case = AttentionCase(B=3, T=50, S=50, Hq=8, Hkv=2, D=64, empty_slot_frac=1.0)
    args = case.make()
    out, _ = ops.memory_attention(**args)
    expect = _sdpa_gqa(args["q"], args["k"], args["v"], torch.ones(50, 50, dtype=torch.bool).tril())
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)


def test_memory_as_prefix_equals_sdpa():
    """Independent oracle: one chunk whose memories are concatenated before the context and
    attended with an explicit mask by SDPA (the paper's eq. 4), ids repeated on purpose."""
    B, T, Hq, Hkv, D, M = 2, 20, 6, 2, 32, 4
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    bank_k, bank_v = torch.randn(2, 9, Hkv, M, D, generator=g)
    ids = torch.tensor([[[3, 8, 3]], [[0, -1, 5]]], dtype=torch.int32)
    out, _ = ops.memory_attention(q, k, v, bank_k, bank_v, ids, chunk_size=T, chunk_start=0)
    for b in range(B):
        rows = [int(i) for i in ids[b, 0] if i >= 0]
        mk = bank_k[rows].permute(1, 0, 2, 3).reshape(Hkv, -1, D).transpose(0, 1)  # [L_mem, Hkv, D]
        mv = bank_v[rows].permute(1, 0, 2, 3).reshape(Hkv, -1, D).transpose(0, 1)
        keys, vals = torch.cat([mk, k[b]])[None], torch.cat([mv, v[b]])[None]
        mask = torch.cat([torch.ones(T, mk.shape[0], dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
        torch.testing.assert_close(out[b : b + 1], _sdpa_gqa(q[b : b + 1], keys, vals, mask), atol=2e-5, rtol=2e-5)


def test_padded_queries_give_zero_and_neg_inf_lse():
    case = AttentionCase(T=10, S=10, kv_lens=[10, 4], chunk_start=0)
    out, lse = ops.memory_attention(**case.make())
    assert torch.all(out[1, :6] == 0)
    assert torch.all(torch.isneginf(lse[1, :, :6]))
    assert torch.isfinite(lse[1, :, 6:]).all() and torch.isfinite(lse[0]).all()


def test_strided_inputs():
    """k/v as a prefix of a larger static cache, q a non-contiguous view: no copy needed."""
    case = AttentionCase(T=5, S=60)
    args = case.make()
    big_k = torch.randn(2, 100, 2, 64)
    big_k[:, :60] = args["k"]
    args_strided = dict(args, k=big_k[:, :60], q=args["q"].transpose(1, 2).contiguous().transpose(1, 2))
    assert not args_strided["k"].is_contiguous() and not args_strided["q"].is_contiguous()
    torch.testing.assert_close(ops.memory_attention(**args_strided)[0], ops.memory_attention(**args)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------- backward


def assert_grads_match_reference(args: dict, names: tuple, atol=5e-5):
    """Gradients of `names` from random upstream gradients of out and lse, against autograd
    through the float64 reference."""
    leaves = [args[n] for n in names]
    out, lse = ops.memory_attention(**args)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(out.device)
    dlse = torch.randn(lse.shape, generator=g).to(lse.device)
    loss = (out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, ref_lse = memory_attention_ref(**dict(args, **dict(zip(names, ref_leaves))))
    seen = torch.isfinite(ref_lse)
    ref_loss = (ref_out * dout.double()).sum() + (ref_lse.double()[seen] * dlse.double()[seen]).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, got, want in zip(names, grads, ref_grads):
        assert want.abs().sum() > 0, f"d{name} is all zero: the case does not exercise it"
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("shape", ["decode", "prefill", "chunked_prefill", "ragged_prefill"])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (8, 2, 64), (5, 1, 80), (8, 1, 128), (10, 2, 40)])
def test_backward_matches_reference(Hq, Hkv, D, shape, device):
    """Gradients for q, k, v, mem_k, mem_v from out and lse, with repeated ids accumulating."""
    require_kernel("memory_attention", device)
    case = AttentionCase(Hq=Hq, Hkv=Hkv, D=D, N=6, **SHAPES[shape])  # small bank: ids repeat
    assert_grads_match_reference(case.make(device, requires_grad=True), ("q", "k", "v", "mem_k", "mem_v"))


@pytest.mark.parametrize("shape", ["decode", "prefill", "chunked_prefill", "ragged_prefill"])
@pytest.mark.parametrize("Hq,Hkv,D", [(8, 2, 64), (10, 2, 80)])
def test_backward_with_int8_bank_matches_reference(Hq, Hkv, D, shape, device):
    """An int8 bank (frozen, dequantized inside the kernel) still shapes dq, dk and dv."""
    require_kernel("memory_attention", device)
    case = AttentionCase(Hq=Hq, Hkv=Hkv, D=D, N=6, int8_bank=True, **SHAPES[shape])
    args = case.make(device, requires_grad=True)
    assert args["mem_k"].dtype == torch.int8
    assert_grads_match_reference(args, ("q", "k", "v"))


def test_backward_low_precision():
    case = AttentionCase(T=37, S=100, Hq=8, Hkv=2, D=80, dtype=torch.bfloat16)
    args = case.make(requires_grad=True)
    out, _ = ops.memory_attention(**args)
    out.float().square().sum().backward()
    ref_leaves = [args[n].detach().double().requires_grad_() for n in ("q", "k", "v", "mem_k", "mem_v")]
    ref_out, _ = memory_attention_ref(**dict(args, **dict(zip(("q", "k", "v", "mem_k", "mem_v"), ref_leaves))))
    ref_out.square().sum().backward()
    for name, ref in zip(("q", "k", "v", "mem_k", "mem_v"), ref_leaves):
        got = args[name].grad.double()
        assert got.dtype == torch.float64 and args[name].grad.dtype == torch.bfloat16
        rel = (got - ref.grad).norm() / ref.grad.norm()
        assert rel < 2e-2, (name, rel.item())


def test_gradcheck_float64():
    case = AttentionCase(B=2, T=5, S=9, Hq=4, Hkv=2, D=8, N=4, M=2, R=2, chunk_size=3, chunk_start=1,
                         dtype=torch.float64, kv_lens=[9, 7], empty_slot_frac=0.25)
    args = case.make(requires_grad=True)
    names = ("q", "k", "v", "mem_k", "mem_v")

    def out_of(*leaves):
        return ops.memory_attention(**dict(args, **dict(zip(names, leaves))))

    leaves = tuple(args[n] for n in names)
    assert torch.autograd.gradcheck(lambda *x: out_of(*x)[0], leaves)
    # lse is float32 by contract: a wider step keeps finite differences above its rounding.
    assert torch.autograd.gradcheck(lambda *x: out_of(*x)[1].nan_to_num(neginf=0.0).double(), leaves,
                                    eps=1e-3, atol=2e-3)


# ---------------------------------------------------------------------------- errors


def _bad(**changes):
    args = AttentionCase(T=4, S=40).make()
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(q=torch.randn(2, 4, 8)), r"q must be \[B, T, Hq, D\]"),
        (dict(q=torch.randn(2, 4, 7, 64)), r"multiple of k/v heads"),
        (dict(q=torch.randn(2, 4, 8, 64, dtype=torch.float64)), r"k must have the dtype of q"),
        (dict(k=torch.randn(2, 40, 2, 32), v=torch.randn(2, 40, 2, 32)), r"k must have head dim"),
        (dict(v=torch.randn(2, 41, 2, 64)), r"v must have the shape of k"),
        (dict(mem_k=torch.randn(33, 3, 8, 64), mem_v=torch.randn(33, 3, 8, 64)), r"mem_k must have Hkv=2"),
        (dict(mem_v=torch.randn(33, 2, 8, 64, dtype=torch.float64)), r"mem_v must have the dtype of mem_k"),
        (dict(mem_k=torch.zeros(33, 2, 8, 64, dtype=torch.int8), mem_v=torch.zeros(33, 2, 8, 64, dtype=torch.int8)),
         r"int8 bank needs mem_k_scale"),
        (dict(mem_ids=torch.zeros(2, 1, 5, dtype=torch.int32)), r"mem_ids has 1 chunks but the context"),
        (dict(mem_ids=torch.zeros(2, 5, dtype=torch.int32)), r"mem_ids must be \[B=2, C, R\]"),
        (dict(mem_ids=torch.zeros(2, 3, 5)), r"mem_ids must be an integer tensor"),
        (dict(kv_lens=torch.tensor([4], dtype=torch.int32)), r"kv_lens must be \[B=2\]"),
        (dict(chunk_size=0), r"chunk_size must be in \[1, 2\^31 - 1\], got 0"),
        (dict(q=torch.randn(2, 50, 8, 64)), r"k/v hold only S=40"),
    ],
)
def test_bad_input_raises_naming_the_argument(changes, match):
    """The Python face (ValueError) and the C++ launcher, for direct torch.ops calls
    (RuntimeError), report the same first error: the two faces cannot drift apart."""
    with pytest.raises(ValueError, match=match):
        ops.memory_attention(**_bad(**changes))
    ids = changes.get("mem_ids")
    if ids is None or not ids.is_floating_point():  # the op takes no float ids: the face names them
        with pytest.raises(RuntimeError, match=match):
            torch.ops.memory3.memory_attention(*testing.attention_args(_bad(**changes)))


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(mem_ids=torch.full((2, 3, 5), 33, dtype=torch.int32)), r"mem_ids holds 33 .* outside \[-1, N=33\)"),
        (dict(mem_ids=torch.full((2, 3, 5), -2, dtype=torch.int32)), r"mem_ids holds -2"),
        (dict(kv_lens=torch.tensor([40, 41], dtype=torch.int32)), r"kv_lens\[1\] = 41 is outside \[0, S=40\]"),
    ],
)
def test_bad_data_raises_in_the_kernel(changes, match):
    with pytest.raises(RuntimeError, match=match):
        ops.memory_attention(**_bad(**changes))


def test_short_chunk_table_with_kv_lens_raises():
    args = _bad(kv_lens=torch.tensor([40, 40], dtype=torch.int32), mem_ids=torch.zeros(2, 2, 5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"mem_ids has 2 chunks but sequence 0 .* needs 3"):
        ops.memory_attention(**args)
    # A static cache longer than the filled context only needs chunks for what is filled.
    args["kv_lens"] = torch.tensor([30, 20], dtype=torch.int32)
    ops.memory_attention(**args)


def test_direct_op_call_checks_too():
    """Callers of torch.ops.memory3.* directly get the C++ checks (RuntimeError)."""
    a = _bad()
    with pytest.raises(RuntimeError, match=r"q must be \[B, T, Hq, D\]"):
        torch.ops.memory3.memory_attention(a["q"][0], a["k"], a["v"], a["mem_k"], a["mem_v"], a["mem_ids"])


# ---------------------------------------------------------------------------- integration


def test_cpp_kernel_is_the_one_running():
    """The op dispatches to the compiled CPU kernel: one memory3 event, no aten math inside."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("memory3::memory_attention", "CPU")
    assert memory3._extension.available()
    args = AttentionCase(T=64, S=64).make()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.memory_attention(**args)
    names = {e.name for e in prof.events()}
    assert "memory3::memory_attention" in names
    assert not names & {"aten::softmax", "aten::bmm", "aten::matmul", "aten::logsumexp", "aten::_softmax"}


@pytest.mark.parametrize("i", range(len(testing.ATTENTION_SAMPLE_CASES)))
def test_opcheck(i, device, sample_inputs):
    """Schema, fake kernel, autograd registration and dynamic shapes on every sample: float
    and int8 banks, kv_lens (int32 and int64), GQA 5, decode, bf16 and float64."""
    args = sample_inputs("memory_attention", device, requires_grad=True)[i]
    torch.library.opcheck(torch.ops.memory3.memory_attention.default, args)


@pytest.mark.parametrize("i", range(len(testing.ATTENTION_SAMPLE_CASES)))
def test_samples_match_reference(i, device, sample_inputs):
    args = sample_inputs("memory_attention", device)[i]
    out, lse = torch.ops.memory3.memory_attention(*args)
    ref_out, ref_lse = memory_attention_ref(*args, compute_dtype=torch.float64)
    if out.dtype in (torch.bfloat16, torch.float16):
        assert_fp32_accumulation(out, dict(zip(testing.ATTENTION_ARG_ORDER, args)))
    else:
        torch.testing.assert_close(out.double(), ref_out.double(), atol=2e-5, rtol=2e-5)
    assert_lse_close(lse, ref_lse, 1e-4)


def test_torch_compile_fullgraph_with_backward():
    case = AttentionCase(T=12, S=30, D=16)
    args = case.make(requires_grad=True)

    def layer(q, k, v, mem_k, mem_v):
        out, lse = ops.memory_attention(q, k, v, mem_k, mem_v, args["mem_ids"], chunk_size=case.chunk_size,
                                        chunk_start=case.chunk_start)
        return F.silu(out).square().mean() + lse.mean()

    leaves = [args[n] for n in ("q", "k", "v", "mem_k", "mem_v")]
    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = layer(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_case_dataclass_is_reproducible():
    a, b = AttentionCase().make(), AttentionCase().make()
    assert torch.equal(a["q"], b["q"])
    c = dataclasses.replace(AttentionCase(), D=80).make()
    assert c["q"].shape[-1] == 80


_PEAK_SCRIPT = """
import sys, torch
from memory3 import ops
from memory3.testing import AttentionCase, require_kernel

def hwm_mb():
    with open("/proc/self/status") as f:
        return next(float(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

T = int(sys.argv[1])
args = AttentionCase(B=1, T=T, S=T, Hq=4, Hkv=2, D=64, chunk_size=64, chunk_start=0).make()
ops.memory_attention(**AttentionCase(B=1, T=64, S=64, Hq=4, Hkv=2, D=64, chunk_size=64, chunk_start=0).make())
before = hwm_mb()
ops.memory_attention(**args)
print(hwm_mb() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_t_times_s():
    """One prefill call in a fresh process: T=S=4096 would need 256 MB for a float32 score
    matrix of 4 heads; the kernel's peak grows by its output (4 MB) plus small scratch."""
    growth = float(subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "4096"], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    output_mb = 4096 * 4 * 64 * 4 / 2**20
    assert growth < output_mb + 16, f"peak grew by {growth:.1f} MB for a {output_mb:.0f} MB output"


def test_compile_dynamic_decode_compiles_once():
    """Decode with a growing context under dynamic shapes: argument checks and fake kernels
    must not specialise on sizes (their messages are built only on failure)."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    bank_k, bank_v = torch.randn(2, 50, 2, 8, 16)

    def step(q, k, v, ids):
        return ops.memory_attention(q, k, v, bank_k, bank_v, ids, chunk_size=8, chunk_start=2)[0]

    compiled = torch.compile(step, backend=counting_backend, fullgraph=True, dynamic=True)
    for S in (21, 37, 50):  # chunk tables of 3, 5, 6 rows of 7 slots
        q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, S, 2, 16), torch.randn(1, S, 2, 16)
        ids = torch.randint(-1, 50, (1, (S - 3) // 8 + 1, 7), dtype=torch.int32)
        torch.testing.assert_close(compiled(q, k, v, ids), step(q, k, v, ids))
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 context lengths"


def test_bank_sliced_from_stacked_layers_is_read_in_place():
    """One layer of a bank stored [N, layers, Hkv, M, D]: rows strided by all layers."""
    args = AttentionCase(T=9, S=40).make()
    stacked_k = torch.randn(args["mem_k"].shape[0], 3, *args["mem_k"].shape[1:])
    stacked_v = torch.randn_like(stacked_k)
    stacked_k[:, 1], stacked_v[:, 1] = args["mem_k"], args["mem_v"]
    sliced = dict(args, mem_k=stacked_k[:, 1], mem_v=stacked_v[:, 1])
    assert not sliced["mem_k"].is_contiguous()
    torch.testing.assert_close(ops.memory_attention(**sliced)[0], ops.memory_attention(**args)[0], rtol=0, atol=0)


@pytest.mark.parametrize("B,T,S", [(2, 0, 5), (0, 0, 0), (0, 3, 4)])
def test_empty_shapes(B, T, S):
    q, k, v = torch.randn(B, T, 4, 16), torch.randn(B, S, 2, 16), torch.randn(B, S, 2, 16)
    bank = torch.randn(3, 2, 2, 16)
    out, lse = ops.memory_attention(q, k, v, bank, bank, torch.zeros(B, 1, 1, dtype=torch.int32), chunk_size=64)
    assert out.shape == (B, T, 4, 16) and lse.shape == (B, 4, T)


@pytest.mark.parametrize("name", ["k", "v", "mem_k", "mem_ids"])
def test_device_mismatch_raises(name):
    args = AttentionCase(T=4, S=40).make()
    args[name] = args[name].to("meta")
    if name == "mem_k":
        args["mem_v"] = args["mem_v"].to("meta")
    with pytest.raises(ValueError, match=rf"{name} must be on the device of q \(cpu\), got meta"):
        ops.memory_attention(**args)


def test_meta_tensors_give_shapes_without_running():
    """The fake kernels serve the meta device too: shape inference without data."""
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in AttentionCase(T=4, S=40).make().items()}
    out, lse = ops.memory_attention(**args)
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 64) and lse.shape == (2, 8, 4)
