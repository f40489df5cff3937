"""A deterministic synthetic knowledge base: fictional people, their biographies, questions.

Built to the findings of ``TRAINING.md`` (what taught a tiny model to read memory):

- regular biographies: one sentence per attribute, the name repeated in every sentence,
  sentence order shuffled, each sentence drawn from several templates;
- questions whose answer is one word (``Q: where was Kalomi born ? A:`` -> `` Lisbon``);
- names of one word from a fixed pool (``name_words=1``; the pool is small enough for a
  BPE trained on this text to make every name one token) or first + last name
  (``name_words=2``, held-out full names never occur in training);
- *train* people (bios are training text and knowledge base) and *held-out* people (bios
  exist only in the knowledge base), plus a stream of a **fresh random person per training
  sample**: a fixed pool of people gets memorised in the weights and memory is ignored.

Everything is a pure function of the config's seed (string-seeded ``random.Random``, which
does not depend on ``PYTHONHASHSEED``).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a person: its values (one word each), the sentences that state
    it in a biography and the questions that ask for it (``{name}``, ``{value}`` filled)."""
    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "city",
        ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Prague", "Madrid", "Berlin",
         "Paris", "Rome", "Athens", "Tokyo", "Seoul", "Delhi", "Quito", "Nairobi", "Havana",
         "Warsaw", "Bogota"),
        ("{name} was born in {value} .", "{name} 's birthplace is {value} .",
         "{name} came into the world in {value} .", "the birthplace of {name} is {value} ."),
        ("where was {name} born ?", "what is the birthplace of {name} ?",
         "in which city was {name} born ?"),
    ),
    Attribute(
        "year",
        tuple(str(y) for y in range(1950, 1980)),
        ("{name} was born in the year {value} .", "{name} 's year of birth is {value} .",
         "the birth year of {name} is {value} .", "{name} 's birth year was {value} ."),
        ("in what year was {name} born ?", "what is the birth year of {name} ?",
         "when was {name} born ?"),
    ),
    Attribute(
        "university",
        ("Harvard", "Oxford", "Cambridge", "Stanford", "Yale", "Princeton", "Columbia",
         "Cornell", "Berkeley", "Caltech", "Edinburgh", "Toronto", "Sorbonne", "Heidelberg",
         "Bologna"),
        ("{name} studied at {value} .", "{name} graduated from {value} .",
         "{name} attended {value} .", "the university of {name} was {value} ."),
        ("where did {name} study ?", "which university did {name} attend ?",
         "where did {name} graduate ?"),
    ),
    Attribute(
        "field",
        ("physics", "chemistry", "biology", "history", "economics", "medicine", "law",
         "music", "geology", "linguistics", "philosophy", "astronomy"),
        ("{name} worked in {value} .", "{name} 's field is {value} .",
         "{name} specialised in {value} .", "the field of {name} is {value} ."),
        ("what field did {name} work in ?", "what is the field of {name} ?",
         "what did {name} specialise in ?"),
    ),
    Attribute(
        "employer",
        ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Stark",
         "Wayne", "Cyberdyne", "Tyrell", "Soylent", "Massive", "Aperture", "Oscorp"),
        ("{name} was employed by {value} .", "{name} worked for {value} .",
         "{name} 's employer was {value} .", "the employer of {name} was {value} ."),
        ("who employed {name} ?", "which company did {name} work for ?",
         "who was the employer of {name} ?"),
    ),
)
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and options of the synthetic knowledge base.

    ``name_words=1``: a pool of ``n_names`` one-word names, shared by train, held-out and
    fresh people (names are labels, facts are random). ``name_words=2``: ``n_names`` first
    names x ``n_names`` last names; full names are unique, and the held-out ones are never
    drawn for training."""
    n_train: int = 1000
    n_heldout: int = 300
    name_words: int = 1
    n_names: int = 1500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name_words not in (1, 2):
            raise ValueError(f"name_words must be 1 or 2, got {self.name_words}")
        if self.n_train < 0 or self.n_heldout < 0:
            raise ValueError(f"n_train and n_heldout must be >= 0, got {self.n_train}, {self.n_heldout}")
        if self.n_names < 2:
            raise ValueError(f"n_names must be >= 2, got {self.n_names}")
        capacity = self.n_names ** self.name_words
        if self.n_train + self.n_heldout > capacity:
            raise ValueError(
                f"n_train + n_heldout = {self.n_train + self.n_heldout} people need unique names, "
                f"but name_words={self.name_words} with n_names={self.n_names} gives {capacity}")


@dataclass(frozen=True)
class Person:
    id: str                      # "train-00012", "heldout-00003", or "fresh-<n>"
    name: str
    facts: dict[str, str] = field(hash=False)   # attribute name -> value


@dataclass(frozen=True)
class Question:
    person_id: str
    attribute: str
    prompt: str                  # "Q: where was Kalomi born ? A:"
    answer: str                  # "Lisbon"; the text continues with " " + answer

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"

    def to_json(self) -> dict:
        return {"person_id": self.person_id, "attribute": self.attribute,
                "prompt": self.prompt, "answer": self.answer}


def _rng(seed: int, *tags: object) -> random.Random:
    return random.Random(":".join(str(t) for t in (seed, *tags)))


def make_names(n: int, seed: int, tag: str = "names") -> list[str]:
    """``n`` distinct capitalised two- or three-syllable invented words, e.g. ``Kalomi``."""
    rng = _rng(seed, tag)
    capacity = (len(_ONSETS) * len(_VOWELS)) ** 2 * (1 + len(_ONSETS) * len(_VOWELS))
    if n > capacity:
        raise ValueError(f"n_names must be <= {capacity}, got {n}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        syllables = rng.choice((2, 3, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            names.append(word.capitalize())
    return names


def random_facts(rng: random.Random) -> dict[str, str]:
    return {a.name: rng.choice(a.values) for a in ATTRIBUTES}


def biography(person: Person, rng: random.Random) -> str:
    """One sentence per attribute, template drawn per sentence, sentence order shuffled."""
    sentences = [rng.choice(a.statements).format(name=person.name, value=person.facts[a.name])
                 for a in ATTRIBUTES]
    rng.shuffle(sentences)
    return " ".join(sentences)


def question(person: Person, attribute: str, rng: random.Random) -> Question:
    template = rng.choice(ATTRIBUTE_BY_NAME[attribute].questions)
    return Question(person.id, attribute, "Q: " + template.format(name=person.name) + " A:",
                    person.facts[attribute])


def questions(person: Person, rng: random.Random) -> list[Question]:
    """One question per attribute, in shuffled order."""
    qs = [question(person, a.name, rng) for a in ATTRIBUTES]
    rng.shuffle(qs)
    return qs


class SyntheticKnowledgeBase:
    """The people, their knowledge-base biographies and questions for one config.

    ``train_people`` and ``heldout_people`` have unique names and fixed facts; each has one
    fixed biography (``reference_text``) that is its knowledge-base reference."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.config = config
        c = config
        if c.name_words == 1:
            self.first_names = make_names(c.n_names, c.seed)
            self.last_names: list[str] = []
        else:
            pool = make_names(2 * c.n_names, c.seed)
            self.first_names, self.last_names = pool[:c.n_names], pool[c.n_names:]
        rng = _rng(c.seed, "people")
        names = self._unique_names(c.n_train + c.n_heldout, rng)
        self.train_people = [Person(f"train-{i:05d}", names[i], random_facts(rng)) for i in range(c.n_train)]
        self.heldout_people = [Person(f"heldout-{i:05d}", names[c.n_train + i], random_facts(rng))
                               for i in range(c.n_heldout)]
        self._heldout_names = frozenset(p.name for p in self.heldout_people)
        self._by_id = {p.id: p for p in self.people}

    def _unique_names(self, n: int, rng: random.Random) -> list[str]:
        if self.config.name_words == 1:
            return rng.sample(self.first_names, n)
        picks = rng.sample(range(len(self.first_names) * len(self.last_names)), n)
        k = len(self.last_names)
        return [f"{self.first_names[i // k]} {self.last_names[i % k]}" for i in picks]

    @property
    def people(self) -> list[Person]:
        return self.train_people + self.heldout_people

    def person(self, person_id: str) -> Person:
        return self._by_id[person_id]

    def vocabulary(self) -> list[str]:
        """Every name word and attribute value: the words a tokenizer should keep whole."""
        return self.first_names + self.last_names + [v for a in ATTRIBUTES for v in a.values]

    def reference_text(self, person: Person) -> str:
        return biography(person, _rng(self.config.seed, "reference", person.id))

    def references(self) -> list[dict]:
        """The knowledge base: ``{"id", "text", "source"}`` per person, train then held-out."""
        return [{"id": p.id, "text": self.reference_text(p), "source": p.id.split("-")[0]}
                for p in self.people]

    def questions_for(self, people: Sequence[Person], tag: str = "eval") -> list[Question]:
        """One question per attribute per person, deterministic in ``tag``."""
        out: list[Question] = []
        for p in people:
            out += questions(p, _rng(self.config.seed, "questions", tag, p.id))
        return out

    def training_documents(self, epoch: int = 0) -> Iterator[str]:
        """Training text about the *train* people: per person, a biography rendered afresh
        for ``epoch`` followed by its questions with answers. Held-out people never appear."""
        for p in self.train_people:
            rng = _rng(self.config.seed, "document", epoch, p.id)
            qa = " ".join(q.text + " ." for q in questions(p, rng))
            yield biography(p, rng) + " " + qa

    def fresh_people(self, seed: int) -> Iterator[Person]:
        """An endless stream of random people (random name from the pool, random facts):
        one per training sample, so there is nothing to memorise. With two-word names the
        held-out people's full names are never drawn."""
        rng = _rng(self.config.seed, "fresh", seed)
        n = 0
        while True:
            name = rng.choice(self.first_names)
            if self.last_names:
                name += " " + rng.choice(self.last_names)
                if name in self._heldout_names:
                    continue
            yield Person(f"fresh-{n}", name, random_facts(rng))
            n += 1

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``knowledge_base.jsonl`` (what the bank encodes), ``questions_train.jsonl``,
        ``questions_heldout.jsonl`` and ``config.json``; return their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"knowledge_base": out / "knowledge_base.jsonl",
                 "questions_train": out / "questions_train.jsonl",
                 "questions_heldout": out / "questions_heldout.jsonl",
                 "config": out / "config.json"}
        write_jsonl(paths["knowledge_base"], self.references())
        write_jsonl(paths["questions_train"], (q.to_json() for q in self.questions_for(self.train_people)))
        write_jsonl(paths["questions_heldout"], (q.to_json() for q in self.questions_for(self.heldout_people)))
        paths["config"].write_text(json.dumps(self.config.__dict__, indent=2) + "\n")
        return paths


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def type_only_accuracy(right: str, candidates: Sequence[str]) -> float:
    """Expected exact match of a reader that knows only the asked attribute *type*: it
    spreads its answer evenly over the values of that type found in ``candidates`` (one per
    memory) and greedy decoding takes the most frequent one, ties broken at random."""
    if not candidates:
        return 0.0
    counts = Counter(candidates)
    top = max(counts.values())
    winners = [v for v, c in counts.items() if c == top]
    return 1.0 / len(winners) if right in winners else 0.0


def type_only_ceiling(kb: SyntheticKnowledgeBase, questions_: Sequence[Question],
                      memories: Sequence[Sequence[str]]) -> float:
    """Mean :func:`type_only_accuracy` over questions, given for each the ids of the people
    whose memories the reader sees (e.g. the retriever's top-5): the accuracy a model
    reaches by type matching alone, without binding the question's name to a memory."""
    if len(questions_) != len(memories):
        raise ValueError(f"memories must have one id list per question ({len(questions_)}), got {len(memories)}")
    if not questions_:
        raise ValueError("questions_ must not be empty")
    total = 0.0
    for q, ids in zip(questions_, memories):
        total += type_only_accuracy(q.answer, [kb.person(i).facts[q.attribute] for i in ids])
    return total / len(questions_)


def simulated_type_only_ceiling(n_memories: int = 5, n_samples: int = 20000, seed: int = 0) -> float:
    """The type-only ceiling with the right memory plus ``n_memories - 1`` random other
    people, over the attributes in equal shares (TRAINING.md: 0.303 with 5 memories)."""
    if n_memories < 1:
        raise ValueError(f"n_memories must be >= 1, got {n_memories}")
    rng = _rng(seed, "ceiling")
    total = 0.0
    for _ in range(n_samples):
        attribute = rng.choice(ATTRIBUTES)
        right = rng.choice(attribute.values)
        others = [rng.choice(attribute.values) for _ in range(n_memories - 1)]
        total += type_only_accuracy(right, [right, *others])
    return total / n_samples
