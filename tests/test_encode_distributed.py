"""torchrun-sharded encoding: 2 CPU processes (gloo) write the same bank as one process."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from memory3.memory.bank import Bank
from memory3.memory.encode import encode_knowledge_base, part_path, shard_slice
from memory3.model import load_model
from memory3.retrieval import Embedder

N = 21  # odd: the ranks get 10 and 11


def test_shard_slices_cover_the_input_in_order():
    for n in (0, 1, 7, 21):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in range(n)[shard_slice(n, r, world)]]
            assert got == list(range(n))


def test_two_gloo_ranks_write_the_bank_one_process_writes(tmp_path):
    kb = tmp_path / "kb.jsonl"
    rows = [{"id": f"r{i}", "text": f"Reference {i}: the {['owl', 'fox', 'elk'][i % 3]} of hill {i * 13} " * (1 + i % 4),
             **({"source": f"s{i % 2}"} if i % 5 else {})} for i in range(N)]
    kb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "memory3.memory.encode", str(kb), "--model", "tiny", "--out", str(tmp_path / "two"),
         "--codec", "fp32", "--batch-size", "4", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # meanwhile, the same knowledge base in this process
    model, tokenizer, _ = load_model("tiny")
    one, _ = encode_knowledge_base(kb, tmp_path / "one", model, tokenizer, Embedder(), codec="fp32", batch_size=4,
                                   progress=False)
    one.close()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-3000:]
    assert "21 live, 0 deleted (21 rows in 2 shards)" in out  # one shard per rank
    assert not part_path(tmp_path / "two", 0, 2).exists() and not part_path(tmp_path / "two", 1, 2).exists()

    with Bank.open(tmp_path / "one", dtype=torch.float32) as a, Bank.open(tmp_path / "two", dtype=torch.float32) as b:
        for field in ("fingerprint", "shape", "codec", "embedder", "counts"):
            assert getattr(a.manifest, field) == getattr(b.manifest, field), field
        ra, rb = a.references(range(N)), b.references(range(N))
        assert [(r.id, r.text, r.source, r.tokens, r.deleted) for r in ra] == \
               [(r.id, r.text, r.source, r.tokens, r.deleted) for r in rb]
        assert [r.id for r in ra] == [f"r{i}" for i in range(N)]
        rows = torch.arange(N)
        torch.testing.assert_close(b.gather(rows), a.gather(rows), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.embeddings(), a.embeddings(), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "index" / "flat.faiss").exists()
