"""What a training step reads: a `Batch` per (step, micro-step, rank) for each recipe.

- `WarmupTask`: plain language modelling on token shards, no memory (paper stage 1).
- `ContinualTask`: the same text, every 64-token chunk retrieves one reference (leaking
  references, overlap > 0.9 by eq. 6, skipped) and attends to the references of chunks
  c-4..c, encoded by the current model in the same forward pass (paper stage 2).
- `SyntheticTask`: the single-stage recipe of TRAINING.md on the synthetic knowledge base:
  a fresh random person per sample, memories from step 0 (curriculum 1 -> R memories),
  a share of RAG steps (biographies as text), loss on answer tokens only.

Every batch is a pure function of (seed, step, micro, rank), so resuming needs no data
state and ``world_size`` ranks with batch B see what one rank with batch ``world_size * B``
sees. Layout of every sequence (PAPER.md "Project decisions"): the reference prefix, then
``<s>`` and the text; references are the prefix followed by their text.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from memory3.model.config import Memory3Config
from memory3.model.tokenizer import Memory3Tokenizer
from memory3.retrieval.overlap import overlap_exceeds
from memory3.train.data import TokenShards, WindowSampler
from memory3.train.synthetic import Person, SyntheticKnowledgeBase, biography, questions

IGNORE = -100


@dataclass
class Batch:
    """tokens, targets int64 [B, S] (targets[b, i] is the token after tokens[b, i]; IGNORE =
    no loss). With memory: refs int64 [N, L] (reference tokens without the prefix, right-padded),
    ref_lens int64 [N], mem_ids int32 [B, C, R] rows of refs read by chunk c (-1 = none);
    right int64 [B], when known: the slot (0..R-1) of the right memory in every chunk of
    sequence b (the binding supervision's target, `memory3.train.binding`)."""
    tokens: torch.Tensor
    targets: torch.Tensor
    refs: torch.Tensor | None = None
    ref_lens: torch.Tensor | None = None
    mem_ids: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.targets), move(self.refs), move(self.ref_lens), move(self.mem_ids),
                     move(self.right))


class Task(Protocol):
    def batch(self, step: int, micro: int) -> Batch: ...


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return out


def reference_ids(config: Memory3Config, text_ids: Sequence[int]) -> list[int]:
    """A reference as the encoder reads it: at most ref_len tokens (it prepends the prefix)."""
    return list(text_ids[:config.ref_len])


def n_chunks(config: Memory3Config, seq_len: int) -> int:
    return max(1, math.ceil((seq_len - config.prefix_len) / config.chunk_size))


# ---------------------------------------------------------------------- stage 1: warmup


class WarmupTask:
    """Windows of the token stream as ``[prefix] <s> w_0 .. w_{n-1}``, loss on every token."""

    def __init__(self, shards: TokenShards, config: Memory3Config, *, seq_len: int, micro_batch: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.sampler = WindowSampler(shards, seq_len, micro_batch, seed, rank, world_size)

    def lm_rows(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.sampler.batch(step, micro)  # [B, n + 1]
        B = w.shape[0]
        head = torch.tensor(list(self.config.prefix_ids) + [self.config.bos_id], dtype=torch.int64).expand(B, -1)
        tokens = torch.cat([head, w[:, :-1]], dim=1)
        ignore = torch.full((B, len(self.config.prefix_ids)), IGNORE, dtype=torch.int64)
        targets = torch.cat([ignore, w], dim=1)  # the prefix predicts nothing; <s> predicts w_0
        return tokens, targets

    def batch(self, step: int, micro: int) -> Batch:
        return Batch(*self.lm_rows(step, micro))


# ---------------------------------------------------------------------- stage 2: continual

Retriever = Callable[[list[str], int], list[list[int]]]
"""(query texts, k) -> for each query the indices of its top-k references, best first."""


class ContinualTask(WarmupTask):
    """Warmup windows plus explicit memory: chunk c retrieves (with the text of chunk c) the
    best reference that does not leak, and reads the references of chunks c-window..c."""

    def __init__(self, shards: TokenShards, config: Memory3Config, *, references: Sequence[Sequence[int]],
                 retriever: Retriever, detokenize: Callable[[list[int]], str], seq_len: int, micro_batch: int,
                 candidates: int = 4, window: int = 4, leak_threshold: float = 0.9,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(shards, config, seq_len=seq_len, micro_batch=micro_batch, seed=seed, rank=rank,
                         world_size=world_size)
        if not references:
            raise ValueError("references must hold at least one tokenized reference")
        self.references = [list(r) for r in references]
        self.retriever, self.detokenize = retriever, detokenize
        self.candidates, self.window, self.leak_threshold = candidates, window, leak_threshold
        self.skipped_leaks = 0  # references dropped by the leakage filter, for the log

    def pick_references(self, tokens: torch.Tensor) -> list[list[int]]:
        """For each sequence, the reference index retrieved by each of its chunks (-1: none)."""
        c = self.config
        B, S = tokens.shape
        C = n_chunks(c, S)
        chunks = [[tokens[b, c.prefix_len + i * c.chunk_size:c.prefix_len + (i + 1) * c.chunk_size].tolist()
                   for i in range(C)] for b in range(B)]
        hits = self.retriever([self.detokenize(ch) for row in chunks for ch in row], self.candidates)
        picks: list[list[int]] = []
        for b in range(B):
            text = tokens[b, c.prefix_len:].tolist()
            row = []
            for i in range(C):
                found = hits[b * C + i]
                keep = next((r for r in found if not overlap_exceeds(text, self.references[r], self.leak_threshold)), -1)
                self.skipped_leaks += found.index(keep) if keep >= 0 else len(found)
                row.append(keep)
            picks.append(row)
        return picks

    def batch(self, step: int, micro: int) -> Batch:
        tokens, targets = self.lm_rows(step, micro)
        picks = self.pick_references(tokens)
        used = sorted({r for row in picks for r in row if r >= 0})
        if not used:
            return Batch(tokens, targets)
        row_of = {r: i for i, r in enumerate(used)}
        refs = [reference_ids(self.config, self.references[r]) for r in used]
        B, C, R = len(picks), len(picks[0]), self.window + 1
        ids = torch.full((B, C, R), -1, dtype=torch.int32)
        for b, row in enumerate(picks):
            for c in range(C):
                own = [row_of[row[j]] for j in range(max(0, c - self.window), c + 1) if row[j] >= 0]
                ids[b, c, :len(own)] = torch.tensor(own[::-1], dtype=torch.int32)  # own chunk's first
        return Batch(tokens, targets, pad_rows(refs, self.config.pad_id),
                     torch.tensor([len(r) for r in refs]), ids)


# ---------------------------------------------------------------------- single stage (TRAINING.md)


@dataclass(frozen=True)
class SyntheticRecipe:
    """The single-stage recipe of TRAINING.md (what taught a 0.9M model to read memory)."""
    rag_share: float = 0.2          # share of steps with biographies as text instead of memories
    max_memories: int = 5           # right memory + (max_memories - 1) other people at the end
    curriculum_frac: float = 0.3    # memories grow 1 -> max_memories over this share of steps
    rag_references: int = 1         # biographies in the context of a RAG step (right one included)
    right_first: float | None = None  # P(right memory in slot 0); None = shuffled (parallel positions)
    questions_per_sample: int = 5
    curriculum_start: float = 0.0   # share of steps with 1 memory before the ramp starts

    def __post_init__(self) -> None:
        if not 0 <= self.rag_share <= 1 or not 0 <= self.curriculum_frac <= 1 or not 0 <= self.curriculum_start <= 1:
            raise ValueError(f"rag_share, curriculum_frac and curriculum_start must lie in [0, 1], got "
                             f"{self.rag_share}, {self.curriculum_frac}, {self.curriculum_start}")
        if self.max_memories < 1 or self.rag_references < 1 or self.questions_per_sample < 1:
            raise ValueError("max_memories, rag_references and questions_per_sample must be >= 1")
        if self.right_first is not None and not 0 <= self.right_first <= 1:
            raise ValueError(f"right_first must be None or in [0, 1], got {self.right_first}")

    @classmethod
    def from_config(cls, config) -> "SyntheticRecipe":
        """The recipe fields of a TrainConfig."""
        return cls(**{f: getattr(config, f) for f in cls.__dataclass_fields__})

    def memories_at(self, step: int, total: int) -> int:
        """1 memory for the first curriculum_start of the steps (learning to read one is far
        faster alone: held-out accuracy 0.72 after 300 steps, against 0.24 with the ramp from
        step 0), then a linear ramp to max_memories over curriculum_frac of the steps."""
        step -= self.curriculum_start * total
        if step < 0:
            return 1
        ramp = self.curriculum_frac * total
        if ramp <= 0:
            return self.max_memories
        return 1 + min(self.max_memories - 1, int((self.max_memories - 1) * step / ramp + 0.5))

    def is_rag_step(self, seed: int, step: int) -> bool:
        return random.Random(f"{seed}:rag:{step}").random() < self.rag_share


class SyntheticTask:
    """Samples of the single-stage recipe: a fresh random person per sample; its questions
    (answers are the only targets) read its biography as a memory among others' (memory
    step) or follow its biography as text (RAG step)."""

    def __init__(self, kb: SyntheticKnowledgeBase, tokenizer: Memory3Tokenizer, config: Memory3Config, *,
                 recipe: SyntheticRecipe, total_steps: int, micro_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.kb, self.tokenizer, self.config, self.recipe = kb, tokenizer, config, recipe
        self.total_steps, self.micro_batch, self.seed = total_steps, micro_batch, seed
        self.rank, self.world_size = rank, world_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def qa_rows(self, person: Person, rng: random.Random) -> tuple[list[int], list[int]]:
        """Token ids and targets of the person's questions with answers, answers supervised."""
        ids: list[int] = []
        targets: list[int] = []
        for q in questions(person, rng)[:self.recipe.questions_per_sample]:
            prompt, answer = self.encode(" " + q.prompt), self.encode(" " + q.answer + " .")
            n_answer = len(self.encode(" " + q.answer))
            ids += prompt + answer
            # targets[i] is the token after ids[i]: the answer tokens are predicted from the
            # last prompt token onwards.
            targets += [IGNORE] * (len(prompt) - 1) + answer[:n_answer] + [IGNORE] * (len(answer) - n_answer + 1)
        return ids, targets

    def sample(self, step: int, index: int, n_memories: int, rag: bool):
        """One sample: (context ids, targets, reference texts in slot order, the right one's slot)."""
        rng = random.Random(f"{self.seed}:sample:{step}:{index}")
        people = self.kb.fresh_people(rng.getrandbits(64))
        right = next(people)
        n_others = (self.recipe.rag_references if rag else n_memories) - 1
        others: list[Person] = []
        while len(others) < n_others:
            p = next(people)
            if p.name != right.name and all(p.name != o.name for o in others):
                others.append(p)
        qa_ids, qa_targets = self.qa_rows(right, rng)
        head = list(self.config.prefix_ids) + [self.config.bos_id]
        if rag:
            shown = [right, *others]
            rng.shuffle(shown)
            text = self.encode(" " + " ".join(biography(p, rng) for p in shown))
            ids = head + text + qa_ids
            return ids, [IGNORE] * (len(head) + len(text)) + qa_targets, [], -1
        slots = [right, *others]
        if self.recipe.right_first is None or rng.random() >= self.recipe.right_first:
            rng.shuffle(slots)
        return head + qa_ids, [IGNORE] * len(head) + qa_targets, [biography(p, rng) for p in slots], slots.index(right)

    def batch(self, step: int, micro: int) -> Batch:
        rag = self.recipe.is_rag_step(self.seed, step)
        n_mem = self.recipe.memories_at(step, self.total_steps)
        first = (micro * self.world_size + self.rank) * self.micro_batch
        samples = [self.sample(step, first + i, n_mem, rag) for i in range(self.micro_batch)]
        tokens = pad_rows([s[0] for s in samples], self.config.pad_id)
        targets = pad_rows([s[1] for s in samples], IGNORE)
        if rag:
            return Batch(tokens, targets)
        # as the bank encodes knowledge-base text (Memory3Tokenizer.reference_ids)
        refs = [self.tokenizer.reference_ids(text, self.config.ref_len) for s in samples for text in s[2]]
        ids = torch.arange(len(refs), dtype=torch.int32).view(len(samples), 1, n_mem)
        ids = ids.expand(-1, n_chunks(self.config, tokens.shape[1]), -1).contiguous()  # every chunk reads them
        return Batch(tokens, targets, pad_rows(refs, self.config.pad_id), torch.tensor([len(r) for r in refs]), ids,
                     torch.tensor([s[3] for s in samples]))
