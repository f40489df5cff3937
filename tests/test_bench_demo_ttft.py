"""bench/bench_demo_ttft.py's harness: every method timed from the rows the stub retriever
hands out (the person first), and the paired differences computed over every question."""
import importlib.util
from pathlib import Path

import torch

from memory3.model.tokenizer import Memory3Tokenizer
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

_path = Path(__file__).resolve().parents[1] / "bench" / "bench_demo_ttft.py"
_spec = importlib.util.spec_from_file_location("bench_demo_ttft", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_fixed_retriever_gives_each_question_its_rows():
    r = bench.FixedRetriever({"q1": [3, 0, 1, 2, 4], "q2": [1, 2, 3, 4, 0]})
    got = r.retrieve(["q2", "q1"], 2, overlap_threshold=0.5)
    assert got.rows.tolist() == [[1, 2], [3, 0]] and got.ids == [["1", "2"], ["3", "0"]]


def test_measure_times_every_method_and_pairs_every_question(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setitem(bench.SIZES, "tiny", dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                                  mlp_dim=64))
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=40, n_heldout=10, n_names=100))
    seen = []
    real = bench.time_methods

    def recording(answerers, questions, retriever, **kw):
        for q in questions:
            rows = retriever.retrieve([q.prompt], 5).rows[0].tolist()
            person = kb.person(q.person_id)
            seen.append(kb.reference_text(person) == answerers["rag_1"].texts[rows[0]])
        return real(answerers, questions, retriever, **kw)

    monkeypatch.setattr(bench, "time_methods", recording)
    tok = Memory3Tokenizer.byte_level()
    got = bench.measure("tiny", kb, tok, n_questions=4, repeats=2, work=tmp_path)
    assert seen == [True] * 4  # the right person's biography is the first row
    assert set(got["own_ms"]) == {"none", "memory_1", "memory_5", "rag_1", "rag_5", "fullkv_1", "fullkv_5"}
    assert all(t > 0 for t in got["own_ms"].values())
    for k in (1, 5):
        for other in ("fullkv", "rag"):
            p = got[f"memory_{k}-{other}"]
            assert p["n"] == 4 and p["lo"] <= p["median"] <= p["hi"]
    assert got["parameters"] == bench.Memory3Config(vocab_size=tok.vocab_size, **bench.SIZES["tiny"]).param_count()
