"""Binding experiments: can the demo's small model pick the right one of 5 memories at the
paper's parallel positions? (issue 16; TRAINING.md "the open problem"; bench/RESULTS.md)

    nice -n 10 python bench/binding_experiments.py --setting demo --steps 700
    nice -n 10 python bench/binding_experiments.py --setting bind1 --steps 700
    python bench/binding_experiments.py --list

One run = the demo's small model (d=128, 4 layers, 4/2 heads, head dim 32, memory layers
0-1) trained by `memory3.train.Trainer` on the demo's knowledge base and tokenizer with the
setting's recipe, then measured on held-out people with the memories handed in (the right
biography among random others, shuffled: independent of the retriever), as
`memory3.train.evaluate.exact_match` does:

- exact match with 1 right memory, with 2 (when the setting trains with 2) and 5 shuffled,
  and with 1 biography as text (RAG);
- the answer loss over the last memory steps (binding has begun only when it is clearly below
  ln R: ln 5 = 1.61);
- the attention share on the right memory at the answer position (softmax over the memory
  keys, per memory layer and query head; 1/R = no preference), held-out, 5 shuffled.

Settings (``--list``): the demo recipe alone; (a) `TrainConfig.bind_supervision` (attention on
the right memory supervised in memory layer 1, `memory3/train/binding.py`); (a') the same plus
`NameMoverLoss` here (layer 0 supervised to attend to name tokens: the first step of the
binding composition); (b) an associative-recall pre-stage (`AssociativeRecallTask`) before the
demo recipe. Results: bench/RESULTS.md, "Binding experiments, third session" (nothing binds).

Each run prints one markdown row and writes ``<out>/<setting>-<steps>.json``. The knowledge
base and BPE tokenizer are the demo's (seed 0), trained once into ``<out>/tokenizer.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from memory3.memory.encoder import encode_references
from memory3.model import Memories, Memory3Config, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer, train_bpe
from memory3.train import binding
from memory3.train.config import TrainConfig
from memory3.train.demo import DemoSizes
from memory3.train.evaluate import exact_match
from memory3.train.init import init_for_training
from memory3.train.synthetic import ATTRIBUTES, SyntheticConfig, SyntheticKnowledgeBase
from memory3.train.tasks import IGNORE, Batch, SyntheticRecipe, SyntheticTask, n_chunks, pad_rows
from memory3.train.trainer import LossModel, Trainer
from memory3.model.transformer import apply_rope, rope_cos_sin

DEMO_RECIPE = {"curriculum_start": 0.4, "curriculum_frac": 0.2}  # demo.py's parallel recipe
SETTINGS: dict[str, dict] = {
    "demo": dict(DEMO_RECIPE),
    # (a) attention supervision on memory layer 1 (binding.py), weight and window
    "bind1": dict(DEMO_RECIPE, bind_supervision=1.0),
    "bind0.1": dict(DEMO_RECIPE, bind_supervision=0.1),
    "bind1-half": dict(DEMO_RECIPE, bind_supervision=1.0, bind_until=0.5),
    "bind1-early": dict(curriculum_start=0.1, curriculum_frac=0.1, bind_supervision=1.0),
    "bind1-early-off": dict(curriculum_start=0.1, curriculum_frac=0.1, bind_supervision=1.0, bind_until=0.6),
    "bind1-both": dict(DEMO_RECIPE, bind_supervision=1.0, bind_layers=(0, 1)),
    "bind1-2mem": dict(curriculum_start=0.1, curriculum_frac=0.0, max_memories=2, bind_supervision=1.0),
    # (a') both steps of the composition supervised: layer 0 moves the name (NameMoverLoss)
    "names": dict(DEMO_RECIPE, name_mover=1.0),
    "names-bind1": dict(DEMO_RECIPE, name_mover=1.0, bind_supervision=1.0, name_heads=None),
    "name-head-bind1": dict(DEMO_RECIPE, name_mover=1.0, bind_supervision=1.0),  # layer 0's head 0 only
    "name-ctx-bind1": dict(DEMO_RECIPE, name_mover=1.0, bind_supervision=1.0, name_sides=("ctx",)),
    # the reference side from attribute-value tokens only (every token attending to names made
    # names the most-attended tokens, which the encoder's top-8 then keeps instead of values)
    "name-values-bind1": dict(DEMO_RECIPE, name_mover=1.0, bind_supervision=1.0, name_sides=("ctx", "values")),
    # the same with every reference token kept (k=32): is top-8 crowding what stops the reading?
    "name-values-bind1-k32": dict(DEMO_RECIPE, name_mover=1.0, bind_supervision=1.0, name_sides=("ctx", "values"),
                                  memory_tokens=32),
    "names-bind1-early": dict(curriculum_start=0.1, curriculum_frac=0.1, name_mover=1.0, bind_supervision=1.0),
    # (b) associative recall (MQAR-like, in context) before the demo recipe
    "mqar": dict(DEMO_RECIPE, mqar_steps=1000),
    "mqar-bind1": dict(DEMO_RECIPE, mqar_steps=1000, bind_supervision=1.0),
}


class AssociativeRecallTask:
    """MQAR-like sequences, no memory: ``<s> n1 v1 n2 v2 ... n8 v8 . n3 v3 n7 v7 ...`` with
    the demo's names and attribute values; loss on the queried values only. Small transformers
    form a content-matching (induction) circuit on this fast; does it carry over to memory?"""

    def __init__(self, kb: SyntheticKnowledgeBase, tokenizer: Memory3Tokenizer, config: Memory3Config, *,
                 micro_batch: int, pairs: int = 8, queries: int = 5, seed: int = 0) -> None:
        self.kb, self.tok, self.config = kb, tokenizer, config
        self.micro_batch, self.pairs, self.queries, self.seed = micro_batch, pairs, queries, seed
        self.values = [v for a in ATTRIBUTES for v in a.values]

    def sample(self, step: int, index: int) -> tuple[list[int], list[int]]:
        rng = random.Random(f"{self.seed}:mqar:{step}:{index}")
        people = self.kb.fresh_people(rng.getrandbits(64))
        names = list(dict.fromkeys(next(people).name for _ in range(self.pairs * 2)))[:self.pairs]
        values = [rng.choice(self.values) for _ in names]
        ids = list(self.config.prefix_ids) + [self.config.bos_id]
        for n, v in zip(names, values):
            ids += self.tok.encode(f" {n} {v}")
        ids += self.tok.encode(" .")
        supervised = [False] * len(ids)  # is token i an answer (a queried value)?
        for i in rng.sample(range(len(names)), min(self.queries, len(names))):
            name, value = self.tok.encode(f" {names[i]}"), self.tok.encode(f" {values[i]}")
            ids += name + value
            supervised += [False] * len(name) + [True] * len(value)
        targets = [t if s else IGNORE for t, s in zip(ids[1:], supervised[1:])] + [IGNORE]
        return ids, targets

    def batch(self, step: int, micro: int) -> Batch:
        samples = [self.sample(step, micro * self.micro_batch + i) for i in range(self.micro_batch)]
        return Batch(pad_rows([s[0] for s in samples], self.config.pad_id), pad_rows([s[1] for s in samples], IGNORE))


class NameMoverLoss(LossModel):
    """LossModel plus the first step of the binding composition, supervised: in layer 0
    (query heads ``heads``, default head 0 alone, so the other heads stay free to move the
    question's attribute), every reference token after the person's first name, and every
    answer position of the context, should attend to name tokens (share of the causal softmax on keys whose token is
    a name; all names in a reference or a question's context are the right person's). Adds
    ``weight`` x -log share, mean over heads, summed over the answer positions (the reference
    side averaged per reference and scaled to the same count)."""

    def __init__(self, model, bind_layers, name_ids: Tensor, weight: float, heads=(0,), sides=("ctx", "ref"),
                 value_ids: Tensor | None = None) -> None:
        super().__init__(model, bind_layers)
        self.sides, self.value_ids = sides, value_ids
        self.name_ids, self.weight, self.log = name_ids, weight, []
        self.heads = list(range(model.config.n_heads)) if heads is None else list(heads)

    def _share(self, q: Tensor, k: Tensor, positions: Tensor, is_name: Tensor, queries: Tensor) -> Tensor:
        """-log share on name keys, mean over heads, per query [n]: q [B, T, Hq*D], k [B, T, Hkv*D]
        pre-RoPE, positions [B, T], is_name [B, T] keys, queries [B, T] bool."""
        c = self.model.config
        B, T = is_name.shape
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base, torch.float32)
        q = apply_rope(q.float().view(B, T, c.n_heads, c.head_dim), cos, sin)
        k = apply_rope(k.float().view(B, T, c.n_kv_heads, c.head_dim), cos, sin)
        k = k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=2)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) * c.head_dim ** -0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        logp = logits.log_softmax(-1)
        # finite fill: a row without any name key (not a query) must not give NaN gradients
        named = logp.masked_fill(~is_name[:, None, None, :], -1e30).logsumexp(-1)  # [B, H, T]
        return -named[:, self.heads].permute(0, 2, 1)[queries].mean(-1)

    def forward(self, tokens, targets, refs=None, ref_lens=None, mem_ids=None, right=None, bind_weight=0.0):
        attn = self.model.layers[0].attention
        calls = {"q": [], "k": []}
        hooks = [attn.wq.register_forward_hook(lambda _m, _i, out: calls["q"].append(out)),
                 attn.wk.register_forward_hook(lambda _m, _i, out: calls["k"].append(out))]
        try:
            objective = super().forward(tokens, targets, refs, ref_lens, mem_ids, right, bind_weight)
        finally:
            for h in hooks:
                h.remove()
        if refs is None or not self.weight:
            return objective
        c = self.model.config
        names = self.name_ids.to(tokens.device)
        # the reference side (the encoder's call came first): [prefix, ref tokens]
        seq = torch.cat([torch.tensor(c.prefix_ids, device=refs.device).expand(len(refs), -1), refs], dim=1)
        S = seq.shape[1]
        is_name = torch.isin(seq, names)
        valid = torch.arange(S, device=seq.device)[None] < (ref_lens[:, None] + c.prefix_len)
        seen_name = is_name.cumsum(1) > 0
        ref_queries = valid & ~is_name & seen_name
        if "values" in self.sides:  # only the attribute values move the name
            ref_queries &= torch.isin(seq, self.value_ids.to(seq.device))
        ref_loss = self._share(calls["q"][0], calls["k"][0], torch.arange(S, device=seq.device).expand(len(refs), -1),
                               is_name, ref_queries)
        # the context side: the answer positions
        B, T = tokens.shape
        index = torch.arange(T, device=tokens.device).expand(B, T)
        where = targets != IGNORE
        ctx_loss = self._share(calls["q"][1], calls["k"][1], index + c.context_offset * (index >= c.prefix_len),
                               torch.isin(tokens, names), where)
        n = int(where.sum())
        aux = ctx_loss.sum() * ("ctx" in self.sides) + ref_loss.mean() * n * ("ref" in self.sides or "values" in self.sides)
        self.log.append([(-ctx_loss).exp().mean().item(), (-ref_loss).exp().mean().item()])
        return objective + self.weight * aux


class LoggingTrainer(Trainer):
    """Prints a line every 50 steps (loss, right-memory share, name shares) for watching a run."""

    def train_step(self, step: int) -> dict:
        record = super().train_step(step)
        if step % 50 == 0 or step == self.config.steps - 1:
            extra = getattr(self.inner_loss, "log", None)
            print(f"step {step} loss {record['loss']:.3f} memory {record['memory']} "
                  f"right_share {record.get('right_share', float('nan')):.3f}"
                  + (f" name_share ctx/ref {extra[-1]}" if extra else ""), file=sys.stderr, flush=True)
        return record


def value_token_ids(tokenizer: Memory3Tokenizer) -> Tensor:
    """Ids of the attribute values as they follow a word in a biography (one token each)."""
    return torch.tensor(sorted({tokenizer.encode(" " + v)[0] for a in ATTRIBUTES for v in a.values}))


def name_token_ids(tokenizer: Memory3Tokenizer, kb: SyntheticKnowledgeBase) -> Tensor:
    """Ids of the one-token names of the pool, with and without a leading space."""
    ids = set()
    for name in kb.first_names:
        for text in (name, " " + name):
            got = tokenizer.encode(text)
            if len(got) == 1:
                ids.add(got[0])
    return torch.tensor(sorted(ids))


@torch.no_grad()
def right_memory_share(model: Memory3Model, tokenizer: Memory3Tokenizer, kb: SyntheticKnowledgeBase, people,
                       n_refs: int = 5, seed: int = 0, batch_size: int = 64) -> list[list[float]]:
    """Mean attention share on the right memory at the answer position (the last prompt
    token), per memory layer and query head, with n_refs memories (right + random others,
    shuffled, as exact_match draws them)."""
    c = model.config
    rng = random.Random(f"share:{seed}")
    items = []
    for q in kb.questions_for(people):
        right = kb.person(q.person_id)
        shown = [right]
        while len(shown) < n_refs:
            p = rng.choice(kb.people)
            if p.name != right.name and p not in shown:
                shown.append(p)
        rng.shuffle(shown)
        items.append((q, shown))
    layers = tuple(c.memory_layers)
    total = torch.zeros(len(layers), c.n_heads)
    model.eval()
    head = list(c.prefix_ids) + [c.bos_id]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        rows = [head + tokenizer.encode(" " + q.prompt) for q, _ in chunk]
        tokens = pad_rows(rows, c.pad_id)
        where = torch.zeros(tokens.shape, dtype=torch.bool)
        for b, r in enumerate(rows):
            where[b, len(r) - 1] = True
        refs = [tokenizer.reference_ids(kb.reference_text(p), c.ref_len) for _, shown in chunk for p in shown]
        memory = encode_references(model, pad_rows(refs, c.pad_id), torch.tensor([len(r) for r in refs]))
        ids = torch.arange(len(refs), dtype=torch.int32).view(len(chunk), 1, n_refs)
        ids = ids.expand(-1, n_chunks(c, tokens.shape[1]), -1).contiguous()
        right = torch.tensor([shown.index(kb.person(q.person_id)) for q, shown in chunk])
        with binding.capture_queries(model, layers) as queries:
            model(tokens, Memories.from_stacked(memory, ids), logits_at=torch.tensor([len(r) - 1 for r in rows]))
        total += binding.answer_log_shares(model, queries, where, memory, ids, right, layers).exp().sum(0)
    model.train()
    return (total / len(items)).tolist()


def tokenizer_for(out: Path, kb: SyntheticKnowledgeBase, sizes: DemoSizes) -> Memory3Tokenizer:
    path = out / "tokenizer.json"
    if not path.exists():
        from memory3.train.run import tokenizer_texts
        out.mkdir(parents=True, exist_ok=True)
        train_bpe(tokenizer_texts(kb, [], n_samples=sizes.tokenizer_samples), sizes.vocab).save(path)
    return Memory3Tokenizer.from_file(path)


def run(setting: str, steps: int, out: Path, eval_people: int, seed: int) -> dict:
    sizes = DemoSizes.default()
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=sizes.n_train, n_heldout=sizes.n_heldout,
                                                n_names=sizes.n_names, seed=seed))
    tok = tokenizer_for(out, kb, sizes)
    overrides = dict(SETTINGS[setting])
    config = Memory3Config(vocab_size=tok.vocab_size, memory_tokens=overrides.pop("memory_tokens", 8), **sizes.small)
    model = init_for_training(Memory3Model(config), seed=seed)
    mqar_steps = overrides.pop("mqar_steps", 0)
    name_mover = overrides.pop("name_mover", 0.0)
    name_heads = overrides.pop("name_heads", (0,))
    name_sides = overrides.pop("name_sides", ("ctx", "ref"))
    run_dir = out / "runs" / f"{setting}-{steps}"
    loads, t0 = [os.getloadavg()[0]], time.perf_counter()
    if mqar_steps:
        tc = TrainConfig.recipe_defaults("single-stage", steps=mqar_steps, batch_size=sizes.batch_size, seed=seed)
        pre = Trainer(model, lambda r, w, m: AssociativeRecallTask(kb, tok, config, micro_batch=m, seed=seed), tc,
                      run_dir / "mqar", resume=False)
        pre.fit()
        mqar_tail = _mean([h["loss"] for h in pre.history[-20:]])
        loads.append(os.getloadavg()[0])
    tc = TrainConfig.recipe_defaults("single-stage", steps=steps, batch_size=sizes.batch_size, seed=seed,
                                     **overrides)
    recipe = SyntheticRecipe.from_config(tc)
    trainer = LoggingTrainer(model, lambda r, w, m: SyntheticTask(kb, tok, config, recipe=recipe, total_steps=steps,
                                                                   micro_batch=m, seed=seed, rank=r, world_size=w),
                             tc, run_dir / "main", resume=False)
    if name_mover:
        trainer.loss_model = trainer.inner_loss = NameMoverLoss(trainer.model, trainer.bind_layers,
                                                                name_token_ids(tok, kb), name_mover, name_heads,
                                                                name_sides, value_token_ids(tok))
    trainer.fit()
    minutes = (time.perf_counter() - t0) / 60
    loads.append(os.getloadavg()[0])
    model = trainer.model
    people = kb.heldout_people[:eval_people]
    R = tc.max_memories
    mem_steps = [h for h in trainer.history if h["memory"]]
    tail = mem_steps[-max(1, len(mem_steps) // 5):]
    result = {
        "setting": setting, "steps": steps, "overrides": SETTINGS[setting], "minutes": minutes,
        "load": [min(loads), max(loads)], "threads": torch.get_num_threads(),
        "acc_1": exact_match(model, tok, kb, people, mode="memory", n_refs=1, seed=seed),
        "acc_5": exact_match(model, tok, kb, people, mode="memory", n_refs=5, seed=seed),
        "acc_rag_1": exact_match(model, tok, kb, people, mode="rag", n_refs=1, seed=seed),
        "tail_answer_loss": _mean([h["loss"] for h in tail]), "tail_steps": len(tail),
        "tail_memories": R, "ln_R": math.log(R),
        "share_5": right_memory_share(model, tok, kb, people, 5, seed),
        "train_right_share": [[h["step"], round(h["right_share"], 4)] for h in trainer.history if "right_share" in h],
    }
    if R == 2:
        result["acc_2"] = exact_match(model, tok, kb, people, mode="memory", n_refs=2, seed=seed)
        result["share_2"] = right_memory_share(model, tok, kb, people, 2, seed)
    if name_mover:
        log = trainer.inner_loss.log
        result["train_name_share"] = [[round(a, 3), round(b, 3)] for a, b in log[::max(1, len(log) // 40)]]
    if mqar_steps:
        result["mqar_steps"], result["mqar_tail_loss"] = mqar_steps, mqar_tail
    return result


def row(r: dict) -> str:
    share = " / ".join(f"L{i} {max(h):.2f}" for i, h in enumerate(r["share_5"]))  # best head per layer
    two = f", 2: {r['acc_2']:.3f}" if "acc_2" in r else ""
    return (f"| {r['setting']} | {r['steps']}{' + %d MQAR' % r['mqar_steps'] if 'mqar_steps' in r else ''} | "
            f"{r['minutes']:.1f} ({r['load'][0]:.1f}-{r['load'][1]:.1f}) | {r['acc_1']:.3f} | "
            f"{r['acc_5']:.3f}{two} | {r['acc_rag_1']:.3f} | {r['tail_answer_loss']:.2f} (ln {r['tail_memories']} = "
            f"{r['ln_R']:.2f}) | {share} |")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="demo")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--out", default="/tmp/memory3-binding", help="tokenizer, runs and results (default %(default)s)")
    p.add_argument("--eval-people", type=int, default=60, help="held-out people asked 5 questions each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, s in SETTINGS.items():
            print(f"{name}: {s}")
        return 0
    if args.steps < 1 or args.eval_people < 1 or args.threads < 1:
        print("error: --steps, --eval-people and --threads must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    r = run(args.setting, args.steps, out, args.eval_people, args.seed)
    path = out / f"{args.setting}-{args.steps}.json"
    path.write_text(json.dumps(r, indent=1) + "\n")
    print("| setting | steps | minutes (load) | 1 right memory | 5 shuffled | RAG, 1 bio | answer loss, last 20% "
          "of memory steps | attention share on the right memory, 5 shuffled (best head) |")
    print(row(r))
    print(f"per head: {r['share_5']}\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
