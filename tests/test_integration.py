"""The ops together: a compiled layer that gathers and decodes memories and attends to them,
the compiled kernels being the ones that run, and the package without its compiled library."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from memory3 import ops
from memory3.reference import dequantize_memory_ref, memory_attention_ref

ATEN_MATH = {"aten::index", "aten::index_select", "aten::mul", "aten::softmax", "aten::matmul", "aten::bmm",
             "aten::argmin", "aten::round", "aten::where", "aten::cdist"}


def _bank(N=40, Hkv=2, M=8, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, Hkv, M, D, generator=g), torch.randn(N, Hkv, M, D, generator=g)


def test_compiled_layer_with_int8_bank_and_gathered_memories():
    """torch.compile(fullgraph=True) of a layer that decodes the chunk's memories from an int8
    bank (dequantize_memory by id), attends with the int8 bank fused (memory_attention) and
    mixes both; equal to eager and to the reference."""
    mem_k, mem_v = _bank()
    k_codes, k_scale = ops.quantize_memory(mem_k, "int8")
    v_codes, v_scale = ops.quantize_memory(mem_v, "int8")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 20, h, 32, generator=g) for h in (4, 2, 2))
    ids = torch.randint(-1, 40, (2, 2, 3), generator=g, dtype=torch.int32)

    def layer(q, k, v):
        out, lse = ops.memory_attention(q, k, v, k_codes, v_codes, ids, chunk_size=16, chunk_start=0,
                                        mem_k_scale=k_scale, mem_v_scale=v_scale)
        chunk_keys = ops.dequantize_memory(k_codes, k_scale, "int8", ids, torch.float32)  # [2, 2, 3, 2, 8, 32]
        return out * torch.sigmoid(lse.transpose(1, 2)[..., None]) + chunk_keys.mean()

    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, layer(q, k, v))
    ref_out, ref_lse = memory_attention_ref(q, k, v, k_codes, v_codes, ids, None, 16, 0, None, k_scale, v_scale)
    ref_keys = dequantize_memory_ref(k_codes, k_scale, "int8", ids, torch.float32)
    expect = ref_out * torch.sigmoid(ref_lse.transpose(1, 2)[..., None]) + ref_keys.mean()
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,call",
    [
        ("gather_memory", lambda b: ops.gather_memory(*b, torch.tensor([3, -1, 7]))),
        ("quantize_memory", lambda b: ops.quantize_memory(b[0], "int4")),
        ("dequantize_memory", lambda b: ops.dequantize_memory(*ops.quantize_memory(b[0], "int8"), "int8",
                                                               torch.tensor([1, 2]))),
    ],
)
def test_cpp_kernels_are_the_ones_running(name, call):
    bank = _bank()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{name}", "CPU")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(bank)
    events = [e for e in prof.events() if e.name == f"memory3::{name}"]
    assert events, f"memory3::{name} did not run"
    inside = {e.name for e in prof.events() if e.time_range.start >= events[-1].time_range.start
              and e.time_range.end <= events[-1].time_range.end}
    assert not inside & ATEN_MATH, f"aten math inside memory3::{name}: {inside & ATEN_MATH}"


def test_package_imports_without_the_compiled_library():
    """memory3 still imports when memory3._C cannot load, and every op says how to build it."""
    script = (
        "import sys; sys.modules['memory3._C'] = None\n"
        "import memory3, torch\n"
        "from memory3 import ops, _extension\n"
        "assert not _extension.available()\n"
        "try:\n"
        "    ops.memory_attention(*[torch.zeros(1)] * 6)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "memory3._C" in out and "pip install --no-build-isolation -e ." in out
