"""Generation with explicit memory, on the paper's retrieval schedule.

    from memory3.generate import generate, stream_generate
    retriever = Retriever(Bank.open("bank/", expect_fingerprint=fingerprint(model)), Embedder())
    texts = generate(model, tokenizer, ["Who is ...", "..."], retriever=retriever, max_new_tokens=64)
    texts, retrieval = generate(model, tokenizer, prompts, retriever=retriever, return_retrieval=True)
    for piece in stream_generate(model, tokenizer, "prompt", retriever=retriever):
        print(piece.text, end="")                          # piece.index: which prompt

Each prompt is laid out as `<s>Reference:` `<s>` text (PAPER.md "Project decisions"); chunks
of 64 tokens count from `<s>`. Prompt chunks retrieve with their own text, each generated
chunk with the 64 tokens before it, and the first generated chunk keeps the last prompt
chunk's memories (retrieval_schedule.py). References overlapping the query by more than
`overlap_threshold` (eq. 6; 2/3 as at the paper's evaluation) are dropped. A chunk's
memories are gathered once, through the bank's LRU cache, into a working set the model
reads by row (`Memories`): every prompt chunk's for the prefill, then one chunk's per
sequence while decoding into the model's preallocated KV cache. The next chunk's retrieval
and gather start one decode step early, on a worker thread and side stream when `prefetch`
is on (the default with CUDA), so they overlap that step (prefetch.py).

Batches are ragged (right-padded prefill, per-sequence lengths after). Greedy decoding
with temperature 0, else sampling with temperature and top-p from a seeded generator.
A sequence ends at `</s>`, at a stop string (cut before it) or after max_new_tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from memory3.chunk_memory import ChunkMemory, ChunkRetrieval, Hit
from memory3.model import Memories
from memory3.prefetch import Prefetcher
from memory3.retrieval_schedule import generated_chunk_query, prompt_chunk_spans, starts_chunk
from memory3.text_stream import TextStream


@dataclass
class TextPiece:
    index: int  # which prompt of the batch
    text: str  # text that became final since the last piece of that prompt


def generate(model, tokenizer, prompts: str | list[str], *, retriever=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: str | list[str] = (),
             overlap_threshold: float | None = 2 / 3, candidates: int | None = None, on_text=None,
             return_retrieval: bool = False, prefetch: bool | None = None):
    """Continue each prompt; returns its generated text (a str for a str prompt, else a list).

    model, tokenizer: a Memory3Model and its Memory3Tokenizer. retriever: a
        memory3.retrieval.Retriever over a bank encoded by this model (its `bank` is read), or
        None to generate without explicit memory.
    max_new_tokens: tokens generated per prompt at most. temperature: 0 = greedy; else
        sampling from softmax(logits / temperature) restricted to the top-p nucleus, drawn
        from a generator seeded with `seed` (None: torch's global generator).
    stop: strings that end a sequence (the text is cut before them).
    overlap_threshold: drop a retrieved reference whose overlap with the query (eq. 6)
        exceeds it; None keeps all. candidates: how deep to search before filtering.
    on_text(index, piece): called with each piece of text as it becomes final (streaming).
    return_retrieval: also return, per prompt, a ChunkRetrieval for every chunk read (its
        reference ids, rows and scores; query None where a chunk kept its predecessor's).
    prefetch: overlap the next chunk's retrieval with the current step (default: with CUDA).
    """
    run = _Run(model, tokenizer, prompts, retriever, max_new_tokens, temperature, top_p, seed, stop,
               overlap_threshold, candidates, prefetch)
    for piece in run.pieces():
        if on_text is not None:
            on_text(piece.index, piece.text)
    texts = [s.text for s in run.streams]
    out = texts[0] if isinstance(prompts, str) else texts
    if return_retrieval:
        return out, (run.retrieval[0] if isinstance(prompts, str) else run.retrieval)
    return out


def stream_generate(model, tokenizer, prompts: str | list[str], **kwargs) -> Iterator[TextPiece]:
    """generate() as an iterator of TextPiece, in the order the text is produced (same
    keyword arguments, except on_text and return_retrieval)."""
    for name in ("on_text", "return_retrieval"):
        if name in kwargs:
            raise ValueError(f"stream_generate does not take {name}; use generate() for it")
    defaults = dict(retriever=None, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, stop=(),
                    overlap_threshold=2 / 3, candidates=None, prefetch=None)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; stream_generate takes {sorted(defaults)}")
    args = {**defaults, **kwargs}
    yield from _Run(model, tokenizer, prompts, *args.values()).pieces()


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else a draw from the
    top-p nucleus of softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class _Run:
    """One batched generation: prefill, then token by token with chunk memories."""

    def __init__(self, model, tokenizer, prompts, retriever, max_new_tokens, temperature, top_p, seed, stop,
                 overlap_threshold, candidates, prefetch):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        c = self.config = model.config
        if list(tokenizer.prefix_ids) != list(c.prefix_ids):
            raise ValueError(f"the tokenizer's reference prefix ids {list(tokenizer.prefix_ids)} differ from the "
                             f"model's prefix_ids {list(c.prefix_ids)}: use the model's own tokenizer")
        if retriever is not None and not c.memory_layers:
            raise ValueError("this model has no memory layers: it cannot read a memory bank (pass retriever=None)")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = [tokenizer.context_ids(p) for p in prompts]
        too_big = [t for ids in self.prompt_ids for t in ids if t >= c.vocab_size]
        if too_big:
            raise ValueError(f"the tokenizer produced id {too_big[0]} >= the model's vocab_size {c.vocab_size}")
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.generator = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
        self.streams = [TextStream(tokenizer.decode, (stop,) if isinstance(stop, str) else tuple(stop))
                        for _ in prompts]
        self.memory = None if retriever is None else ChunkMemory(retriever.bank, retriever, model,
                                                                 overlap_threshold=overlap_threshold,
                                                                 candidates=candidates)
        if retriever is not None:
            _check_fingerprint(model, retriever.bank)
        self.prefetcher = Prefetcher(torch.cuda.is_available() if prefetch is None else prefetch, model.device)
        self.retrieval: list[list[ChunkRetrieval]] = [[] for _ in prompts]
        self.installed: dict[int, tuple[Hit, str]] = {}  # sequence -> its current chunk's retrieval

    # ------------------------------------------------------------------ the loop

    def pieces(self) -> Iterator[TextPiece]:
        try:
            with torch.inference_mode():
                yield from self._generate()
        finally:
            self.prefetcher.close()

    def _generate(self) -> Iterator[TextPiece]:
        logits = self._prefill()
        B, eos = len(self.prompt_ids), self.config.eos_id
        self.ids = [list(p) for p in self.prompt_ids]  # prompt + generated, per sequence
        done, pending = [False] * B, None
        for step in range(self.max_new_tokens):
            tokens = sample_next(logits, self.temperature, self.top_p, self.generator)
            for b, t in enumerate(tokens.tolist()):
                self.ids[b].append(t)  # finished sequences keep being fed (ignored) to keep one batch
                if done[b]:
                    continue
                piece = self.streams[b].finish() if t == eos else self.streams[b].push(t)
                done[b] = t == eos or self.streams[b].stopped
                if piece:
                    yield TextPiece(b, piece)
            if all(done) or step == self.max_new_tokens - 1:
                break
            if pending is not None:  # started one step ago, needed by the chunk that starts now
                self._install(*pending)
            live = [b for b in range(B) if not done[b]]
            self._record_chunk_starts(live)
            pending = self._prefetch_next_chunks(live)
            kv_lens = torch.tensor([len(s) for s in self.ids], dtype=torch.int32, device=self.model.device)
            logits = self.model(tokens[:, None], self.memories, cache=self.cache, kv_lens=kv_lens)[:, 0]
        if pending is not None:
            self.prefetcher.result(pending[0])
        for b in range(B):
            piece = self.streams[b].finish()
            if piece:
                yield TextPiece(b, piece)

    def _prefill(self) -> Tensor:
        """Run the prompts (right-padded) into a fresh cache; logits [B, V] at each prompt's end."""
        c, model = self.config, self.model
        lens = [len(p) for p in self.prompt_ids]
        B, T = len(lens), max(lens)
        max_seq = T + self.max_new_tokens
        self.cache = model.new_cache(B, max_seq)
        self.n_chunks = math.ceil((max_seq - c.prefix_len) / c.chunk_size)
        self.memories = None if self.memory is None else self._prompt_memories()
        tokens = torch.full((B, T), c.pad_id, dtype=torch.long)
        for b, ids in enumerate(self.prompt_ids):
            tokens[b, : len(ids)] = torch.tensor(ids)
        kv_lens = torch.full((B,), T, dtype=torch.int32, device=model.device)
        logits = model(tokens.to(model.device), self.memories, cache=self.cache, kv_lens=kv_lens)
        if self.memory is not None:
            self.memories = self._decode_memories()
        return logits[torch.arange(B), torch.tensor(lens) - 1]

    # ------------------------------------------------------------------ memories

    def _prompt_memories(self) -> Memories:
        """Retrieve for every prompt chunk with its own text; gather all of them (the prefill
        reads them) and keep each sequence's last prompt chunk as its decode working set."""
        c, R = self.config, self.config.memories_per_chunk
        spans = [prompt_chunk_spans(len(ids), c.prefix_len, c.chunk_size) for ids in self.prompt_ids]
        queries = [(b, k, self.prompt_ids[b][s:e]) for b, sp in enumerate(spans) for k, (s, e) in enumerate(sp)]
        texts = [self.tokenizer.decode(toks) for _, _, toks in queries]
        hits = self.memory.retrieve(texts, [toks for _, _, toks in queries])
        B, Cp = len(spans), max(len(sp) for sp in spans)
        rows = torch.full((B, Cp, R), -1, dtype=torch.long)
        self.last_prompt_hit: list[Hit] = [None] * B
        for (b, k, _), text, hit in zip(queries, texts, hits):
            rows[b, k] = torch.tensor(hit.rows)
            self.retrieval[b].append(ChunkRetrieval(k, text, hit.ids, hit.rows, hit.scores))
            self.last_prompt_hit[b] = hit
        mem = self.memory.gather(rows)  # [L, 2, B, Cp, R, Hkv, M, D]
        last = torch.tensor([len(sp) - 1 for sp in spans])
        self.work = mem[:, :, torch.arange(B), last]  # [L, 2, B, R, Hkv, M, D]: a copy
        self.work_rows = rows[torch.arange(B), last]  # [B, R]
        slots = torch.arange(B * Cp * R).view(B, Cp, R)
        ids = torch.full((B, self.n_chunks, R), -1, dtype=torch.int32)
        ids[:, :Cp] = torch.where(rows >= 0, slots, -1)
        return Memories([m[0].flatten(0, 2) for m in mem], [m[1].flatten(0, 2) for m in mem], ids.to(self.model.device))

    def _decode_memories(self) -> Memories:
        """The working set as the model reads it: slot b*R + r holds sequence b's r-th memory;
        every chunk of sequence b points at its slots (a decode query sits in one chunk)."""
        B, R = self.work_rows.shape
        slots = torch.arange(B * R).view(B, R)
        ids = torch.where(self.work_rows >= 0, slots, -1)[:, None].expand(B, self.n_chunks, R)
        return Memories([m[0].flatten(0, 1) for m in self.work], [m[1].flatten(0, 1) for m in self.work],
                        ids.to(torch.int32).contiguous().to(self.model.device))

    def _record_chunk_starts(self, live: list[int]) -> None:
        """Record what a generated chunk reads when its first token is about to be fed."""
        if self.memory is None:
            return
        c = self.config
        for b in live:
            index = len(self.ids[b]) - 1
            if index < len(self.prompt_ids[b]) or not starts_chunk(index, c.prefix_len, c.chunk_size):
                continue
            chunk = (index - c.prefix_len) // c.chunk_size
            if generated_chunk_query(index, len(self.prompt_ids[b]), c.chunk_size) is None:
                hit, query = self.last_prompt_hit[b], None
            else:
                hit, query = self.installed[b]
            self.retrieval[b].append(ChunkRetrieval(chunk, query, hit.ids, hit.rows, hit.scores))

    def _prefetch_next_chunks(self, live: list[int]):
        """Start retrieval + gather for sequences whose next token starts a chunk that retrieves
        (its query, the chunk_size tokens before it, is complete now)."""
        if self.memory is None:
            return None
        c = self.config
        seqs, texts, tokens = [], [], []
        for b in live:
            start = len(self.ids[b])  # index of the token after the one fed next
            if not starts_chunk(start, c.prefix_len, c.chunk_size) or start < len(self.prompt_ids[b]):
                continue
            span = generated_chunk_query(start, len(self.prompt_ids[b]), c.chunk_size)
            if span is not None:
                seqs.append(b)
                tokens.append(self.ids[b][span[0]:span[1]])
                texts.append(self.tokenizer.decode(tokens[-1]))
        if not seqs:
            return None
        return self.prefetcher.submit(self.memory.fetch, texts, tokens), seqs, texts

    def _install(self, handle, seqs: list[int], texts: list[str]) -> None:
        hits, mem = self.prefetcher.result(handle)  # mem [L, 2, len(seqs), R, Hkv, M, D]
        for k, b in enumerate(seqs):
            self.work[:, :, b] = mem[:, :, k]
            self.work_rows[b] = torch.tensor(hits[k].rows)
            self.installed[b] = (hits[k], texts[k])
        self.memories = self._decode_memories()


def _check_fingerprint(model, bank) -> None:
    from memory3.memory.errors import BankMismatchError
    from memory3.model.weights import fingerprint

    mine = fingerprint(model)
    if bank.fingerprint != mine:
        raise BankMismatchError(bank.path, bank.fingerprint, mine)
