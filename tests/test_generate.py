"""memory3.generate: the retrieval schedule, equality with a plain forward on the same
memories, ragged batches, prefetch on/off, sampling, stop strings, streaming, overlap filter."""
from __future__ import annotations

import pytest
import torch

from generate_fixtures import reference_texts, retriever_for, random_bank, tiny_model
from memory3.generate import _Run, generate, sample_next, stream_generate
from memory3.model import Memories, Memory3Tokenizer
from memory3.retrieval_schedule import generated_chunk_query, prompt_chunk_spans

CS = 8  # chunk size of the test model (the paper's 64 would need long prompts)
PROMPTS = ["Item 3 is blue", "What was made in Oslo in 1921? It"]  # 17 and 36 context tokens


@pytest.fixture(scope="module")
def model():
    return tiny_model(chunk_size=CS)


@pytest.fixture(scope="module")
def tokenizer():
    return Memory3Tokenizer.byte_level()


@pytest.fixture(scope="module")
def bank(model, tmp_path_factory):
    return random_bank(tmp_path_factory.mktemp("gen") / "bank", model, reference_texts(40))


def run(model, tokenizer, prompts, retriever, n=30, **kw):
    args = dict(max_new_tokens=n, temperature=0.0, top_p=1.0, seed=None, stop=(), overlap_threshold=2 / 3,
                candidates=None, prefetch=False)
    args.update(kw)
    r = _Run(model, tokenizer, prompts, retriever, *args.values())
    pieces = list(r.pieces())
    return r, pieces


def expected_queries(ids: list[int], prompt_len: int, decode) -> list[str | None]:
    """The schedule written out: prompt chunks their own text, then per generated chunk the
    8 tokens before it, None (kept) for the first one."""
    out = [decode(ids[s:e]) for s, e in prompt_chunk_spans(prompt_len, 1, CS)]
    fed = len(ids) - 1  # the last sampled token is never fed, so its chunk is not read
    for start in range(1 + len(out) * CS, fed, CS):
        span = generated_chunk_query(start, prompt_len, CS)
        out.append(None if span is None else decode(ids[span[0]:span[1]]))
    return out


@pytest.mark.parametrize("prefetch", [False, True])
def test_schedule_queries_each_chunk_as_specified(model, tokenizer, bank, prefetch):
    retriever = retriever_for(bank)
    r, _ = run(model, tokenizer, PROMPTS, retriever, n=30, prefetch=prefetch)
    for b, prompt in enumerate(PROMPTS):
        n = len(tokenizer.context_ids(prompt))
        got = [(rec.chunk, rec.query) for rec in r.retrieval[b]]
        want = list(enumerate(expected_queries(r.ids[b], n, tokenizer.decode)))
        assert got == want
    # the retriever saw exactly these queries: every prompt chunk in one call, then the rest
    n_prompt = [len(prompt_chunk_spans(len(ids), 1, CS)) for ids in r.prompt_ids]
    assert retriever.calls[0] == [rec.query for b in range(2) for rec in r.retrieval[b][: n_prompt[b]]]
    later = [rec.query for b in range(2) for rec in r.retrieval[b][n_prompt[b]:] if rec.query is not None]
    assert sorted(q for call in retriever.calls[1:] for q in call) == sorted(later)


def test_prompt_on_a_chunk_boundary_keeps_its_last_chunk(model, tokenizer, bank):
    prompt = "x" * (2 * CS - 1)  # <s> + 15 bytes = 2 full chunks
    r, _ = run(model, tokenizer, prompt, retriever_for(bank), n=3 * CS)
    recs = r.retrieval[0]
    assert [x.chunk for x in recs] == [0, 1, 2, 3, 4]  # fed indices 0..39: chunk 4 starts at 33
    assert recs[1].query == "x" * CS
    assert recs[2].query is None and recs[2].rows == recs[1].rows  # first generated chunk keeps chunk 1's
    assert recs[3].query == tokenizer.decode(r.ids[0][1 + 2 * CS : 1 + 3 * CS])
    assert recs[4].query == tokenizer.decode(r.ids[0][1 + 3 * CS : 1 + 4 * CS])


@pytest.mark.parametrize("prefetch", [False, True])
def test_generation_equals_a_plain_forward_on_the_same_memories(model, tokenizer, bank, prefetch):
    """Decode with the KV cache and per-chunk working sets == one forward without cache over
    the whole text, handed every chunk's retrieved memories (read from the retrieval record)."""
    r, _ = run(model, tokenizer, PROMPTS, retriever_for(bank), n=30, prefetch=prefetch)
    R = model.config.memories_per_chunk
    for b in range(2):
        fed = r.ids[b][:-1]
        n = len(r.prompt_ids[b])
        rows = torch.tensor([rec.rows for rec in r.retrieval[b]])[None]  # [1, C, R]
        assert rows.shape[1] == (len(fed) - 1 + CS - 1) // CS and (rows >= 0).all()
        mem = bank.gather(rows)  # [L, 2, 1, C, R, Hkv, M, D]
        ids = torch.arange(rows.numel(), dtype=torch.int32).view(1, -1, R)
        memories = Memories([m[0].flatten(0, 2) for m in mem], [m[1].flatten(0, 2) for m in mem], ids)
        with torch.no_grad():
            logits = model(torch.tensor([fed]), memories)[0]
        assert logits[n - 1 :].argmax(-1).tolist() == r.ids[b][n:]


def test_memory_changes_the_output(model, tokenizer, bank):
    with_memory = generate(model, tokenizer, PROMPTS, retriever=retriever_for(bank), max_new_tokens=20)
    without = generate(model, tokenizer, PROMPTS, max_new_tokens=20)
    assert with_memory != without


def test_batch_equals_one_at_a_time(model, tokenizer, bank):
    retriever = retriever_for(bank)
    batched = generate(model, tokenizer, PROMPTS, retriever=retriever, max_new_tokens=20)
    single = [generate(model, tokenizer, p, retriever=retriever, max_new_tokens=20) for p in PROMPTS]
    assert batched == single


def test_overlap_filter_drops_a_reference_inside_the_query(model, tokenizer, tmp_path):
    """Eq. 6 is normalized by the reference's length: a reference contained in a query chunk
    has overlap 1 and is dropped at the default 2/3; without the filter it is the top hit."""
    texts = reference_texts(20) + ["made in "]  # ref-20 is chunk 3's query text of the prompt
    bank = random_bank(tmp_path / "bank", model, texts)
    retriever = retriever_for(bank)
    prompt = texts[5]  # "Item 5 is grey and was made in Kobe in 1935."
    _, kept = generate(model, tokenizer, prompt, retriever=retriever, max_new_tokens=2, overlap_threshold=None,
                       return_retrieval=True)
    _, filtered = generate(model, tokenizer, prompt, retriever=retriever, max_new_tokens=2, return_retrieval=True)
    assert kept[3].query == "made in " and kept[3].ids[0] == "ref-20"
    assert filtered[3].query == "made in " and "ref-20" not in filtered[3].ids
    assert len(filtered[3].ids) == model.config.memories_per_chunk
    assert [k.ids for k in kept[:3]] == [f.ids for f in filtered[:3]]  # other chunks unaffected


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(model, tokenizer, bank):
    retriever = retriever_for(bank)
    kw = dict(retriever=retriever, max_new_tokens=16, temperature=1.0)
    a = generate(model, tokenizer, PROMPTS, seed=7, **kw)
    assert a == generate(model, tokenizer, PROMPTS, seed=7, **kw)
    assert a != generate(model, tokenizer, PROMPTS, seed=8, **kw)
    greedy = generate(model, tokenizer, PROMPTS, retriever=retriever, max_new_tokens=16)
    assert generate(model, tokenizer, PROMPTS, seed=1, top_p=1e-6, **kw) == greedy
    assert a != greedy


def test_sample_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.75, g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut
    draws = {sample_next(logits, 1.0, 0.85, g).item() for _ in range(300)}
    assert draws == {0, 1, 2}


@pytest.fixture(scope="module")
def ascii_model(tokenizer):
    """The tiny model made to write lowercase letters and spaces (readable stop strings)."""
    m = tiny_model(chunk_size=CS, seed=3)
    keep = [tokenizer.tokenizer.token_to_id(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] + [tokenizer.encode(" ")[0]]
    with torch.no_grad():
        w = m.output.weight.clone()
        m.output.weight.zero_()
        m.output.weight[keep] = 20 * w[keep]
    return m


def test_stop_string_cuts_the_text(ascii_model, tokenizer):
    full = generate(ascii_model, tokenizer, "Hello", max_new_tokens=40)
    assert len(full) == 40 and full.isascii()
    start = next(i for i in range(5, len(full) - 2) if full[:i].find(full[i : i + 2]) < 0)
    stop = full[start : start + 2]
    assert generate(ascii_model, tokenizer, "Hello", max_new_tokens=40, stop=["never", stop]) == full[:start]
    pieces = list(stream_generate(ascii_model, tokenizer, "Hello", max_new_tokens=40, stop=stop))
    assert "".join(p.text for p in pieces) == full[:start]


def test_streaming_pieces_join_to_the_text(model, tokenizer, bank):
    retriever = retriever_for(bank)
    texts = generate(model, tokenizer, PROMPTS, retriever=retriever, max_new_tokens=24)
    pieces = list(stream_generate(model, tokenizer, PROMPTS, retriever=retriever, max_new_tokens=24))
    assert len(pieces) > 4
    assert ["".join(p.text for p in pieces if p.index == b) for b in range(2)] == texts
    seen = []
    generate(model, tokenizer, PROMPTS, retriever=retriever, max_new_tokens=24, on_text=lambda i, t: seen.append((i, t)))
    assert seen == [(p.index, p.text) for p in pieces]


def test_bad_arguments_are_named(model, tokenizer, bank):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(model, tokenizer, "x", max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, tokenizer, "x", top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, tokenizer, "x", temperature=-1)
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        generate(model, tokenizer, [])
    with pytest.raises(ValueError, match="overlap_threshold must be in"):
        generate(model, tokenizer, "x", retriever=retriever_for(bank), overlap_threshold=2.0)
    other = tiny_model(chunk_size=CS, seed=1)
    with pytest.raises(ValueError, match="was encoded by a model with fingerprint"):
        generate(other, tokenizer, "x", retriever=retriever_for(bank))
