"""`torchrun` with 2 gloo processes, DDP or FSDP, computes the same losses and weights as one
process with the same global batch (single-stage recipe: memories encoded inside the wrapped
forward, gradient accumulation on both sides with different micro-batch groupings)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from memory3.model.tokenizer import train_bpe
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

ARGS = ["--recipe", "single-stage", "--model", "tiny", "--steps", "3", "--batch-size", "4",
        "--n-train", "60", "--n-heldout", "10", "--n-names", "100", "--eval-people", "0", "--device", "cpu",
        "--threads", "1", "--no-progress", "--warmup-frac", "0.34", "--rag-share", "0.34"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """(run folder, common args) of the one-process reference run."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=60, n_heldout=10, n_names=100))
    tokenizer = train_bpe([r["text"] for r in kb.references()], 400)
    tokenizer.save(tmp_path / "tokenizer.json")
    common = ARGS + ["--tokenizer", str(tmp_path / "tokenizer.json")]
    run([sys.executable, "-m", "memory3.train", "--out", str(tmp_path / "one"), "--micro-batch", "2", *common], tmp_path)
    return tmp_path / "one", common


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, one_process, parallel):
    one, common = one_process
    two = tmp_path / "two"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "memory3.train", "--out", str(two), "--micro-batch", "1", "--parallel", parallel, *common], tmp_path)
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert [h["memory"] for h in h1] == [h["memory"] for h in h2] and any(h["memory"] for h in h1)
    assert [h["targets"] for h in h1] == [h["targets"] for h in h2]
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-5)
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    ckpt = sorted(two.glob("step_*"))[-1]                      # a full (unsharded) checkpoint
    assert load_file(ckpt / "model.safetensors").keys() == w1.keys()
