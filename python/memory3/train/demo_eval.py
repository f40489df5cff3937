"""What the demo measures on held-out questions, every way of answering with the same retrieval.

Modes (``MODES``): ``none`` (the question alone), ``memory`` (the top-k retrieved bank rows as
explicit memory, read through the bank's codec), ``rag`` (the same top-k biographies as text
before the question), ``fullkv`` (the same biographies' dense key-values, precomputed once per
reference and placed in the KV cache before the question, as KV-reuse systems such as
TurboRAG and LMCache do: each reference's keys were computed on their own, right after
``<s>``, so references do not attend to each other; `FullKVStore`).

Accuracy is exact match, teacher-forced: a question is right when the argmax at every answer
position is the answer token (what greedy decoding produces).

Timing (`time_methods`) is per question at batch 1, every method on the same footing: the
question is retrieved once (top-k for the largest k, timed: the shared retrieval step), then
each method, in an order rotated every round so none always runs first, goes from the
retrieved rows to its first greedy token (the method's own work: bank rows read by id in
place from the bank's memory-mapped shard files / reference text fetched from the bank and
tokenized / stored key-values gathered from their memory-mapped file and copied into the
cache, plus the prefill), then greedy decode steps into the model's KV cache. Every method
starts from a prefix cache of what all questions share (`Answerer.head_kv`; full-KV reuse:
the head in its store), so none prefills a token another one gets for free. Time to first
token = shared retrieval + the method's part; medians over questions x repeats. Two methods
are compared by their paired per-question differences (`demo_stats`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from memory3.model import Memories, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer
from memory3.train.synthetic import Question
from memory3.train.tasks import n_chunks, pad_rows

MODES = ("none", "memory", "rag", "fullkv")
OVERLAP_THRESHOLD = 2 / 3  # generation's filter (PAPER.md §5.4)


@dataclass
class Retrieved:
    """Top-k bank rows per question, best first (-1 = fewer found), and their reference ids."""
    rows: torch.Tensor          # int64 [Q, k]
    ids: list[list[str]]


def retrieve(retriever, tokenizer: Memory3Tokenizer, questions: Sequence[Question], k: int) -> Retrieved:
    """The real retriever over the whole bank, queried with each question's text (as
    generation queries with the prompt chunk), overlap filter on."""
    texts = [q.prompt for q in questions]
    found = retriever.retrieve(texts, k, query_tokens=[tokenizer.encode(t) for t in texts],
                               overlap_threshold=OVERLAP_THRESHOLD)
    return Retrieved(found.rows, found.ids)


def _head(model: Memory3Model) -> list[int]:
    c = model.config
    return list(c.prefix_ids) + [c.bos_id]


class FullKVStore:
    """Dense per-layer keys and values of each reference's tokens, computed once (offline) as
    ``<s>Reference: <s> text`` and kept in ``dtype`` (bf16: what a KV-reuse store holds).

    Token-major rows [n_tokens, 2 (k, v), n_layers, Hkv, D], one span per reference (and one
    for the shared head), in RAM until `save`, which writes them to one file read back
    memory-mapped with the bank's own shard code: the same kind of storage the demo's bank is
    read from (mmap'd shard files), so neither method reads from a faster medium. `fill`
    gathers the head and the retrieved spans with one index and copies them into the cache
    with one copy for the keys and one for the values, whatever k (a batched load, as
    KV-reuse systems do)."""

    FILE = "fullkv.bin"

    def __init__(self, model: Memory3Model, tokenizer: Memory3Tokenizer, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        c = model.config
        self.row_shape = (2, c.n_layers, c.n_kv_heads, c.head_dim)
        self.spans: dict[int, Tensor] = {}  # row -> its token indices into self.tokens (int64)
        self.path: Path | None = None
        head = torch.tensor([_head(model)], device=model.device)
        cache = model.new_cache(1, head.shape[1])
        with torch.inference_mode():
            model(head, cache=cache, kv_lens=torch.tensor([head.shape[1]], dtype=torch.int32, device=model.device))
        self.tokens = self._rows(cache, 0, 0, head.shape[1])
        self.head = torch.arange(head.shape[1])

    def _rows(self, cache, b: int, start: int, stop: int) -> Tensor:
        """Sequence b's cache rows start..stop-1 as token-major store rows."""
        kv = torch.stack([cache.k[:, b, start:stop], cache.v[:, b, start:stop]], 1)  # [L, 2, n, Hkv, D]
        return kv.transpose(0, 2).to("cpu", self.dtype).contiguous()

    @torch.inference_mode()
    def add(self, rows: Sequence[int], texts: Sequence[str], batch_size: int = 64) -> None:
        if self.path is not None:
            raise ValueError(f"the store was saved to {self.path}; add every reference before save()")
        todo = [(r, t) for r, t in zip(rows, texts) if r not in self.spans]
        head = _head(self.model)
        blocks = [self.tokens]
        n = self.tokens.shape[0]
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            ids = [head + self.tokenizer.encode(" " + t) for _, t in part]
            tokens = pad_rows(ids, self.model.config.pad_id).to(self.model.device)
            B, T = tokens.shape
            cache = self.model.new_cache(B, T)
            self.model(tokens, cache=cache, kv_lens=torch.full((B,), T, dtype=torch.int32, device=tokens.device))
            for b, (row, _) in enumerate(part):
                blocks.append(self._rows(cache, b, len(head), len(ids[b])))
                self.spans[row] = torch.arange(n, n + blocks[-1].shape[0])
                n += blocks[-1].shape[0]
        self.tokens = torch.cat(blocks)

    def save(self, directory: str | Path) -> Path:
        """Write every row to ``directory/fullkv.bin`` and read them from there, memory-mapped."""
        from memory3.memory.codecs import ArraySpec
        from memory3.memory.shards import append_rows, map_rows
        path = Path(directory) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = ArraySpec(self.dtype, self.row_shape)
        append_rows(path, 0, spec, self.tokens)
        self.tokens, self.path = map_rows(path, self.tokens.shape[0], spec), path
        return path

    def bytes_per_reference(self) -> float:
        """Mean stored bytes of one reference's keys and values."""
        row_bytes = self.tokens[:1].numel() * self.tokens.element_size()
        return row_bytes * sum(s.numel() for s in self.spans.values()) / max(1, len(self.spans))

    def length(self, rows: Sequence[int]) -> int:
        """Cache rows the head and these references fill."""
        return self.head.numel() + sum(self.spans[r].numel() for r in rows if r >= 0)

    def fill(self, cache, b: int, rows: Sequence[int]) -> int:
        """Write the head and the references' key-values into sequence b of ``cache``; return
        the number of cache rows used."""
        index = torch.cat([self.head] + [self.spans[r] for r in rows if r >= 0])
        kv = self.tokens[index].to(cache.k.device)  # [n, 2, L, Hkv, D]
        n = index.numel()
        cache.k[:, b, :n] = kv[:, 0].transpose(0, 1)
        cache.v[:, b, :n] = kv[:, 1].transpose(0, 1)
        return n


class MemoryReader:
    """Explicit memories of bank rows [B, k] (slot order = retrieval rank), read by every chunk.

    ``in_place`` (default: when the codec allows it, int8 or float rows of the model's dtype,
    on the model's device): the attention op reads the rows by id straight from the bank
    arrays, as in generation with an in-place codec; the per-layer arrays are looked up once
    here, so a question costs one small ids tensor. Else the rows are gathered and decoded."""

    def __init__(self, bank, model: Memory3Model, in_place: bool | None = None) -> None:
        self.bank, self.model = bank, model
        if in_place is None:
            first = bank.layer_bank(0) if bank.codec.in_place else None
            in_place = first is not None and first["mem_k"].device == model.device and (
                first["mem_k_scale"] is not None or first["mem_k"].dtype == model.dtype)
        self.in_place = in_place
        if in_place:
            layers = [bank.layer_bank(i) for i in range(bank.shape.layers)]
            scaled = layers[0]["mem_k_scale"] is not None
            self.k, self.v = [a["mem_k"] for a in layers], [a["mem_v"] for a in layers]
            self.k_scale = [a["mem_k_scale"] for a in layers] if scaled else None
            self.v_scale = [a["mem_v_scale"] for a in layers] if scaled else None

    def __call__(self, rows: torch.Tensor, n_chunk: int) -> Memories:
        B, k = rows.shape
        device = self.model.device
        if self.in_place:  # the op takes int64 ids (-1 = empty slot) as they come, strided too: no copy
            ids = rows.to(device)[:, None]
            if n_chunk > 1:
                ids = ids.expand(B, n_chunk, k)
            return Memories(self.k, self.v, ids, self.k_scale, self.v_scale)
        mem = self.bank.gather(rows)  # [L, 2, B, k, Hkv, M, D], decoded by the bank's codec
        slots = torch.arange(B * k).view(B, k)
        ids = torch.where(rows >= 0, slots, -1).to(torch.int32)[:, None].expand(B, n_chunk, k).contiguous()
        dtype = self.model.dtype
        return Memories([m[0].flatten(0, 1).to(device, dtype) for m in mem],
                        [m[1].flatten(0, 1).to(device, dtype) for m in mem], ids.to(device))


class Answerer:
    """One model answering questions in one mode with k retrieved references."""

    def __init__(self, model: Memory3Model, tokenizer: Memory3Tokenizer, mode: str, k: int = 0, *, bank=None,
                 texts: dict[int, str] | None = None, kv_store: FullKVStore | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "none" and k < 1:
            raise ValueError(f"mode {mode!r} needs k >= 1 retrieved references, got {k}")
        self.model, self.tokenizer, self.mode, self.k = model, tokenizer, mode, k
        self.bank, self.texts, self.kv_store = bank, texts or {}, kv_store
        self.reader = MemoryReader(bank, model) if mode == "memory" else None
        self._head_kv: tuple[Tensor, Tensor, int] | None = None
        self.first_logits: Tensor | None = None  # time_question's last first-token logits [V]

    def head_kv(self) -> tuple[Tensor, Tensor, int]:
        """Keys and values [n_layers, n, Hkv, D] of the n tokens every question starts with,
        computed once (a prefix cache; full-KV reuse has them in its store): the reference
        prefix, and ``<s>`` unless memories are read (``<s>`` opens chunk 0, which reads the
        retrieved memories, so with memory it is part of each question's prefill)."""
        if self._head_kv is None:
            m = self.model
            head = _head(m)[:m.config.prefix_len] if self.mode == "memory" else _head(m)
            cache = m.new_cache(1, len(head))
            with torch.inference_mode():
                m(torch.tensor([head], device=m.device), cache=cache,
                  kv_lens=torch.tensor([len(head)], dtype=torch.int32, device=m.device))
            self._head_kv = (cache.k[:, 0].clone(), cache.v[:, 0].clone(), len(head))
        return self._head_kv

    def _context(self, rows: list[int]) -> list[int]:
        """Tokens before the question: the head, plus the biographies' text for RAG."""
        if self.mode != "rag":
            return _head(self.model)
        bios = " ".join(self.texts[r] for r in rows if r >= 0)
        return _head(self.model) + self.tokenizer.encode(" " + bios)

    def logits(self, rows: torch.Tensor, tails: list[list[int]], at: Sequence[tuple[int, int]] | None = None):
        """Logits [B, T, V] of the question tokens ``tails`` (prompt, answer) given retrieved
        ``rows`` [B, k]; also the index in T of each tail's first token (0 unless no cache).
        ``at``: per sequence (i, n), only the logits of its tail positions i .. i + n - 1,
        returned as [sum of n, V] in order (the output projection is skipped elsewhere:
        with RAG top-5 it was most of the evaluation)."""
        m, c = self.model, self.model.config
        rows = rows[:, :self.k] if self.mode != "none" else rows[:, :0]
        memories, cache, kv_lens = None, None, None
        if self.mode == "fullkv":
            B, T = len(tails), max(len(t) for t in tails)
            cache = m.new_cache(B, max(self.kv_store.length(row) for row in rows.tolist()) + T)
            used = [self.kv_store.fill(cache, b, row) for b, row in enumerate(rows.tolist())]
            kv_lens = torch.tensor([u + T for u in used], dtype=torch.int32, device=m.device)
            tokens, starts = pad_rows(tails, c.pad_id).to(m.device), [0] * B
        else:
            heads = [self._context(row) for row in rows.tolist()]
            tokens = pad_rows([h + t for h, t in zip(heads, tails)], c.pad_id).to(m.device)
            starts = [len(h) for h in heads]
            if self.mode == "memory":
                memories = self.reader(rows, n_chunks(c, tokens.shape[1]))
        where = None
        if at is not None:
            if len(at) != len(tails):
                raise ValueError(f"at must hold one (start, count) per tail ({len(tails)}), got {len(at)}")
            where = torch.zeros(tokens.shape, dtype=torch.bool)
            for b, (i, n) in enumerate(at):
                where[b, starts[b] + i:starts[b] + i + n] = True
            where = where.to(m.device)
        return m(tokens, memories, cache=cache, kv_lens=kv_lens, logits_where=where), starts

    @torch.inference_mode()
    def exact_match(self, questions: Sequence[Question], rows: torch.Tensor, batch_size: int = 64) -> list[bool]:
        """Per question: is every answer token the argmax (greedy decoding's answer)?"""
        out: list[bool] = []
        for s in range(0, len(questions), batch_size):
            qs, rs = questions[s:s + batch_size], rows[s:s + batch_size]
            prompts = [self.tokenizer.encode(" " + q.prompt) for q in qs]
            answers = [self.tokenizer.encode(" " + q.answer) for q in qs]
            # the logits that predict the answer tokens: from the prompt's last token on
            logits, _ = self.logits(rs, [p + a for p, a in zip(prompts, answers)],
                                    at=[(len(p) - 1, len(a)) for p, a in zip(prompts, answers)])
            pred = logits.argmax(-1).cpu().split([len(a) for a in answers])
            out.extend(p.tolist() == a for p, a in zip(pred, answers))
        return out

    @torch.inference_mode()
    def time_question(self, question: Question, rows: torch.Tensor, n_decode: int) -> tuple[float, float]:
        """(seconds from the retrieved ``rows`` [1, >= k] to the first greedy token, decode
        tokens/s) for one question at batch 1."""
        m, c = self.model, self.model.config
        rows = rows[:, :self.k] if self.mode != "none" else rows[:, :0]
        _sync(m.device)
        t0 = time.perf_counter()
        prompt = self.tokenizer.encode(" " + question.prompt)
        if self.mode == "rag":  # the biographies' text, read from the bank's metadata
            found = self.bank.references([r for r in rows[0].tolist() if r >= 0])
            self.texts = {**self.texts, **{ref.row: ref.text for ref in found}}
        if self.mode == "fullkv":
            row = rows[0].tolist()
            cache = m.new_cache(1, self.kv_store.length(row) + len(prompt) + n_decode)
            n = self.kv_store.fill(cache, 0, row) + len(prompt)
            tokens, memories = torch.tensor([prompt], device=m.device), None
        else:  # the head's key-values from the prefix cache, the rest prefilled
            head_k, head_v, h = self.head_kv()
            ids = self._context(rows[0].tolist())[h:] + prompt
            n = h + len(ids)
            cache = m.new_cache(1, n + n_decode)
            cache.k[:, 0, :h] = head_k
            cache.v[:, 0, :h] = head_v
            tokens = torch.tensor([ids], device=m.device)
            memories = self.reader(rows, n_chunks(c, n + n_decode)) if self.mode == "memory" else None
        lens = torch.tensor([n], dtype=torch.int32, device=m.device)
        logits = m(tokens, memories, cache=cache, kv_lens=lens, logits_at=torch.tensor([tokens.shape[1] - 1]))
        token = logits[:, -1].argmax(-1)
        _sync(m.device)
        ttft = time.perf_counter() - t0
        self.first_logits = logits[0, -1]
        t1 = time.perf_counter()
        for _ in range(n_decode):
            n += 1
            lens = torch.tensor([n], dtype=torch.int32, device=m.device)
            token = m(token[:, None], memories, cache=cache, kv_lens=lens)[:, -1].argmax(-1)
        _sync(m.device)
        return ttft, n_decode / (time.perf_counter() - t1) if n_decode else float("nan")


def time_methods(answerers: dict[str, Answerer], questions: Sequence[Question], retriever, n_decode: int,
                 repeats: int = 1, decode_questions: int | None = None) -> dict[str, dict]:
    """Per method name: medians over questions x repeats of time to first token (ms; the
    shared retrieval + the method's own part), its parts, decode tokens/s (over the first
    ``decode_questions`` questions, default all: decoding is ~10x a first token, and the
    paired TTFT comparison wants many questions), and ``own_ms``: per question, the own
    part of each repeat (demo_stats pairs two methods' on the same questions).

    Module docstring: one retrieval per question (timed), then ``repeats`` rounds of every
    method from those rows, in an order that rotates every round; one untimed round first."""
    if not answerers or not questions or repeats < 1:
        raise ValueError("time_methods needs answerers, questions and repeats >= 1")
    names = list(answerers)
    k = max(a.k for a in answerers.values())
    tokenizer = next(iter(answerers.values())).tokenizer
    n_dec_q = len(questions) if decode_questions is None else decode_questions
    own: dict[str, list[list[float]]] = {n: [] for n in names}
    decode: dict[str, list[float]] = {n: [] for n in names}
    t_rets: list[float] = []
    turn = 0
    for j, q in enumerate([questions[0]] + list(questions)):  # question 0 twice: the first, untimed, warms up
        rows, t_ret = torch.full((1, 0), -1, dtype=torch.long), 0.0
        if k:
            t0 = time.perf_counter()
            rows = retrieve(retriever, tokenizer, [q], k).rows
            t_ret = time.perf_counter() - t0
        timed = j > 0
        steps = n_decode if timed and j - 1 < n_dec_q else 0
        for name in names:
            own[name].append([])
        for _ in range(repeats if timed else 1):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                ttft, tok_s = answerers[name].time_question(q, rows, steps)
                own[name][-1].append(ttft)
                if steps:
                    decode[name].append(tok_s)
            turn += 1
        if timed:
            t_rets.append(t_ret)
        else:
            for name in names:
                own[name].pop()
    out = {}
    for name in names:
        ret = t_rets if answerers[name].mode != "none" else [0.0] * len(t_rets)
        parts = [(r, t) for r, ts in zip(ret, own[name]) for t in ts]
        out[name] = {"ttft_ms": 1e3 * statistics.median(r + t for r, t in parts),
                     "retrieval_ms": 1e3 * statistics.median(r for r, _ in parts),
                     "prefill_ms": 1e3 * statistics.median(t for _, t in parts),
                     "decode_tok_s": statistics.median(decode[name]) if decode[name] else float("nan"),
                     "timed_questions": len(t_rets), "repeats": repeats,
                     "own_ms": [[round(1e3 * t, 4) for t in ts] for ts in own[name]]}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
