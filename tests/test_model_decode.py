"""The decode step: static shapes that compile once, and the errors of bad inputs."""
from __future__ import annotations

import pytest
import torch

from memory3.model import Memories, Memory3Config, Memory3Model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Memory3Model(Memory3Config.preset("tiny", chunk_size=16)).eval()


def memories(config, B, C, N=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, N, (B, C, config.memories_per_chunk), generator=g, dtype=torch.int32)
    return Memories.from_stacked(torch.randn(N, *config.memory_shape, generator=g), ids)


def test_decode_step_compiles_once_over_100_steps(model):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    B, max_seq = 2, 130
    mem = memories(model.config, B, C=8)
    cache = model.new_cache(B, max_seq)

    def decode_one(token, kv_lens):
        return model(token, mem, cache=cache, kv_lens=kv_lens)

    # Recompiles are dynamo's guards, whatever the backend; "eager" keeps the test fast
    # (inductor also traces the step as one graph: checked by hand, ~40 s on 2 cores).
    step = torch.compile(decode_one, backend="eager", fullgraph=True)
    token = torch.randint(4, 260, (B, 1))
    lens = torch.tensor([10, 20], dtype=torch.int32)
    with torch.no_grad():
        for i in range(100):
            out = step(token, lens + i)
            if i in (0, 57, 99):
                torch.testing.assert_close(out, decode_one(token, lens + i), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_bad_inputs_name_the_argument(model):
    c = model.config
    tokens = torch.randint(4, 260, (2, 20))
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=260\)"):
        model(torch.full((2, 3), 260))
    with pytest.raises(ValueError, match=r"tokens must be an int tensor \[B, T\]"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    cache = model.new_cache(max_batch=2, max_seq=32)
    with pytest.raises(ValueError, match="batch B=3 but the cache holds at most 2"):
        model(torch.randint(4, 260, (3, 1)), cache=cache, kv_lens=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="T=40 new tokens but the cache holds at most 32"):
        model(torch.randint(4, 260, (2, 40)), cache=cache, kv_lens=torch.full((2,), 40, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_lens must lie in \[T=1, cache max_seq=32\]"):
        model(tokens[:, :1], cache=cache, kv_lens=torch.tensor([5, 33], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_lens must be int32 \[B=2\]"):
        model(tokens[:, :1], cache=cache, kv_lens=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="kv_lens is given without a cache"):
        model(tokens, kv_lens=torch.tensor([5, 6], dtype=torch.int32))
    mem = memories(c, 2, C=2)
    with pytest.raises(ValueError, match=r"memories.k must hold one bank per memory layer \(2\), got 1"):
        model(tokens, Memories(mem.k[:1], mem.v[:1], mem.ids))
    bad = [k[:, :1] for k in mem.k]
    with pytest.raises(ValueError, match=r"memories.k\[0\] must be \[N, Hkv=2, M=8, D=16\], got \(7, 1, 8, 16\)"):
        model(tokens, Memories(bad, mem.v, mem.ids))
    with pytest.raises(ValueError, match=r"memories.ids must be int32 \[B=2, C, R\]"):
        model(tokens, Memories(mem.k, mem.v, mem.ids[:1]))
    with pytest.raises(ValueError, match="plain=True reads no memory"):
        model(tokens, mem, plain=True)
    with pytest.raises(ValueError, match=r"logits_at must be an int tensor \[B=2\]"):
        model(tokens, logits_at=torch.tensor([1]))
    ranked = Memory3Model(Memory3Config.preset("tiny", chunk_size=16, memory_positions="ranked"))
    six = Memories(mem.k, mem.v, torch.zeros(2, 2, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="R=6 slots per chunk but ranked positions make room for memories_per_chunk=5"):
        ranked(tokens, six)
    with pytest.raises(ValueError, match="mem_ids has 1 chunks"):
        model(tokens, Memories(mem.k, mem.v, mem.ids[:, :1]))
