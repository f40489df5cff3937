"""Every integer argument the kernels hold in int32 is checked before it is narrowed: through
the Python face (ValueError) and through torch.ops.memory3.* called directly (RuntimeError,
the C++ launchers), with the same message. Values past int32 are refused, never wrapped:
chunk_size 2^31 used to crash the process, chunk_start 2^32 acted as 0, and the int64 id
2^32 + 3 read row 3."""
from __future__ import annotations

import pytest
import torch

from memory3 import ops
from memory3.testing import AttentionCase

BIG = [2**31, 2**32, 2**32 + 3, 2**40, 2**62]


def _args(**changes):
    args = AttentionCase(T=4, S=40, chunk_start=3, chunk_size=16).make()
    args.setdefault("kv_lens", None)
    args.update(changes)
    return args


def _direct(a):
    """torch.ops.memory3.memory_attention with the schema's positional order."""
    return torch.ops.memory3.memory_attention(
        a["q"], a["k"], a["v"], a["mem_k"], a["mem_v"], a["mem_ids"], a["kv_lens"], a["chunk_size"],
        a["chunk_start"], a.get("scale"), a.get("mem_k_scale"), a.get("mem_v_scale"))


def _both_raise(changes: dict, match: str, python_error=ValueError):
    """The Python face raises python_error, the op called directly RuntimeError; same message."""
    with pytest.raises(python_error, match=match):
        ops.memory_attention(**_args(**changes))
    with pytest.raises(RuntimeError, match=match):
        _direct(_args(**changes))


@pytest.mark.parametrize("value", [0, -1, *BIG])
def test_chunk_size_out_of_range(value):
    _both_raise(dict(chunk_size=value), rf"chunk_size must be in \[1, 2\^31 - 1\], got {value}")


@pytest.mark.parametrize("value", [-1, *BIG])
def test_chunk_start_out_of_range(value):
    _both_raise(dict(chunk_start=value), rf"chunk_start must be in \[0, 2\^31 - 1\], got {value}")


def test_chunk_size_zero_is_named_before_any_chunk_count():
    """The chunk-count message divides by chunk_size: chunk_size is checked first."""
    _both_raise(dict(chunk_size=0, mem_ids=torch.zeros(2, 1, 5, dtype=torch.int32)), r"chunk_size must be")


@pytest.mark.parametrize("bad", [2**32 + 3, 2**31, -(2**32) + 3, -2, 33])
def test_int64_mem_ids_past_int32_are_refused_not_wrapped(bad):
    """int64 ids are checked as int64: 2^32 + 3 must not read row 3."""
    ids = torch.zeros(2, 3, 5, dtype=torch.int64)
    ids[1, 2, 4] = bad
    _both_raise(dict(mem_ids=ids), rf"mem_ids holds {bad} at flat index 29, outside \[-1, N=33\)", RuntimeError)


@pytest.mark.parametrize("bad", [2**32 + 40, 2**31, -(2**32) + 10, -1, 41])
def test_int64_kv_lens_past_int32_are_refused_not_wrapped(bad):
    lens = torch.tensor([40, bad], dtype=torch.int64)
    _both_raise(dict(kv_lens=lens), rf"kv_lens\[1\] = {bad} is outside \[0, S=40\]", RuntimeError)


def test_int64_indices_in_range_give_the_int32_answer():
    a = _args(kv_lens=torch.tensor([40, 29], dtype=torch.int32))
    out32, lse32 = ops.memory_attention(**a)
    a64 = dict(a, mem_ids=a["mem_ids"].long(), kv_lens=a["kv_lens"].long())
    for got, want in zip(ops.memory_attention(**a64), (out32, lse32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(_direct(a64), (out32, lse32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_big_chunk_grid_stays_exact():
    """chunk_start + (c + 1) * chunk_size passes int32 while each fits: no query reaches
    chunk 1, and queries before chunk_start see no memory."""
    a = _args(chunk_size=2**31 - 1, chunk_start=5, mem_ids=torch.randint(0, 33, (2, 1, 5), dtype=torch.int32))
    out, lse = ops.memory_attention(**a)
    from memory3.reference import memory_attention_ref

    ref_out, ref_lse = memory_attention_ref(**a)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    # And with a chunk_start beyond every query: memories are never seen.
    a = _args(chunk_start=2**31 - 1, mem_ids=torch.zeros(2, 0, 5, dtype=torch.int32))
    no_mem = _args(chunk_start=2**31 - 1, mem_ids=torch.full((2, 1, 5), -1, dtype=torch.int32))
    torch.testing.assert_close(ops.memory_attention(**a)[0], ops.memory_attention(**no_mem)[0], rtol=0, atol=0)


def test_backward_with_a_big_chunk_grid():
    a = AttentionCase(T=6, S=20, D=16, chunk_size=2**31 - 1, chunk_start=2).make(requires_grad=True)
    a["mem_ids"] = a["mem_ids"][:, :1]
    out, _ = ops.memory_attention(**a)
    out.sum().backward()
    assert a["mem_k"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["S", "T", "M", "C", "R"])
def test_sizes_past_int32_are_refused(name):
    """Stride-0 views give sizes past int32 without allocating them."""
    a = _args()
    big = 2**31
    if name in ("S", "T"):
        a["k"], a["v"] = (torch.zeros(2, 1, 2, 64).expand(2, big, 2, 64) for _ in range(2))
        if name == "T":
            a["q"] = torch.zeros(2, 1, 8, 64).expand(2, big, 8, 64)
    elif name == "M":
        a["mem_k"], a["mem_v"] = (torch.zeros(33, 2, 1, 64).expand(33, 2, big, 64) for _ in range(2))
    else:
        shape = (2, big, 5) if name == "C" else (2, 3, big)
        a["mem_ids"] = torch.zeros(1, 1, 1, dtype=torch.int32).expand(*shape)
    with pytest.raises(ValueError, match=rf"memory_attention: {name} = {big} is more than 2\^31 - 1"):
        ops.memory_attention(**a)
    with pytest.raises(RuntimeError, match=rf"memory_attention: {name} = {big} is more than 2\^31 - 1"):
        _direct(a)


def test_bank_past_int32_memories_is_refused():
    big = torch.zeros(1, 2, 8, 64).expand(2**31, 2, 8, 64)
    with pytest.raises(ValueError, match=r"mem_k holds 2147483648 memories, more than 2\^31 - 1"):
        ops.memory_attention(**_args(mem_k=big, mem_v=big))
    with pytest.raises(RuntimeError, match=r"mem_k holds 2147483648 memories"):
        _direct(_args(mem_k=big, mem_v=big))
    with pytest.raises(RuntimeError, match=r"mem_k holds 2147483648 memories"):
        torch.ops.memory3.gather_memory(big, big, torch.tensor([0]))


@pytest.mark.parametrize("bad", [2**32 + 3, -(2**32) - 1, 2**62])
def test_gather_and_dequantize_ids_past_int32_are_refused(bad):
    bank = torch.randn(5, 2, 3, 16)
    ids = torch.tensor([0, bad, 1])
    with pytest.raises(RuntimeError, match=rf"ids holds {bad} at flat index 1, outside \[-1, N=5\)"):
        ops.gather_memory(bank, bank, ids)
    codes, meta = ops.quantize_memory(bank, "int8")
    with pytest.raises(RuntimeError, match=rf"ids holds {bad} at flat index 1"):
        ops.dequantize_memory(codes, meta, "int8", ids)
