"""`memory3 demo`: a --quick run completes and its report has every row and plot, with numbers
that follow from what the run stored (not hard-coded); full-KV reuse of one reference is RAG."""
import json
import statistics
import time

import pytest
import torch

from memory3 import cli
from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer
from memory3.train.demo_eval import Answerer, FullKVStore, MemoryReader, time_methods
from memory3.train.demo_report import PLOTS
from memory3.train.init import init_for_training
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase, type_only_ceiling
from memory3.train.demo import DemoSizes

ROWS = {(v, m, k) for v in ("parallel", "ranked") for m, k in
        (("none", 0), ("memory", 1), ("memory", 5), ("rag", 1), ("rag", 5), ("fullkv", 1), ("fullkv", 5))}
ROWS |= {("large", "none", 0)}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    t0 = time.perf_counter()
    rc = cli.main(["demo", "--quick", "--out", str(out), "--threads", "1", "--quiet"])
    assert rc == 0
    return out, time.perf_counter() - t0


def test_quick_run_writes_every_row_and_plot(quick, capsys):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(r["variant"], r["mode"], r["k"]) for r in rows} == ROWS and len(rows) == len(ROWS)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["ttft_ms"] > 0 and 0 < r["prefill_ms"] <= r["ttft_ms"] and r["decode_tok_s"] > 0
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert set(PLOTS) <= set(results["plots"]) and {"loss_parallel.png", "loss_ranked.png"} <= set(results["plots"])
    report = (out / "report.md").read_text()
    for r in rows:
        assert f"| {r['model']} | {r['method']} | {r['accuracy']:.3f} |" in report
    for name in results["plots"]:
        assert f"]({name})" in report
    assert report.count("| yes |") + report.count("| **MISSED** |") == len(results["targets"]) == 18


def test_numbers_follow_from_the_run(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    get = {(r["variant"], r["mode"], r["k"]): r for r in results["rows"]}
    sizes = DemoSizes.quick()
    # bytes: int8 bank = codes + one float scale per (layer, k/v, head, token); full KV = bf16 of every
    # layer for each token of the biography; RAG = its UTF-8 text
    c = Memory3Config(**sizes.small)
    L, Hkv, M, D = c.n_memory_layers, c.n_kv_heads, c.memory_tokens, c.head_dim
    assert get[("parallel", "memory", 5)]["bytes_per_reference"] == L * 2 * Hkv * M * (D + 4)
    assert results["codec_bytes"]["int8"] == L * 2 * Hkv * M * (D + 4)
    assert results["codec_bytes"]["bf16"] == L * 2 * Hkv * M * D * 2
    retrieval = json.loads((out / "stages" / "retrieval.json").read_text())
    tok = Memory3Tokenizer.from_file(out / "tokenizer.json")
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=sizes.n_train, n_heldout=sizes.n_heldout,
                                                n_names=sizes.n_names, seed=0))
    used = sorted({i for ids in retrieval["ids"] for i in ids})
    texts = [kb.reference_text(kb.person(i)) for i in used]
    n_tokens = sum(len(tok.encode(" " + t)) for t in texts) / len(texts)
    fullkv = get[("parallel", "fullkv", 5)]["bytes_per_reference"]
    assert fullkv == pytest.approx(n_tokens * c.n_layers * 2 * Hkv * D * 2, rel=0.2)  # timing adds a few refs
    assert get[("parallel", "rag", 1)]["bytes_per_reference"] == pytest.approx(
        sum(len(t.encode()) for t in texts) / len(texts), rel=0.2)
    # the type-only ceiling is recomputed from the stored retrieval
    qs = kb.questions_for(kb.heldout_people[:sizes.eval_people])
    assert retrieval["questions"] == len(qs)
    assert retrieval["type_only_ceiling_5"] == pytest.approx(type_only_ceiling(kb, qs, retrieval["ids"]))
    right = [q.person_id for q in qs]
    assert retrieval["hit_at_5"] == pytest.approx(sum(r in ids for r, ids in zip(right, retrieval["ids"])) / len(qs))
    # targets are judged from the rows
    bank_vs_kv = [t for t in results["targets"] if t["target"].startswith("parallel: bytes")][0]
    assert bank_vs_kv["met"] == (fullkv >= 10 * get[("parallel", "memory", 5)]["bytes_per_reference"])


def test_rerun_resumes_finished_stages(quick, capsys):
    out, first = quick
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert len(stamps) == 10
    t0 = time.perf_counter()
    assert cli.main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    assert time.perf_counter() - t0 < first / 2
    printed = capsys.readouterr().out
    assert printed.count("done before, reusing") == 10 and "| explicit memory top-5 |" in printed
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["demo", "--scale", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memory3: error: --scale") and "\n" not in err


def test_full_kv_reuse_of_one_reference_equals_rag():
    """One reference placed as precomputed key-values before the question is exactly RAG with
    that reference as text (same tokens, same positions); the store must get both right."""
    tok = Memory3Tokenizer.byte_level()
    model = init_for_training(Memory3Model(Memory3Config.preset("tiny")), seed=1).eval()
    bios = {0: "Kalomi was born in Oslo . Kalomi studied at Yale .", 1: "Bero worked for Acme ."}
    store = FullKVStore(model, tok, dtype=torch.float32)
    store.add(list(bios), list(bios.values()))
    rows = torch.tensor([[0], [1]])
    tails = [tok.encode(" Q: where was Kalomi born ? A: Oslo"), tok.encode(" Q: who employed Bero ? A: Acme")]
    with torch.inference_mode():
        rag, starts = Answerer(model, tok, "rag", 1, texts=bios).logits(rows, tails)
        kv, kv_starts = Answerer(model, tok, "fullkv", 1, kv_store=store).logits(rows, tails)
    assert kv_starts == [0, 0] and starts[0] == 2 + len(tok.encode(" " + bios[0]))
    for b, tail in enumerate(tails):
        torch.testing.assert_close(kv[b, :len(tail)], rag[b, starts[b]:starts[b] + len(tail)], atol=1e-4, rtol=1e-4)
    none, _ = Answerer(model, tok, "none").logits(rows, tails)
    assert not torch.allclose(none[0, :len(tails[0])], kv[0, :len(tails[0])], atol=1e-3)  # the reference matters


def test_full_kv_store_saved_and_memory_mapped_fills_the_same_cache(tmp_path):
    """save() writes the rows to one file and reads them back memory-mapped (the bank's kind
    of storage); a cache filled from it holds the head, then each reference's key-values in
    retrieval order, exactly as computed (k, v of every layer)."""
    tok = Memory3Tokenizer.byte_level()
    model = init_for_training(Memory3Model(Memory3Config.preset("tiny")), seed=4).eval()
    bios = {3: "Kalomi was born in Oslo .", 7: "Bero worked for Acme in Rome ."}
    store = FullKVStore(model, tok, dtype=torch.float32)
    store.add(list(bios), list(bios.values()))
    ram = model.new_cache(1, 64)
    n = store.fill(ram, 0, [7, -1, 3])
    path = store.save(tmp_path / "kv")
    assert path.stat().st_size == store.tokens.numel() * 4 and store.path == path
    with pytest.raises(ValueError, match="add every reference before save"):
        store.add([9], ["Tina studied at Yale ."])
    mapped = model.new_cache(1, 64)
    assert store.fill(mapped, 0, [7, -1, 3]) == n == store.length([7, -1, 3])
    torch.testing.assert_close(mapped.k, ram.k, rtol=0, atol=0)
    torch.testing.assert_close(mapped.v, ram.v, rtol=0, atol=0)
    # the head and each reference computed alone, as the store's spans hold them
    with torch.inference_mode():
        for row, start in ((7, 2), (3, 2 + store.spans[7].numel())):
            ids = [*model.config.prefix_ids, model.config.bos_id] + tok.encode(" " + bios[row])
            alone = model.new_cache(1, len(ids))
            model(torch.tensor([ids]), cache=alone, kv_lens=torch.tensor([len(ids)], dtype=torch.int32))
            m = len(ids) - 2
            torch.testing.assert_close(mapped.k[:, 0, start:start + m], alone.k[:, 0, 2:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mapped.v[:, 0, start:start + m], alone.v[:, 0, 2:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mapped.k[:, 0, :2], alone.k[:, 0, :2], atol=1e-5, rtol=1e-5)
    assert store.bytes_per_reference() == pytest.approx(
        4 * 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim
        * (store.spans[3].numel() + store.spans[7].numel()) / 2)


def test_answer_logits_only_where_asked_are_the_full_logits_there():
    """logits(at=...) returns the rows of the full logits at each tail's asked positions
    (exact match reads only those), in every mode's layout."""
    tok = Memory3Tokenizer.byte_level()
    model = init_for_training(Memory3Model(Memory3Config.preset("tiny")), seed=6).eval()
    bios = {0: "Kalomi was born in Oslo .", 1: "Bero worked for Acme ."}
    store = FullKVStore(model, tok, dtype=torch.float32)
    store.add(list(bios), list(bios.values()))
    rows = torch.tensor([[0, 1], [1, 0]])
    tails = [tok.encode(" Q: where was Kalomi born ? A: Oslo"), tok.encode(" Q: who ? A: Acme")]
    at = [(3, 2), (len(tails[1]) - 4, 4)]
    with torch.inference_mode():
        for a in (Answerer(model, tok, "rag", 2, texts=bios), Answerer(model, tok, "fullkv", 2, kv_store=store),
                  Answerer(model, tok, "none")):
            full, starts = a.logits(rows, tails)
            some, again = a.logits(rows, tails, at=at)
            assert again == starts
            want = torch.cat([full[b, starts[b] + i:starts[b] + i + n] for b, (i, n) in enumerate(at)])
            torch.testing.assert_close(some, want, atol=1e-5, rtol=1e-5)


def test_explicit_memory_reads_the_retrieved_rows_in_rank_order(tmp_path):
    """Answerer("memory", k) gives the model bank rows [B, k] as memories in retrieval order
    (ranked positions make the order visible): the same logits as the encoder's memories of
    those references handed in directly, and different ones for the reversed order."""
    from memory3.memory.bank import Bank
    from memory3.memory.encoder import encode_texts
    from memory3.memory.manifest import MemoryShape
    from memory3.model import Memories

    tok = Memory3Tokenizer.byte_level()
    c = Memory3Config.preset("tiny", memory_positions="ranked")
    model = init_for_training(Memory3Model(c), seed=2).eval()
    texts = ["Kalomi was born in Oslo .", "Bero worked for Acme .", "Tina studied at Yale ."]
    mem = encode_texts(model, tok, texts)  # [N, L, 2, Hkv, M, D]
    bank = Bank.create(tmp_path / "bank", shape=MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens,
                                                            c.head_dim), fingerprint=model.fingerprint(),
                       codec="fp32", device="cpu", dtype=torch.float32)
    bank.append(["a", "b", "c"], texts, mem.float())
    rows = torch.tensor([[2, 0], [1, 2]])
    tails = [tok.encode(" Q: where was Kalomi born ? A: Oslo"), tok.encode(" Q: who employed Bero ? A: Acme")]
    with torch.inference_mode():
        got, starts = Answerer(model, tok, "memory", 2, bank=bank).logits(rows, tails)
        tokens = torch.full((2, got.shape[1]), c.pad_id)
        for b, t in enumerate(tails):
            tokens[b, :2 + len(t)] = torch.tensor([*c.prefix_ids, c.bos_id, *t])
        ids = rows.to(torch.int32)[:, None].expand(2, 1, 2).contiguous()
        want = model(tokens, Memories.from_stacked(mem, ids))
        flipped = model(tokens, Memories.from_stacked(mem, ids.flip(-1).contiguous()))
        assert MemoryReader(bank, model)(rows, 1).ids.tolist() == ids.tolist()  # fp32 rows: read in place, by row id
        q8 = Bank.create(tmp_path / "int8", shape=bank.shape, fingerprint=model.fingerprint(), codec="int8",
                         device="cpu", dtype=torch.float32)
        q8.append(["a", "b", "c"], texts, mem.float())
        in_place = model(tokens, MemoryReader(q8, model, in_place=True)(rows, 1))
        gathered = model(tokens, MemoryReader(q8, model, in_place=False)(rows, 1))
        q8.close()
    bank.close()
    torch.testing.assert_close(in_place, gathered, atol=1e-4, rtol=1e-4)
    assert starts == [2, 2]
    for b, t in enumerate(tails):
        torch.testing.assert_close(got[b, :2 + len(t)], want[b, :2 + len(t)], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0, :2 + len(tails[0])], flipped[0, :2 + len(tails[0])], atol=1e-3)


def test_time_methods_retrieves_once_and_times_every_method_from_the_same_rows(tmp_path):
    """One (timed) retrieval per question, top-k for the largest k, shared by every method;
    each method gets the same rows, runs once per question and repeat (after a warm-up), in
    an order that rotates, and its TTFT is that retrieval plus its own part."""
    from types import SimpleNamespace

    from memory3.memory.bank import Bank
    from memory3.memory.encoder import encode_texts
    from memory3.memory.manifest import MemoryShape
    from memory3.train.synthetic import Question

    tok = Memory3Tokenizer.byte_level()
    c = Memory3Config.preset("tiny")
    model = init_for_training(Memory3Model(c), seed=3).eval()
    texts = ["Kalomi was born in Oslo .", "Bero worked for Acme .", "Tina studied at Yale ."]
    bank = Bank.create(tmp_path / "bank", shape=MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens,
                                                            c.head_dim), fingerprint=model.fingerprint(),
                       codec="int8", device="cpu", dtype=torch.float32)
    bank.append(["a", "b", "c"], texts, encode_texts(model, tok, texts, progress=False).float())
    store = FullKVStore(model, tok)
    store.add([0, 1, 2], texts)
    calls = []

    class Retriever:
        def retrieve(self, queries, k, **_):
            calls.append((list(queries), k))
            return SimpleNamespace(rows=torch.tensor([[2, 0, 1][:k]]), ids=[["c", "a", "b"][:k]])

    seen = []

    class Recording(Answerer):
        def time_question(self, question, rows, n_decode):
            seen.append((self.mode, self.k, question.prompt, rows.tolist()))
            return super().time_question(question, rows, n_decode)

    answerers = {"none": Recording(model, tok, "none"),
                 **{f"{m}_{k}": Recording(model, tok, m, k, bank=bank, kv_store=store)
                    for m in ("memory", "rag", "fullkv") for k in (1, 2)}}
    qs = [Question("a", "city", "Q: where was Kalomi born ? A:", "Oslo"),
          Question("b", "employer", "Q: who employed Bero ? A:", "Acme")]
    got = time_methods(answerers, qs, Retriever(), n_decode=2, repeats=2)
    calls_timed = list(calls)
    calls = calls_timed
    assert len(calls) == 1 + 2 and all(k == 2 and len(q) == 1 for q, k in calls)  # warm-up + one per question
    rounds = 1 + 2 * 2  # warm-up, then every repeat of every question
    assert len(seen) == rounds * len(answerers) and all(r == [[2, 0]] for *_, r in seen)
    firsts = {seen[i * len(answerers)][:2] for i in range(rounds)}
    assert len(firsts) == rounds  # a different method opens each round
    for name, r in got.items():
        assert r["timed_questions"] == 2 and r["decode_tok_s"] > 0
        assert r["ttft_ms"] >= r["prefill_ms"] > 0
        assert (r["retrieval_ms"] == 0) == (name == "none")
        assert len(r["own_ms"]) == 2 and all(len(x) == 2 and min(x) > 0 for x in r["own_ms"])
        assert r["prefill_ms"] == pytest.approx(statistics.median(t for x in r["own_ms"] for t in x), abs=1e-3)
    # decoding timed on the first decode_questions only
    seen.clear()
    got = time_methods(answerers, qs, Retriever(), n_decode=2, repeats=1, decode_questions=0)
    assert all(r["decode_tok_s"] != r["decode_tok_s"] for r in got.values())  # nan: none timed
    bank.close()


def test_threads_follow_the_idle_cores(monkeypatch):
    """Default threads: the cores less the other jobs' load (this process's own share
    taken out), never below 1 nor above the cores."""
    from memory3.train import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    for load, own, want in ((0.1, 0.0, 2), (0.9, 0.0, 1), (1.2, 0.0, 1), (5.0, 0.0, 1), (2.1, 2.0, 2), (2.9, 1.0, 1)):
        monkeypatch.setattr(demo.os, "getloadavg", lambda load=load: (load, load, load))
        assert demo.idle_cores(own) == want, (load, own)


def test_bank_embedder_embeds_each_text_once():
    from memory3.train.demo import TextCachedEmbedder

    class Counting:
        name, dim, calls = "fake", 3, []

        def spec(self):
            return {"name": self.name, "dim": self.dim}

        def embed(self, texts, *, batch_size=None, progress=False):
            self.calls.append(list(texts))
            return torch.tensor([[len(t), t.count("a"), 1.0] for t in texts])

    inner = Counting()
    cached = TextCachedEmbedder(inner)
    first = cached.embed(["ab", "a", "ab"])
    again = cached.embed(["a", "abc"])
    assert inner.calls == [["ab", "a"], ["abc"]] and cached.spec() == inner.spec()
    torch.testing.assert_close(first, inner.embed(["ab", "a", "ab"]))
    torch.testing.assert_close(again, inner.embed(["a", "abc"]))


def test_ranked_top1_reads_the_bank_in_place(tmp_path):
    """Ranked positions with one memory per chunk: slot 0 is not shifted, so the rows are read
    in place (no gather) with the same logits as the gathered path (a second, empty slot);
    the per-slot rotations cached for one R serve no other R."""
    from memory3.memory.bank import Bank
    from memory3.memory.encoder import encode_texts
    from memory3.memory.manifest import MemoryShape
    from memory3.model import Memories

    tok = Memory3Tokenizer.byte_level()
    c = Memory3Config.preset("tiny", memory_positions="ranked")
    model = init_for_training(Memory3Model(c), seed=5).eval()
    texts = ["Kalomi was born in Oslo .", "Bero worked for Acme .", "Tina studied at Yale ."]
    bank = Bank.create(tmp_path / "bank", shape=MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens,
                                                            c.head_dim), fingerprint=model.fingerprint(),
                       codec="int8", device="cpu", dtype=torch.float32)
    bank.append(["a", "b", "c"], texts, encode_texts(model, tok, texts, progress=False).float())
    reader = MemoryReader(bank, model)
    tokens = torch.tensor([[*c.prefix_ids, c.bos_id, *tok.encode(" Q: where was Kalomi born ? A:")]])
    with torch.inference_mode():
        one = reader(torch.tensor([[0]]), 1)
        assert model._rank_memories(one) is one  # nothing gathered
        got = model(tokens, one)
        padded = model(tokens, reader(torch.tensor([[0, -1]]), 1))
        three = model(tokens, reader(torch.tensor([[0, 2, 1]]), 1))
        two = model(tokens, reader(torch.tensor([[0, 2]]), 1))
        fresh = init_for_training(Memory3Model(c), seed=5).eval()
        want_two = fresh(tokens, reader(torch.tensor([[0, 2]]), 1))
    bank.close()
    torch.testing.assert_close(got, padded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(two, want_two)
    assert not torch.allclose(two, three, atol=1e-3)


def test_paired_differences_and_their_bootstrap_interval():
    """Per question the fastest repeat of a minus b's; the median's percentile-bootstrap
    interval, checked on hand-built differences: a shift of -1 with small spread is "below",
    the same spread around 0 "within noise", and the interval is seeded (same in, same out)."""
    from memory3.train.demo_stats import bootstrap_median, per_question_differences

    a = [[3.0, 2.0, 9.0], [5.0, 4.5, 4.0]]  # a spike (9.0) in one repeat does not count
    b = [[3.5, 3.0, 3.2], [4.0, 6.0, 4.1]]
    assert per_question_differences(a, b) == [-1.0, 0.0]
    with pytest.raises(ValueError, match="same number"):
        per_question_differences([[1.0]], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="same questions"):
        per_question_differences([[1.0]], [])
    below = [-1.0 + 0.01 * (i % 7 - 3) for i in range(60)]  # median -1, all within -1.03..-0.97
    got = bootstrap_median(below)
    assert got["n"] == 60 and got["median"] == pytest.approx(-1.0)
    assert -1.03 <= got["lo"] <= -1.0 <= got["hi"] <= -0.97 and got["verdict"] == "below"
    assert bootstrap_median(below) == got
    centred = [x + 1.0 for x in below]
    assert bootstrap_median(centred)["verdict"] == "within noise"
    assert bootstrap_median([x + 2.0 for x in below])["verdict"] == "above"
    # an even count: the median is the mean of the two middle values
    assert bootstrap_median([1.0, 2.0, 3.0, 10.0])["median"] == 2.5
    # the interval narrows as questions are added (sqrt n): 4x the questions, about half the width
    noisy = [((i * 7919) % 101 - 50) / 50 for i in range(400)]
    wide, narrow = bootstrap_median(noisy[:100]), bootstrap_median(noisy)
    assert 0.3 < (narrow["hi"] - narrow["lo"]) / (wide["hi"] - wide["lo"]) < 0.8
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_median(below, confidence=1.0)


def test_ttft_target_is_met_only_when_both_paired_intervals_are_below_zero():
    """The report's TTFT target reads the stored per-question own parts: memory against full
    KV and against RAG, paired; a memory path faster on every question meets it, one that
    is faster than full KV only in the noise (differences centred on 0) does not."""
    from memory3.train.demo_report import paired_ttft, rows_of, targets

    def method(k, own):
        return {"k": k, "accuracy": 0.5, "ttft_ms": 3.0, "prefill_ms": 2.0, "decode_tok_s": 400.0, "repeats": 2,
                "own_ms": own}

    n = 40
    base = [[2.0 + 0.5 * (i % 7), 2.05 + 0.5 * (i % 7)] for i in range(n)]  # questions differ: pairing matters
    shift = lambda d, wobble=0.0: [[t + d + wobble * ((i * 37) % 11 - 5) / 5 for t in ts]  # noqa: E731
                                   for i, ts in enumerate(base)]
    results = {"retrieval": {"type_only_ceiling_5": 0.3, "questions": 1000}}
    for v, kv_gap in (("parallel", 0.2), ("ranked", 0.0)):
        ev = {"none": method(0, base), "rag_1": method(1, shift(1.0)), "rag_5": method(5, shift(8.0)),
              "memory_1": method(1, base), "memory_5": method(5, shift(0.05)),
              "fullkv_1": method(1, shift(kv_gap, wobble=0.3)), "fullkv_5": method(5, shift(0.05 + kv_gap, 0.3)),
              "rag_text_bytes_per_reference": 150.0, "fullkv_bytes_per_reference": 30000.0}
        results[f"eval-{v}"] = ev
        results[f"bank-{v}"] = {"bytes_per_memory": 2304}
        results[f"train-{v}"] = {"train_seconds": 100.0, "steps": 10}
    results["eval-large"] = {"none": method(0, base)}
    paired = paired_ttft(results)
    got = {(p["variant"], p["k"], p["other"]): p for p in paired}
    assert len(paired) == 8 and all(p["n"] == n for p in paired)
    assert got[("parallel", 1, "fullkv")]["verdict"] == "below"
    assert got[("parallel", 1, "fullkv")]["hi"] < 0 and got[("parallel", 5, "rag")]["median"] == pytest.approx(-7.95)
    assert got[("ranked", 1, "fullkv")]["verdict"] == "within noise"
    checks = [t for t in targets(results, rows_of(results), paired) if "time to first token" in t["target"]]
    assert [(t["target"][:8], t["met"]) for t in checks] == [("parallel", True), ("parallel", True),
                                                            ("ranked: ", False), ("ranked: ", False)]


def test_timed_first_token_is_the_answer_logits_of_every_mode(tmp_path):
    """What time_question times (head from the prefix cache, bank rows in place, stored
    key-values from the memory-mapped store) ends in the logits the scored pass gives at the
    prompt's last token, in every mode and both layouts."""
    from memory3.memory.bank import Bank
    from memory3.memory.encoder import encode_texts
    from memory3.memory.manifest import MemoryShape
    from memory3.train.synthetic import Question

    tok = Memory3Tokenizer.byte_level()
    texts = ["Kalomi was born in Oslo .", "Bero worked for Acme .", "Tina studied at Yale ."]
    q = Question("a", "city", "Q: where was Kalomi born ? A:", "Oslo")
    prompt = tok.encode(" " + q.prompt)
    rows = torch.tensor([[2, 0, 1]])
    for layout in ("parallel", "ranked"):
        c = Memory3Config.preset("tiny", memory_positions=layout)
        model = init_for_training(Memory3Model(c), seed=7).eval()
        bank = Bank.create(tmp_path / layout, shape=MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens,
                                                                c.head_dim), fingerprint=model.fingerprint(),
                           codec="int8", device="cpu", dtype=torch.float32)
        bank.append(["a", "b", "c"], texts, encode_texts(model, tok, texts, progress=False).float())
        store = FullKVStore(model, tok, dtype=torch.float32)
        store.add([0, 1, 2], texts)
        store.save(tmp_path / f"kv-{layout}")
        for mode, k in (("none", 0), ("memory", 1), ("memory", 3), ("rag", 3), ("fullkv", 3)):
            a = Answerer(model, tok, mode, k, bank=bank, texts=dict(enumerate(texts)), kv_store=store)
            a.time_question(q, rows, 2)
            with torch.inference_mode():
                want, starts = a.logits(rows, [prompt])
            torch.testing.assert_close(a.first_logits, want[0, starts[0] + len(prompt) - 1], atol=1e-4, rtol=1e-4,
                                       msg=f"{layout} {mode} top-{k}")
        bank.close()
