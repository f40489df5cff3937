"""bench/bench_codec_loss.py's harness on a tiny untrained model: the loss it reports follows
the codec's reconstruction error, and its exact match is the demo scorer's."""
import importlib.util
from pathlib import Path

import pytest
import torch

from memory3.memory.encoder import encode_texts
from memory3.model import load_model
from memory3.train.demo_eval import Answerer
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

_path = Path(__file__).resolve().parents[1] / "bench" / "bench_codec_loss.py"
_spec = importlib.util.spec_from_file_location("bench_codec_loss", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok, _ = load_model("tiny")
    model.eval()
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=12, n_heldout=4, n_names=100))
    refs = kb.references()
    texts, ids = [r["text"] for r in refs], [r["id"] for r in refs]
    with torch.inference_mode():
        memories = encode_texts(model, tok, texts, progress=False).float()
    questions = kb.questions_for(kb.heldout_people)
    row_of = {i: n for n, i in enumerate(ids)}
    right = torch.tensor([[row_of[q.person_id]] for q in questions])
    return model, tok, texts, ids, memories, questions, right


def _scores(setup, tmp_path, codec):
    model, tok, texts, ids, memories, questions, right = setup
    bank = bench.build_bank(tmp_path / codec, codec, {}, model, texts, ids, memories, None, None)
    try:
        a = Answerer(model, tok, "memory", 1, bank=bank)
        return bench.rel_l2(bank, memories), *bench.answer_scores(a, questions, right), a.exact_match(questions, right)
    finally:
        bank.close()


def test_loss_follows_codec_error(setup, tmp_path):
    got = {c: _scores(setup, tmp_path, c) for c in ("fp32", "bf16", "int8", "int4")}
    assert got["fp32"][0] == 0.0
    assert 0 < got["bf16"][0] < got["int8"][0] < got["int4"][0]
    loss = {c: g[1] for c, g in got.items()}
    assert abs(loss["bf16"] - loss["fp32"]) < 1e-3 * loss["fp32"]
    assert abs(loss["int4"] - loss["fp32"]) > abs(loss["int8"] - loss["fp32"])
    # a memory changes the loss at all (else the comparison above says nothing)
    model, tok, _, _, _, questions, right = setup
    none = bench.answer_scores(Answerer(model, tok, "none"), questions, right)[0]
    assert abs(none - loss["fp32"]) > 2 * abs(loss["int4"] - loss["fp32"])
    for c, (_, _, em, per_question) in got.items():
        assert em == sum(per_question) / len(per_question), c


def test_answer_scores_is_the_answer_cross_entropy(setup, tmp_path):
    """Recomputed by hand for one question from the full logits."""
    model, tok, texts, ids, memories, questions, right = setup
    bank = bench.build_bank(tmp_path / "fp32", "fp32", {}, model, texts, ids, memories, None, None)
    try:
        a = Answerer(model, tok, "memory", 1, bank=bank)
        q = questions[:1]
        loss, _ = bench.answer_scores(a, q, right[:1])
        p, ans = tok.encode(" " + q[0].prompt), tok.encode(" " + q[0].answer)
        with torch.inference_mode():
            logits, starts = a.logits(right[:1], [p + ans])
        first = starts[0] + len(p)
        logp = logits[0].float().log_softmax(-1)
        want = -sum(logp[first - 1 + i, t].item() for i, t in enumerate(ans)) / len(ans)
        assert loss == pytest.approx(want, rel=1e-5)
    finally:
        bank.close()
