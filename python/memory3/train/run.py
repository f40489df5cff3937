"""Command line of the trainer, `torchrun`-ready:

    python -m memory3.train --recipe single-stage --out runs/kb --steps 3000
    torchrun --nproc_per_node 2 -m memory3.train --recipe single-stage --out runs/kb --device cpu
    python -m memory3.train --recipe warmup --data corpus.jsonl --out runs/warm --steps 20000
    python -m memory3.train --recipe continual --init runs/warm/model --data corpus.jsonl \
        --knowledge-base kb.jsonl --out runs/cont --steps 5000

The run folder gets ``tokenizer.json``, ``shards/`` (warmup/continual), ``step_*/``
checkpoints (resumed automatically), ``loss_curve.png``, ``history.json``, the final model in
``model/`` (config.json, model.safetensors, tokenizer.json) and ``summary.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer, train_bpe
from memory3.model.weights import from_pretrained, save_pretrained
from memory3.train.config import RECIPES, TrainConfig
from memory3.train.data import TokenShards, corpus_to_shards, read_documents
from memory3.train.distributed import DistInfo, barrier, init_distributed
from memory3.train.init import init_for_training
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase, biography, questions
from memory3.train.tasks import ContinualTask, SyntheticRecipe, SyntheticTask, WarmupTask
from memory3.train.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    from memory3.cli import CliParser  # usage mistakes as one line, exit 2, like every memory3 command

    p = CliParser(prog="memory3 train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=RECIPES, default="single-stage")
    p.add_argument("--out", required=True, help="run folder (checkpoints, model, plots); resumed when present")
    p.add_argument("--model", default="small", help="preset name (tiny, small, ...) or a model directory to start from")
    p.add_argument("--model-json", default="{}", help="JSON overrides of the model config, e.g. '{\"n_layers\": 6}'")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained when no --tokenizer is given")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of training one")
    p.add_argument("--data", nargs="*", default=[], help="jsonl / plain-text corpora (warmup, continual)")
    p.add_argument("--knowledge-base", help="jsonl of references (continual); default: the synthetic one")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: torch's default); 1 is fastest on a busy machine")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-people", type=int, default=300, help="held-out people scored at the end (single-stage)")
    syn = p.add_argument_group("synthetic knowledge base")
    for name, default in (("n_train", 1000), ("n_heldout", 300), ("n_names", 1500), ("name_words", 1)):
        syn.add_argument("--" + name.replace("_", "-"), type=int, default=default, dest="syn_" + name)
    syn.add_argument("--kb-seed", type=int, default=0)
    t = p.add_argument_group("training (defaults: the recipe's)")
    for f, kind in (("steps", int), ("batch_size", int), ("micro_batch", int), ("seq_len", int), ("lr", float),
                    ("schedule", str), ("warmup_frac", float), ("decay_frac", float), ("min_lr_ratio", float),
                    ("weight_decay", float), ("clip", float), ("precision", str), ("seed", int),
                    ("checkpoint_every", int), ("parallel", str), ("rag_share", float), ("max_memories", int),
                    ("curriculum_frac", float), ("curriculum_start", float), ("rag_references", int), ("right_first", float),
                    ("questions_per_sample", int), ("leak_threshold", float), ("ref_window", int)):
        t.add_argument("--" + f.replace("_", "-"), type=kind, dest="tc_" + f)
    return p


def synthetic_kb(args) -> SyntheticKnowledgeBase:
    return SyntheticKnowledgeBase(SyntheticConfig(
        n_train=args.syn_n_train, n_heldout=args.syn_n_heldout, n_names=args.syn_n_names,
        name_words=args.syn_name_words, seed=args.kb_seed))


def tokenizer_texts(kb: SyntheticKnowledgeBase, data: list[str], n_samples: int = 20000):
    """Text the BPE learns from: the corpora, or the knowledge base plus fresh samples (so
    every name and value becomes one token)."""
    if data:
        yield from itertools.chain.from_iterable(read_documents(d) for d in data)
        return
    rng = random.Random(0)
    for r in kb.references():
        yield r["text"]
    for person in itertools.islice(kb.fresh_people(-1), n_samples):
        yield biography(person, rng) + " " + " ".join(q.text + " ." for q in questions(person, rng))


def shared_tokenizer(args, out: Path, kb: SyntheticKnowledgeBase, dist: DistInfo) -> Memory3Tokenizer:
    """The run's tokenizer: given, found in the run folder, or trained by rank 0."""
    path = Path(args.tokenizer) if args.tokenizer else out / "tokenizer.json"
    if not args.tokenizer and Path(args.model).is_dir():  # continue with the model's own tokenizer
        path = Path(args.model) / "tokenizer.json"
    if not path.exists() and dist.is_main:
        train_bpe(tokenizer_texts(kb, args.data), args.vocab).save(path)
    barrier(dist)
    return Memory3Tokenizer.from_file(path)


def model_overrides(args) -> dict:
    try:
        overrides = json.loads(args.model_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-json is not valid JSON ({e})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-json must be a JSON object, got {args.model_json!r}")
    return overrides


def make_model(args, tokenizer: Memory3Tokenizer) -> Memory3Model:
    overrides = model_overrides(args)
    if Path(args.model).is_dir():
        if overrides:
            raise ValueError("--model-json cannot change a model loaded from a directory")
        return from_pretrained(args.model)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    model = Memory3Model(Memory3Config.preset(args.model, **overrides))
    return init_for_training(model, seed=0)  # the same weights on every rank


def text_retriever(texts: list[str]):
    """Top-k knowledge-base rows for query texts by the default embedder (exact search)."""
    from memory3.retrieval import Embedder, VectorIndex
    embedder = Embedder()
    index = VectorIndex(embedder.dim, "flat")
    index.add(embedder.embed(texts, progress=True))
    return lambda queries, k: [[r for r in row if r >= 0] for row in index.search(embedder.embed(queries), k)[1].tolist()]


def main(argv: list[str] | None = None) -> int:
    """Train; user mistakes (bad options, unreadable files) print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return train_from_args(args)
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


def train_from_args(args: argparse.Namespace) -> int:
    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("tc_") and v is not None}
    config = TrainConfig.recipe_defaults(args.recipe, **overrides)
    if args.recipe != "single-stage" and not args.data:
        raise ValueError("--data is required for the warmup and continual recipes")
    model_overrides(args)  # fail on a bad --model-json before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = init_distributed(args.device)
    out = Path(args.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    kb = synthetic_kb(args)
    tokenizer = shared_tokenizer(args, out, kb, dist)
    model = make_model(args, tokenizer)
    mc = model.config
    if args.recipe == "single-stage":
        recipe = SyntheticRecipe.from_config(config)
        make_task = lambda r, w, m: SyntheticTask(kb, tokenizer, mc, recipe=recipe, total_steps=config.steps,  # noqa: E731
                                                   micro_batch=m, seed=config.seed, rank=r, world_size=w)
    else:
        if dist.is_main and not (out / "shards" / "manifest.json").exists():
            corpus_to_shards(args.data, tokenizer, out / "shards", eos_id=mc.eos_id)
        barrier(dist)
        shards = TokenShards(out / "shards")
        shards.check_tokenizer(tokenizer)
        if args.recipe == "warmup":
            make_task = lambda r, w, m: WarmupTask(shards, mc, seq_len=config.seq_len, micro_batch=m,  # noqa: E731
                                                    seed=config.seed, rank=r, world_size=w)
        else:
            refs = list(read_documents(args.knowledge_base)) if args.knowledge_base \
                else [r["text"] for r in kb.references()]
            ref_ids = [tokenizer.reference_ids(t, mc.ref_len) for t in refs]
            retriever = text_retriever(refs)
            make_task = lambda r, w, m: ContinualTask(  # noqa: E731
                shards, mc, references=ref_ids, retriever=retriever, detokenize=tokenizer.decode,
                seq_len=config.seq_len, micro_batch=m, candidates=config.retrieve_candidates,
                window=config.ref_window, leak_threshold=config.leak_threshold, seed=config.seed, rank=r, world_size=w)
    trainer = Trainer(model, make_task, config, out, dist=dist, resume=not args.no_resume,
                      progress=not args.no_progress)
    summary = trainer.fit()
    model = trainer.export_model()
    if dist.is_main:
        save_pretrained(model, out / "model", tokenizer)
        if args.recipe == "single-stage" and args.eval_people:
            summary["heldout_exact_match"] = evaluate_synthetic(model, tokenizer, kb, args.eval_people,
                                                                config.max_memories, config.right_first is not None)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    barrier(dist)
    return 0


def evaluate_synthetic(model, tokenizer, kb, n_people: int, max_memories: int, right_first: bool = False) -> dict:
    """TRAINING.md's table on held-out people: no memory, 1 and max_memories memories
    (right among others, shuffled; and right first when trained so), max_memories wrong
    memories, RAG with 1 and max_memories biographies, and the type-only ceiling."""
    from memory3.train.evaluate import exact_match
    people = kb.heldout_people[:n_people]
    score = lambda **kw: round(exact_match(model, tokenizer, kb, people, **kw), 4)  # noqa: E731
    from memory3.train.synthetic import simulated_type_only_ceiling
    k = max_memories
    out = {"no_memory": score(mode="none"), "memory_1": score(mode="memory", n_refs=1),
           f"memory_{k}": score(mode="memory", n_refs=k), f"wrong_{k}": score(mode="memory", n_refs=k, wrong=True),
           "rag_1": score(mode="rag", n_refs=1), f"rag_{k}": score(mode="rag", n_refs=k),
           f"type_only_ceiling_{k}": round(simulated_type_only_ceiling(k), 4)}
    if right_first:
        out[f"memory_{k}_right_first"] = score(mode="memory", n_refs=k, right_first=True)
    return out
