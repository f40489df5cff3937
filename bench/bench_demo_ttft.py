"""Time to first token of the demo's ways of answering as the model grows (issue 16): is explicit
memory's lead over full-KV reuse a property of the demo's tiny model, or does it grow with size?

Per size, an untrained model (time does not depend on the weights) of the demo's layout, its
own int8 bank of the synthetic biographies (encoded by that model, then opened as the demo opens
it: shard files memory-mapped, rows read in place by id) and its own full-KV store (bf16, saved
and read back memory-mapped). Every question "retrieves" the same fixed rows (its person first,
then 4 others, by a stub retriever: retrieval is the same step for every method), and each method
is timed from those rows to its first token exactly as the demo times it
(memory3.train.demo_eval.time_methods: methods interleaved in a rotating order, batch 1, one
thread). Reported: the median own part per method and the paired per-question differences
memory - full KV and memory - RAG with their 95% bootstrap intervals (memory3.train.demo_stats).

    python bench/bench_demo_ttft.py                          # demo, d256, d512 (~3 min on one core)
    python bench/bench_demo_ttft.py --sizes demo --questions 120 --repeats 3
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from memory3.memory.bank import Bank
from memory3.memory.encoder import encode_texts
from memory3.memory.manifest import MemoryShape
from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import train_bpe
from memory3.train.demo_eval import Answerer, FullKVStore, time_methods
from memory3.train.demo_stats import bootstrap_median, per_question_differences
from memory3.train.init import init_for_training
from memory3.train.run import tokenizer_texts
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

SIZES = {  # the demo's small model, then wider and deeper ones (memory in the first half of the layers)
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=344),
    "d256": dict(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=32, mlp_dim=688),
    "d512": dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, head_dim=64, mlp_dim=1376),
    "d1024": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=64, mlp_dim=2752),
}
METHODS = [("none", 0)] + [(m, k) for m in ("memory", "rag", "fullkv") for k in (1, 5)]


class FixedRetriever:
    """Returns the rows chosen for each question text (the right person's first)."""

    def __init__(self, rows: dict[str, list[int]]) -> None:
        self.rows = rows

    def retrieve(self, texts, k, **_):
        return SimpleNamespace(rows=torch.tensor([self.rows[t][:k] for t in texts]),
                               ids=[[str(r) for r in self.rows[t][:k]] for t in texts])


def measure(name: str, kb, tok, n_questions: int, repeats: int, work: Path) -> dict:
    config = Memory3Config(vocab_size=tok.vocab_size, **SIZES[name])
    model = init_for_training(Memory3Model(config), seed=0).eval()
    people = kb.people[:max(50, n_questions)]
    texts = [kb.reference_text(p) for p in people]
    shape = MemoryShape(config.n_memory_layers, config.n_kv_heads, config.memory_tokens, config.head_dim)
    bank = Bank.create(work / name / "bank", shape=shape, fingerprint=model.fingerprint(), codec="int8",
                       device="cpu", dtype=model.dtype)
    with torch.inference_mode():
        bank.append([p.id for p in people], texts, encode_texts(model, tok, texts, progress=False).float())
    bank.close()
    bank = Bank.open(work / name / "bank", expect_fingerprint=model.fingerprint(), dtype=model.dtype)  # mmap
    store = FullKVStore(model, tok)
    store.add(list(range(len(people))), texts)
    store.save(work / name)
    questions, chosen = [], {}
    for i, person in enumerate(people[:n_questions]):
        q = kb.questions_for([person])[i % 5]
        questions.append(q)
        chosen[q.prompt] = [i] + [(i + 7 * j) % len(people) for j in range(1, 5)]
    answerers = {f"{m}_{k}" if k else m: Answerer(model, tok, m, k, bank=bank, texts=dict(enumerate(texts)),
                                                  kv_store=store) for m, k in METHODS}
    got = time_methods(answerers, questions, FixedRetriever(chosen), n_decode=0, repeats=repeats)
    bank.close()
    out = {"size": name, "parameters": config.param_count(), "own_ms": {n: r["prefill_ms"] for n, r in got.items()}}
    for k in (1, 5):
        for other in ("fullkv", "rag"):
            out[f"memory_{k}-{other}"] = bootstrap_median(
                per_question_differences(got[f"memory_{k}"]["own_ms"], got[f"{other}_{k}"]["own_ms"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="demo,d256,d512", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        p.error(f"--sizes: unknown {', '.join(unknown)} (known: {', '.join(SIZES)})")
    torch.set_num_threads(args.threads)
    kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=1000, n_heldout=300, n_names=1500, seed=0))
    tok = train_bpe(tokenizer_texts(kb, [], n_samples=20000), 4096)
    print(f"own part of TTFT after retrieval, ms (median, batch 1, {args.threads} thread(s), {args.questions} questions"
          f" x {args.repeats}); memory - other: paired median [95% CI]\n")
    print("| size | params | no memory | memory 1 / 5 | RAG 1 / 5 | full KV 1 / 5 | memory - full KV, top-1 | "
          "top-5 | memory - RAG, top-1 | top-5 |")
    print("|---|---:|---:|---:|---:|---:|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            r = measure(name, kb, tok, args.questions, args.repeats, Path(tmp))
            o = r["own_ms"]
            ci = lambda key: f"{r[key]['median']:+.3f} [{r[key]['lo']:+.3f}, {r[key]['hi']:+.3f}]"  # noqa: E731
            print(f"| {name} | {r['parameters'] / 1e6:.1f}M | {o['none']:.2f} | "
                  f"{o['memory_1']:.2f} / {o['memory_5']:.2f} | {o['rag_1']:.2f} / {o['rag_5']:.2f} | "
                  f"{o['fullkv_1']:.2f} / {o['fullkv_5']:.2f} | "
                  f"{ci('memory_1-fullkv')} | {ci('memory_5-fullkv')} | {ci('memory_1-rag')} | {ci('memory_5-rag')} |",
                  flush=True)


if __name__ == "__main__":
    main()
