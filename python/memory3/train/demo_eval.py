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
each method, in an order rotated per question so none always runs first, goes from the
retrieved rows to its first greedy token (the method's own work: bank read by row id /
reference text fetched and tokenized / stored key-values copied into the cache, plus the
prefill), then greedy decode steps into the model's KV cache. Time to first token = shared
retrieval + the method's part; medians over questions x repeats.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

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
    ``<s>Reference: <s> text`` and kept in ``dtype`` (bf16: what a KV-reuse store holds)."""

    def __init__(self, model: Memory3Model, tokenizer: Memory3Tokenizer, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # row -> k, v [n_layers, n, Hkv, D]
        head = torch.tensor([_head(model)], device=model.device)
        cache = model.new_cache(1, head.shape[1])
        with torch.inference_mode():
            model(head, cache=cache, kv_lens=torch.tensor([head.shape[1]], dtype=torch.int32, device=model.device))
        n = head.shape[1]
        self.head_kv = (cache.k[:, 0, :n].clone(), cache.v[:, 0, :n].clone())

    @torch.inference_mode()
    def add(self, rows: Sequence[int], texts: Sequence[str], batch_size: int = 64) -> None:
        todo = [(r, t) for r, t in zip(rows, texts) if r not in self.kv]
        head = _head(self.model)
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            ids = [head + self.tokenizer.encode(" " + t) for _, t in part]
            tokens = pad_rows(ids, self.model.config.pad_id).to(self.model.device)
            B, T = tokens.shape
            cache = self.model.new_cache(B, T)
            self.model(tokens, cache=cache, kv_lens=torch.full((B,), T, dtype=torch.int32, device=tokens.device))
            for b, (row, _) in enumerate(part):
                n = len(ids[b])
                self.kv[row] = (cache.k[:, b, len(head):n].to(self.dtype).clone(),
                                cache.v[:, b, len(head):n].to(self.dtype).clone())

    def bytes_per_reference(self) -> float:
        """Mean stored bytes of one reference's keys and values."""
        sizes = [k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv.values()]
        return sum(sizes) / max(1, len(sizes))

    def fill(self, cache, b: int, rows: Sequence[int]) -> int:
        """Write the head and the references' key-values into sequence b of ``cache``; return
        the number of cache rows used."""
        parts = [self.head_kv] + [self.kv[r] for r in rows if r >= 0]
        n = 0
        for k, v in parts:
            m = k.shape[1]
            cache.k[:, b, n:n + m] = k.to(cache.k.dtype)
            cache.v[:, b, n:n + m] = v.to(cache.v.dtype)
            n += m
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
        if self.in_place:
            ids = rows.to(device, torch.int32)[:, None]  # -1 stays empty
            if n_chunk > 1:
                ids = ids.expand(B, n_chunk, k).contiguous()
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

    def _context(self, rows: list[int]) -> list[int]:
        """Tokens before the question: the head, plus the biographies' text for RAG."""
        if self.mode != "rag":
            return _head(self.model)
        bios = " ".join(self.texts[r] for r in rows if r >= 0)
        return _head(self.model) + self.tokenizer.encode(" " + bios)

    def logits(self, rows: torch.Tensor, tails: list[list[int]]):
        """Logits [B, T, V] of the question tokens ``tails`` (prompt, answer) given retrieved
        ``rows`` [B, k]; also the index in T of each tail's first token (0 unless no cache)."""
        m, c = self.model, self.model.config
        rows = rows[:, :self.k] if self.mode != "none" else rows[:, :0]
        if self.mode == "fullkv":
            B, T = len(tails), max(len(t) for t in tails)
            sizes = [sum(self.kv_store.kv[r][0].shape[1] for r in row if r >= 0) for row in rows.tolist()]
            cache = m.new_cache(B, len(_head(m)) + max(sizes) + T)
            used = [self.kv_store.fill(cache, b, row) for b, row in enumerate(rows.tolist())]
            kv_lens = torch.tensor([u + T for u in used], dtype=torch.int32, device=m.device)
            tokens = pad_rows(tails, c.pad_id).to(m.device)
            return m(tokens, cache=cache, kv_lens=kv_lens), [0] * B
        heads = [self._context(row) for row in rows.tolist()]
        seqs = [h + t for h, t in zip(heads, tails)]
        tokens = pad_rows(seqs, c.pad_id).to(m.device)
        memories = None
        if self.mode == "memory":
            memories = self.reader(rows, n_chunks(c, tokens.shape[1]))
        return m(tokens, memories), [len(h) for h in heads]

    @torch.inference_mode()
    def exact_match(self, questions: Sequence[Question], rows: torch.Tensor, batch_size: int = 64) -> list[bool]:
        """Per question: is every answer token the argmax (greedy decoding's answer)?"""
        out: list[bool] = []
        for s in range(0, len(questions), batch_size):
            qs, rs = questions[s:s + batch_size], rows[s:s + batch_size]
            prompts = [self.tokenizer.encode(" " + q.prompt) for q in qs]
            answers = [self.tokenizer.encode(" " + q.answer) for q in qs]
            logits, starts = self.logits(rs, [p + a for p, a in zip(prompts, answers)])
            pred = logits.argmax(-1).cpu()
            for b, (p, a) in enumerate(zip(prompts, answers)):
                first = starts[b] + len(p)  # index of the first answer token
                out.append(pred[b, first - 1:first - 1 + len(a)].tolist() == a)
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
            used = sum(self.kv_store.kv[r][0].shape[1] for r in rows[0].tolist() if r >= 0)
            cache = m.new_cache(1, len(_head(m)) + used + len(prompt) + n_decode)
            n = self.kv_store.fill(cache, 0, rows[0].tolist()) + len(prompt)
            tokens, memories = torch.tensor([prompt], device=m.device), None
        else:
            ids = self._context(rows[0].tolist()) + prompt
            n = len(ids)
            cache = m.new_cache(1, n + n_decode)
            tokens = torch.tensor([ids], device=m.device)
            memories = self.reader(rows, n_chunks(c, n + n_decode)) if self.mode == "memory" else None
        lens = torch.tensor([n], dtype=torch.int32, device=m.device)
        logits = m(tokens, memories, cache=cache, kv_lens=lens, logits_at=torch.tensor([tokens.shape[1] - 1]))
        token = logits[:, -1].argmax(-1)
        _sync(m.device)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n_decode):
            n += 1
            lens = torch.tensor([n], dtype=torch.int32, device=m.device)
            token = m(token[:, None], memories, cache=cache, kv_lens=lens)[:, -1].argmax(-1)
        _sync(m.device)
        return ttft, n_decode / (time.perf_counter() - t1) if n_decode else float("nan")


def time_methods(answerers: dict[str, Answerer], questions: Sequence[Question], retriever, n_decode: int,
                 repeats: int = 1) -> dict[str, dict]:
    """Per method name: medians over questions x repeats of time to first token (ms; the
    shared retrieval + the method's own part), its parts, and decode tokens/s (module
    docstring: one retrieval per question, methods interleaved in a rotated order)."""
    if not answerers or not questions or repeats < 1:
        raise ValueError("time_methods needs answerers, questions and repeats >= 1")
    names = list(answerers)
    k = max(a.k for a in answerers.values())
    tokenizer = next(iter(answerers.values())).tokenizer
    runs: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    warm = True  # one untimed pass first
    for j, q in enumerate([questions[0]] + [q for _ in range(repeats) for q in questions]):
        rows, t_ret = torch.full((1, 0), -1, dtype=torch.long), 0.0
        if k:
            t0 = time.perf_counter()
            rows = retrieve(retriever, tokenizer, [q], k).rows
            t_ret = time.perf_counter() - t0
        for name in names[j % len(names):] + names[:j % len(names)]:
            a = answerers[name]
            ttft, tok_s = a.time_question(q, rows, n_decode)
            if not warm:
                runs[name].append((t_ret if a.mode != "none" else 0.0, ttft, tok_s))
        warm = False
    out = {}
    for name, r in runs.items():
        out[name] = {"ttft_ms": 1e3 * statistics.median(x[0] + x[1] for x in r),
                     "retrieval_ms": 1e3 * statistics.median(x[0] for x in r),
                     "prefill_ms": 1e3 * statistics.median(x[1] for x in r),
                     "decode_tok_s": statistics.median(x[2] for x in r), "timed_questions": len(r)}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
