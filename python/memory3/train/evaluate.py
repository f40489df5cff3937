"""Exact match on the synthetic knowledge base, the measurements of TRAINING.md's table:
no memory, k memories (the right person's biography among k - 1 others), k biographies as
text in the prompt (RAG), all with the knowledge base's own biographies.

A question is right when greedy decoding produces its answer: teacher-forced, the argmax at
every answer position is the answer token. (The demo measures the same with the real
retriever over the whole bank; here the memories are handed in, as in TRAINING.md.)
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from memory3.memory.encoder import encode_references
from memory3.model import Memories, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer
from memory3.train.synthetic import Person, Question, SyntheticKnowledgeBase
from memory3.train.tasks import n_chunks, pad_rows

MODES = ("none", "memory", "rag")


@torch.no_grad()
def exact_match(model: Memory3Model, tokenizer: Memory3Tokenizer, kb: SyntheticKnowledgeBase,
                people: Sequence[Person], *, mode: str = "memory", n_refs: int = 1, wrong: bool = False,
                right_first: bool = False, batch_size: int = 64, seed: int = 0) -> float:
    """Share of the people's questions answered exactly. ``mode``: "none" (no memory),
    "memory" (n_refs memories) or "rag" (n_refs biographies before the question). ``wrong``:
    the right biography left out (n_refs others only), the control of TRAINING.md.
    ``right_first``: the right one in slot 0 (a retriever's top-1; matters with ranked
    memory positions), else the order is shuffled."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if n_refs < 1:
        raise ValueError(f"n_refs must be >= 1, got {n_refs}")
    c = model.config
    pool = kb.people
    if mode != "none" and len(pool) <= n_refs:
        raise ValueError(f"need more than n_refs={n_refs} people in the knowledge base, have {len(pool)}")
    rng = random.Random(f"eval:{seed}")
    items: list[tuple[Question, list[Person]]] = []
    for q in kb.questions_for(people):
        right = kb.person(q.person_id)
        shown = [] if mode == "none" else ([] if wrong else [right])
        while mode != "none" and len(shown) < n_refs:
            p = rng.choice(pool)
            if p.name != right.name and p not in shown:
                shown.append(p)
        rng.shuffle(shown)
        if right_first and not wrong and shown:
            shown.remove(right)
            shown.insert(0, right)
        items.append((q, shown))
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(items), batch_size):
            correct += _score(model, tokenizer, kb, items[start:start + batch_size], mode)
    finally:
        model.train(was_training)
    return correct / len(items)


def _score(model, tokenizer, kb, items, mode) -> int:
    c = model.config
    head = list(c.prefix_ids) + [c.bos_id]
    rows, spans = [], []
    for q, shown in items:
        text = []
        if mode == "rag":
            text = tokenizer.encode(" " + " ".join(kb.reference_text(p) for p in shown))
        prompt, answer = head + text + tokenizer.encode(" " + q.prompt), tokenizer.encode(" " + q.answer)
        rows.append(prompt + answer)
        spans.append((len(prompt), len(answer)))
    tokens = pad_rows(rows, c.pad_id).to(model.device)
    memories = None
    if mode == "memory":
        refs = [tokenizer.reference_ids(kb.reference_text(p), c.ref_len) for _, shown in items for p in shown]
        lens = torch.tensor([len(r) for r in refs], device=model.device)
        memory = encode_references(model, pad_rows(refs, c.pad_id).to(model.device), lens)
        R = len(items[0][1])
        ids = torch.arange(len(refs), dtype=torch.int32, device=model.device).view(len(items), 1, R)
        memories = Memories.from_stacked(memory, ids.expand(-1, n_chunks(c, tokens.shape[1]), -1).contiguous())
    pred = model(tokens, memories).argmax(-1)
    correct = 0
    for b, (start, n) in enumerate(spans):
        correct += bool(torch.equal(pred[b, start - 1:start - 1 + n], tokens[b, start:start + n]))
    return correct
