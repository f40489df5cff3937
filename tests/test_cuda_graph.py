"""A decode step that calls the CUDA ops (dequantize_memory with ids, gather_memory from an
int8 bank, memory_attention reading an int8 bank by id) is captured in a CUDA graph and
replayed on new inputs, and traced by torch.compile(fullgraph=True): the ops never sync and
allocate only from the caching allocator. Range errors inside a graph are recorded, not
raised, until memory3.ops.check_range_errors(). Skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops
from memory3.reference import memory_attention_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

B, S, HQ, HKV, D, N, M, R, C = 4, 256, 40, 8, 80, 300, 8, 5, 4


@pytest.fixture(autouse=True)
def cuda_kernels():
    for op in ("memory_attention", "gather_memory", "dequantize_memory"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{op}", "CUDA"):
            pytest.skip(f"memory3::{op} has no CUDA kernel in this build")


def make_bank(g):
    mk = torch.randint(-127, 128, (N, HKV, M, D), dtype=torch.int8, generator=g).cuda()
    mv = torch.randint(-127, 128, (N, HKV, M, D), dtype=torch.int8, generator=g).cuda()
    ks = (torch.rand(N, HKV, M, generator=g) / 64).cuda()
    vs = (torch.rand(N, HKV, M, generator=g) / 64).cuda()
    return mk, mv, ks, vs


def make_inputs(g):
    q = torch.randn(B, 1, HQ, D, generator=g).to(torch.bfloat16).cuda()
    k = torch.randn(B, S, HKV, D, generator=g).to(torch.bfloat16).cuda()
    v = torch.randn(B, S, HKV, D, generator=g).to(torch.bfloat16).cuda()
    ids = torch.randint(-1, N, (B, C, R), dtype=torch.int32, generator=g).cuda()
    lens = torch.randint(1, S + 1, (B,), dtype=torch.int32, generator=g).cuda()
    return q, k, v, ids, lens


def step(bank, q, k, v, ids, lens):
    """One decode step's memory work: the chunk's memories gathered (int8 -> bf16) and
    decoded from codes, then attention reading the int8 bank in place."""
    mk, mv, ks, vs = bank
    gk, gv = ops.gather_memory(mk, mv, ids[:, -1], torch.bfloat16, ks, vs)
    dk = ops.dequantize_memory(mk, ks, "int8", ids[:, -1], torch.bfloat16)
    out, lse = ops.memory_attention(q, k, v, mk, mv, ids, lens, chunk_size=64, chunk_start=0,
                                    mem_k_scale=ks, mem_v_scale=vs)
    return out, lse, gk.float().sum((-1, -2)) + gv.float().sum((-1, -2)), dk


def test_decode_step_captured_and_replayed():
    g = torch.Generator().manual_seed(0)
    bank = make_bank(g)
    static = make_inputs(g)
    for _ in range(2):  # warm up: first launches, cached device attributes
        step(bank, *static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(bank, *static)
    for trial in range(3):
        fresh = make_inputs(g)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = step(bank, *fresh)
        for got, exp in zip(outs, want):
            torch.testing.assert_close(got, exp, atol=0, rtol=0)
        ref_out, _ = memory_attention_ref(*(t.cpu() for t in fresh[:3]), bank[0].cpu(), bank[1].cpu(),
                                          fresh[3].cpu(), fresh[4].cpu(), chunk_size=64, chunk_start=0,
                                          mem_k_scale=bank[2].cpu(), mem_v_scale=bank[3].cpu())
        torch.testing.assert_close(outs[0].cpu().float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    ops.check_range_errors()


def test_bad_id_inside_a_graph_is_recorded_then_raised():
    g = torch.Generator().manual_seed(1)
    bank = make_bank(g)
    static = make_inputs(g)
    step(bank, *static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(bank, *static)
    static[3][0, -1, 0] = N + 5  # read by all three ops
    graph.replay()  # no sync inside: the graph cannot raise
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=rf"holds {N + 5} at flat index"):
        ops.check_range_errors()
    ops.check_range_errors()  # cleared


def test_torch_compile_fullgraph_traces_the_step():
    g = torch.Generator().manual_seed(2)
    bank = make_bank(g)
    inputs = make_inputs(g)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(bank, *inputs)
    want = step(bank, *inputs)
    # The ops' outputs are the same kernels' bits; the float sum (index 2) is Inductor's own
    # reduction kernel, which adds in another order than eager's.
    for i, (a, b) in enumerate(zip(got, want)):
        tol = dict(atol=1e-3, rtol=1e-5) if i == 2 else dict(atol=0, rtol=0)
        torch.testing.assert_close(a, b, **tol)
