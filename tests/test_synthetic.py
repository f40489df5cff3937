"""The synthetic knowledge base: deterministic, held-out people kept out of training, bios
regular, and the type-only ceiling of TRAINING.md."""
import itertools
import json
import random

import pytest

from memory3.train.synthetic import (
    ATTRIBUTES, SyntheticConfig, SyntheticKnowledgeBase, biography, simulated_type_only_ceiling,
    type_only_accuracy, type_only_ceiling)

SMALL = SyntheticConfig(n_train=200, n_heldout=50, n_names=300, seed=3)
TWO_WORD = SyntheticConfig(n_train=200, n_heldout=50, name_words=2, n_names=20, seed=3)


def snapshot(kb: SyntheticKnowledgeBase) -> dict:
    return {
        "refs": kb.references(),
        "questions": [q.to_json() for q in kb.questions_for(kb.heldout_people)],
        "docs": list(kb.training_documents(epoch=1)),
        "fresh": [(p.name, p.facts) for p in itertools.islice(kb.fresh_people(7), 50)],
    }


@pytest.mark.parametrize("config", [SMALL, TWO_WORD], ids=["one-word", "two-word"])
def test_generator_is_deterministic(config):
    assert snapshot(SyntheticKnowledgeBase(config)) == snapshot(SyntheticKnowledgeBase(config))
    other = SyntheticConfig(**{**config.__dict__, "seed": config.seed + 1})
    assert snapshot(SyntheticKnowledgeBase(other))["refs"] != snapshot(SyntheticKnowledgeBase(config))["refs"]


def test_fresh_streams_differ_by_seed_and_vary_facts():
    kb = SyntheticKnowledgeBase(SMALL)
    a = [(p.name, p.facts) for p in itertools.islice(kb.fresh_people(0), 200)]
    b = [(p.name, p.facts) for p in itertools.islice(kb.fresh_people(1), 200)]
    assert a != b
    for attr in ATTRIBUTES:      # facts are random per person, not drawn from a fixed pool
        assert len({facts[attr.name] for _, facts in a}) > len(attr.values) // 2


@pytest.mark.parametrize("config", [SMALL, TWO_WORD], ids=["one-word", "two-word"])
def test_heldout_people_only_in_the_knowledge_base(config):
    kb = SyntheticKnowledgeBase(config)
    names = [p.name for p in kb.people]
    assert len(set(names)) == len(names) == config.n_train + config.n_heldout
    docs = " ".join(kb.training_documents())
    for p in kb.heldout_people:
        assert f" {p.name} " not in f" {docs} "
    if config.name_words == 2:   # full names of held-out people never drawn for training
        heldout = {p.name for p in kb.heldout_people}
        assert not heldout & {p.name for p in itertools.islice(kb.fresh_people(0), 20000)}
    sources = {r["id"]: r["source"] for r in kb.references()}
    assert sum(s == "heldout" for s in sources.values()) == config.n_heldout


def test_biography_is_regular():
    kb = SyntheticKnowledgeBase(SMALL)
    rng = random.Random(0)
    orders = set()
    for p in kb.people[:100]:
        bio = biography(p, rng)
        sentences = [s.strip() for s in bio.split(" .") if s.strip()]
        assert len(sentences) == len(ATTRIBUTES)
        assert all(p.name in s for s in sentences)          # the name in every sentence
        for attr in ATTRIBUTES:                               # every fact stated once
            assert sum(s.endswith(" " + p.facts[attr.name]) for s in sentences) >= 1
        orders.add(tuple(next(a.name for a in ATTRIBUTES if s.endswith(" " + p.facts[a.name]))
                         for s in sentences))
    assert len(orders) > 10                                   # order shuffled


def test_questions_have_one_word_answers_from_the_facts():
    kb = SyntheticKnowledgeBase(SMALL)
    qs = kb.questions_for(kb.heldout_people)
    assert len(qs) == len(ATTRIBUTES) * SMALL.n_heldout
    for q in qs:
        p = kb.person(q.person_id)
        assert q.answer == p.facts[q.attribute] and " " not in q.answer
        assert q.prompt.startswith("Q: ") and q.prompt.endswith(" A:") and p.name in q.prompt
        assert q.text == q.prompt + " " + q.answer
    assert len({q.prompt.split(p.name)[0] for q in qs for p in [kb.person(q.person_id)]}) > 5


def test_write_files(tmp_path):
    kb = SyntheticKnowledgeBase(SMALL)
    paths = kb.write(tmp_path)
    refs = [json.loads(line) for line in paths["knowledge_base"].read_text().splitlines()]
    assert refs == kb.references() and len({r["id"] for r in refs}) == len(refs)
    held = [json.loads(line) for line in paths["questions_heldout"].read_text().splitlines()]
    assert {q["person_id"] for q in held} == {p.id for p in kb.heldout_people}
    assert json.loads(paths["config"].read_text())["seed"] == SMALL.seed


def test_type_only_accuracy_cases():
    assert type_only_accuracy("Oslo", ["Oslo"]) == 1.0
    assert type_only_accuracy("Oslo", ["Oslo", "Rome", "Lima", "Cairo", "Paris"]) == pytest.approx(0.2)
    assert type_only_accuracy("Oslo", ["Oslo", "Oslo", "Lima", "Cairo", "Paris"]) == 1.0
    assert type_only_accuracy("Oslo", ["Oslo", "Rome", "Rome", "Cairo", "Paris"]) == 0.0
    assert type_only_accuracy("Oslo", ["Oslo", "Oslo", "Rome", "Rome", "Paris"]) == pytest.approx(0.5)


def test_type_only_ceiling_matches_training_md():
    assert simulated_type_only_ceiling(1, n_samples=2000) == 1.0
    assert simulated_type_only_ceiling(5, n_samples=20000) == pytest.approx(0.303, abs=0.015)
    kb = SyntheticKnowledgeBase(SMALL)
    qs = kb.questions_for(kb.heldout_people)
    assert type_only_ceiling(kb, qs, [[q.person_id] for q in qs]) == 1.0
    rng = random.Random(0)
    others = [[q.person_id] + [p.id for p in rng.sample(kb.train_people, 4)] for q in qs]
    assert type_only_ceiling(kb, qs, others) == pytest.approx(0.303, abs=0.04)
    with pytest.raises(ValueError, match="memories"):
        type_only_ceiling(kb, qs, others[:-1])


def test_config_errors():
    with pytest.raises(ValueError, match="name_words"):
        SyntheticConfig(name_words=3)
    with pytest.raises(ValueError, match="unique names"):
        SyntheticConfig(n_train=100, n_heldout=10, n_names=50)
