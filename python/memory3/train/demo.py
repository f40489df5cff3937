"""`memory3 demo`: explicit memory on a synthetic knowledge base, end to end, measured.

    memory3 demo                    # ~495 CPU s (~8.5 min on a free core), report in ./memory3-demo
    memory3 demo --quick --out /tmp/d   # a short run (tests): every stage, tiny sizes
    memory3 demo --scale 8 --device cuda  # 8x the training steps (a GPU)

Stages (each writes ``stages/<name>.json`` when done; a re-run skips finished stages and
training resumes from its last checkpoint):

1. ``corpus``: the synthetic knowledge base (train and held-out people, `synthetic.py`) and
   a BPE tokenizer trained on it.
2. ``train-parallel``, ``train-ranked``: the small memory model, TRAINING.md's single-stage
   recipe (memories in the graph from step 0, 20% RAG steps, answer-only loss, one memory for
   the first 40% of the steps, then 1 -> 5), with the paper's parallel memory positions and with ranked positions
   (right memory first in 80% of samples, so the model learns to trust retrieval order).
3. ``train-large``: a model with ~4x the parameters and no memory layers, trained on every
   biography (held-out ones too) and its questions: knowledge in the weights, for about the
   training wall time of one small model.
4. ``bank-parallel``, ``bank-ranked``: every biography (held-out included) encoded by that
   model into an int8 memory bank with the all-MiniLM-L6-v2 embeddings.
5. ``retrieval``: each held-out question retrieves its top-5 over the whole bank.
6. ``eval-*``: exact match and timing per way of answering (demo_eval.py).
7. ``report.md``, ``results.json`` and PNG plots (demo_report.py).

Before each stage the torch thread count is set from the idle cores (``--threads`` fixes it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memory3.model import Memory3Config, Memory3Model
from memory3.model.tokenizer import Memory3Tokenizer, train_bpe
from memory3.model.weights import from_pretrained, save_pretrained
from memory3.train.config import TrainConfig
from memory3.train.init import init_for_training
from memory3.train.synthetic import (SyntheticConfig, SyntheticKnowledgeBase, biography, simulated_type_only_ceiling,
                                     type_only_ceiling)
from memory3.train.tasks import IGNORE, Batch, SyntheticRecipe, SyntheticTask, pad_rows

VARIANTS = ("parallel", "ranked")  # memory position layouts trained and compared


@dataclass
class DemoSizes:
    """Every size of a demo run. ``default()`` on the 2-core CPU machine (2026-11-29, third session,
    bench/RESULTS.md): 495 CPU seconds at 1 torch thread (training 165 + 163 + 88, evaluation
    25 + 25 + 5, banks 17), so ~8.5 min on a free core; 16 min wall with a load average of 6-9."""
    n_train: int = 1000
    n_heldout: int = 300
    n_names: int = 1500
    vocab: int = 4096
    tokenizer_samples: int = 20000
    small: dict = field(default_factory=lambda: dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                                                     mlp_dim=344))
    large: dict = field(default_factory=lambda: dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32,
                                                     mlp_dim=688, memory_layers=()))
    # the larger model costs ~4x a small one per step; it stays at chance on held-out people within
    # any CPU budget here (0.05 after 80 and after 100 steps, bench/RESULTS.md): 80 keep the run short
    steps: dict = field(default_factory=lambda: {"parallel": 600, "ranked": 600, "large": 80})
    # TRAINING.md's single-stage recipe, with one memory for the first 40% of the steps: reading
    # one memory is learned far faster alone (bench/RESULTS.md, 2026-11-29 binding experiments)
    recipe: dict = field(default_factory=lambda: {"curriculum_start": 0.4, "curriculum_frac": 0.2})
    batch_size: int = 32
    eval_people: int = 200          # held-out people asked 5 questions each (95% CI <= +-0.031)
    timed_questions: int = 120      # batch 1, every method on each (demo_eval.time_methods): paired TTFT CIs
    timing_repeats: int = 3         # the paired comparison takes each method's fastest repeat per question
    decode_questions: int = 8       # of the timed ones, those also timed decoding (~10x a first token)
    decode_tokens: int = 16

    @classmethod
    def default(cls, scale: float = 1.0) -> "DemoSizes":
        s = cls()
        s.steps = {k: max(1, int(v * scale)) for k, v in s.steps.items()}
        return s

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(n_train=80, n_heldout=20, n_names=200, vocab=700, tokenizer_samples=1000,
                   small=dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=172),
                   large=dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=344,
                              memory_layers=()),
                   steps={"parallel": 6, "ranked": 6, "large": 4}, batch_size=8, eval_people=20,
                   timed_questions=3, timing_repeats=1, decode_questions=1, decode_tokens=4)


class AllBiographiesTask:
    """The large model's training data: a random person of the whole knowledge base (held-out
    ones included) per sample, a freshly rendered biography (loss on every token) followed by
    its questions (loss on the answers). No memory: the facts must go into the weights."""

    def __init__(self, kb: SyntheticKnowledgeBase, tokenizer: Memory3Tokenizer, config: Memory3Config, *,
                 micro_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.kb, self.tokenizer, self.config = kb, tokenizer, config
        self.micro_batch, self.seed, self.rank, self.world_size = micro_batch, seed, rank, world_size
        # its qa_rows: the questions with answer-only targets, as the memory models see them
        self.qa = SyntheticTask(kb, tokenizer, config, recipe=SyntheticRecipe(), total_steps=1, micro_batch=1)

    def sample(self, step: int, index: int) -> tuple[list[int], list[int]]:
        rng = random.Random(f"{self.seed}:all:{step}:{index}")
        person = rng.choice(self.kb.people)
        head = list(self.config.prefix_ids) + [self.config.bos_id]
        bio = self.tokenizer.encode(" " + biography(person, rng))
        qa_ids, qa_targets = self.qa.qa_rows(person, rng)
        targets = [IGNORE] * (len(head) - 1) + bio + [IGNORE] + qa_targets  # bio's last token -> question: no loss
        return head + bio + qa_ids, targets

    def batch(self, step: int, micro: int) -> Batch:
        first = (micro * self.world_size + self.rank) * self.micro_batch
        samples = [self.sample(step, first + i) for i in range(self.micro_batch)]
        return Batch(pad_rows([s[0] for s in samples], self.config.pad_id), pad_rows([s[1] for s in samples], IGNORE))


class TextCachedEmbedder:
    """An embedder that embeds each text once: both banks hold the same biographies (95% of
    a bank's encoding time was the embedder). Banks only; retrieval is timed, so it uses the
    plain embedder."""

    def __init__(self, embedder) -> None:
        self.inner, self.cache = embedder, {}
        self.name, self.dim = embedder.name, embedder.dim

    def spec(self) -> dict:
        return self.inner.spec()

    def embed(self, texts, *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            self.cache.update(zip(todo, self.inner.embed(todo, batch_size=batch_size, progress=progress)))
        return torch.stack([self.cache[t] for t in texts]) if texts else self.inner.embed([])


def idle_cores(own_threads: float = 0.0) -> int:
    """CPU cores not busy with other work: the cores less the 1-minute load average (less
    ``own_threads``, this process's share of it), at least 1. On the 2-core machine shared
    with other jobs (load ~5), a training step took 4.3 s with 2 threads against 0.74 s with
    1: a thread without a core of its own stalls the others at every barrier."""
    cores = os.cpu_count() or 1
    others = max(0.0, os.getloadavg()[0] - own_threads)
    return max(1, min(cores, int(cores - others + 0.5)))


class Demo:
    def __init__(self, out: str | Path, sizes: DemoSizes, *, seed: int = 0, device: str = "cpu",
                 progress: bool = True, threads: int = 0) -> None:
        """threads: torch CPU threads, or 0: chosen before each stage from the idle cores."""
        self.out, self.sizes, self.seed, self.device, self.progress = Path(out), sizes, seed, device, progress
        self.threads, self._own_load = threads, 0.0
        self.kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=sizes.n_train, n_heldout=sizes.n_heldout,
                                                         n_names=sizes.n_names, seed=seed))
        self.results: dict = {}
        self.t_start = time.perf_counter()
        self._embedder = self._bank_embedder = None

    # ------------------------------------------------------------------ stage bookkeeping

    def stage(self, name: str, fn) -> dict:
        """Run ``fn`` unless ``stages/<name>.json`` exists; its result is kept in results."""
        path = self.out / "stages" / f"{name}.json"
        if path.exists():
            self.log(f"{name}: done before, reusing {path}")
            result = json.loads(path.read_text())
        else:
            threads = self.threads
            if not threads and self.device == "cpu":
                threads = idle_cores(self._own_load)
            if threads:
                torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            self.log(f"{name} ... ({torch.get_num_threads()} threads, load average {load:.1f})")
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = fn()
            result["stage_seconds"] = round(time.perf_counter() - t0, 2)
            # CPU seconds of this process, all its threads: on a shared machine the wall time
            # depends on the other jobs, this does not (1 thread on a free core: wall ~ CPU)
            result["cpu_seconds"] = round(time.process_time() - cpu0, 2)
            result["threads"] = torch.get_num_threads()
            # what this stage added to the 1-minute load average (a short one: little)
            self._own_load = result["threads"] * min(1.0, result["stage_seconds"] / 60)
            result["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # at start, at end
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(path)
            self.log(f"{name}: {result['stage_seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s)")
        self.results[name] = result
        return result

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[demo {time.perf_counter() - self.t_start:6.1f}s] {text}", flush=True)

    @property
    def embedder(self):
        if self._embedder is None:
            from memory3.retrieval import Embedder
            self._embedder = Embedder(device=self.device)
        return self._embedder

    # ------------------------------------------------------------------ stages

    def corpus(self) -> dict:
        from memory3.train.run import tokenizer_texts
        paths = self.kb.write(self.out / "corpus")
        n = self.sizes.tokenizer_samples
        train_bpe(tokenizer_texts(self.kb, [], n_samples=n), self.sizes.vocab).save(self.out / "tokenizer.json")
        return {"paths": {k: str(v) for k, v in paths.items()}, "people": {"train": self.sizes.n_train,
                "heldout": self.sizes.n_heldout}, "simulated_type_only_ceiling_5": simulated_type_only_ceiling(5)}

    @property
    def tokenizer(self) -> Memory3Tokenizer:
        return Memory3Tokenizer.from_file(self.out / "tokenizer.json")

    def model_config(self, variant: str) -> Memory3Config:
        shape = self.sizes.large if variant == "large" else self.sizes.small
        extra = {"memory_positions": "ranked"} if variant == "ranked" else {}
        return Memory3Config(vocab_size=self.tokenizer.vocab_size, **shape, **extra)

    def train(self, variant: str) -> dict:
        from memory3.train.trainer import Trainer
        tok, steps = self.tokenizer, self.sizes.steps[variant]
        config = self.model_config(variant)
        model = init_for_training(Memory3Model(config), seed=self.seed)
        overrides = dict(steps=steps, batch_size=self.sizes.batch_size, seed=self.seed,
                         checkpoint_every=max(1, steps // 4), keep_checkpoints=1, **self.sizes.recipe)
        if variant == "ranked":
            overrides["right_first"] = 0.8  # TRAINING.md: trust the retriever's order
        tc = TrainConfig.recipe_defaults("single-stage", **overrides)
        if variant == "large":
            make_task = lambda r, w, m: AllBiographiesTask(self.kb, tok, config, micro_batch=m, seed=self.seed,  # noqa: E731
                                                           rank=r, world_size=w)
        else:
            recipe = SyntheticRecipe.from_config(tc)
            make_task = lambda r, w, m: SyntheticTask(self.kb, tok, config, recipe=recipe, total_steps=steps,  # noqa: E731
                                                      micro_batch=m, seed=self.seed, rank=r, world_size=w)
        from memory3.train.distributed import DistInfo
        run = self.out / "runs" / variant
        trainer = Trainer(model, make_task, tc, run, dist=DistInfo(device=torch.device(self.device)),
                          progress=self.progress)
        summary = trainer.fit()
        save_pretrained(trainer.model, self.out / "models" / variant, tok)
        history = trainer.history
        tail = history[-max(1, len(history) // 10):]
        return {"model_dir": str(self.out / "models" / variant), "train_seconds": summary["seconds"],
                "steps": summary["steps"], "final_loss": summary["final_loss"],
                "tail_memory_loss": _mean([h["loss"] for h in tail if h.get("memory")]),
                "parameters": model.config.param_count(), "non_embedding_parameters": model.config.param_count(False),
                "loss_curve": str(run / "loss_curve.png"), "recipe": tc.to_dict()}

    def load(self, variant: str) -> Memory3Model:
        return from_pretrained(self.out / "models" / variant, device=self.device).eval()

    def bank(self, variant: str) -> dict:
        from memory3.memory.encode import KBRecord, encode_knowledge_base
        model, tok = self.load(variant), self.tokenizer
        records = [KBRecord(r["id"], r["text"], r["source"]) for r in self.kb.references()]
        path = self.out / "banks" / variant
        if self._bank_embedder is None:
            self._bank_embedder = TextCachedEmbedder(self.embedder)
        bank, stats = encode_knowledge_base(records, path, model, tok, self._bank_embedder, codec="int8",
                                            progress=self.progress)
        result = {"path": str(path), "rows": bank.rows, "codec": bank.codec.name,
                  "bytes_per_memory": bank.bytes_per_memory(), "bank_bytes": bank.nbytes(),
                  "encode_seconds": stats.total_s, "encode": str(stats)}
        bank.close()
        return result

    def open_bank(self, variant: str):
        from memory3.memory.bank import Bank
        from memory3.model.weights import fingerprint
        model = self.load(variant)
        return Bank.open(self.out / "banks" / variant, expect_fingerprint=fingerprint(model), device=self.device,
                         dtype=model.dtype), model

    def questions(self):
        return self.kb.questions_for(self.kb.heldout_people[:self.sizes.eval_people])

    def retrieval(self) -> dict:
        from memory3.retrieval import Retriever
        from memory3.train.demo_eval import retrieve
        bank, _ = self.open_bank("parallel")
        try:
            qs = self.questions()
            got = retrieve(Retriever(bank, self.embedder), self.tokenizer, qs, 5)
        finally:
            bank.close()
        right = [q.person_id for q in qs]
        return {"rows": got.rows.tolist(), "ids": got.ids, "questions": len(qs),
                "hit_at_1": _mean([bool(ids) and ids[0] == r for ids, r in zip(got.ids, right)]),
                "hit_at_5": _mean([r in ids for ids, r in zip(got.ids, right)]),
                "type_only_ceiling_1": type_only_ceiling(self.kb, qs, [ids[:1] for ids in got.ids]),
                "type_only_ceiling_5": type_only_ceiling(self.kb, qs, [ids[:5] for ids in got.ids])}

    def evaluate(self, variant: str) -> dict:
        """Accuracy and timing of every way of answering with this model (the large one: no memory)."""
        from memory3.retrieval import Retriever
        from memory3.train.demo_eval import Answerer, FullKVStore, retrieve, time_methods
        qs, tok, sizes = self.questions(), self.tokenizer, self.sizes
        rows = torch.tensor(self.results["retrieval"]["rows"], dtype=torch.long)
        timed = qs[:: max(1, len(qs) // sizes.timed_questions)][:sizes.timed_questions]
        if variant == "large":
            a = Answerer(self.load(variant), tok, "none")
            timing = time_methods({"none": a}, timed, None, sizes.decode_tokens, sizes.timing_repeats,
                                  sizes.decode_questions)
            return {"none": {"k": 0, "accuracy": _mean(a.exact_match(qs, rows)), **timing["none"]}}
        bank, model = self.open_bank(variant)
        try:
            retriever = Retriever(bank, self.embedder)
            # full-KV reuse precomputes every reference it will be asked for (offline, untimed)
            timed_rows = retrieve(retriever, tok, timed, 5).rows.flatten().tolist()
            used = sorted({r for r in rows.flatten().tolist() + timed_rows if r >= 0})
            texts = {ref.row: ref.text for ref in bank.references(used)}
            store = FullKVStore(model, tok)
            store.add(used, [texts[r] for r in used])
            store.save(self.out / "fullkv" / variant)  # read back mmap'd, like the bank's shards
            plan = [("none", 0)] + [(m, k) for m in ("memory", "rag", "fullkv") for k in (1, 5)]
            answerers = {f"{m}_{k}" if k else m: Answerer(model, tok, m, k, bank=bank, texts=texts, kv_store=store)
                         for m, k in plan}
            out = {}
            for key, a in answerers.items():
                out[key] = {"k": a.k, "accuracy": _mean(a.exact_match(qs, rows))}
                self.log(f"  {variant} {a.mode} k={a.k}: accuracy {out[key]['accuracy']:.3f}")
            timing = time_methods(answerers, timed, retriever, sizes.decode_tokens, sizes.timing_repeats,
                                  sizes.decode_questions)
            for key in answerers:
                out[key].update(timing[key])
            out["fullkv_bytes_per_reference"] = store.bytes_per_reference()
            out["rag_text_bytes_per_reference"] = _mean([len(t.encode()) for t in texts.values()])
            out["rag_tokens_per_reference"] = _mean([len(tok.encode(" " + t)) for t in texts.values()])
        finally:
            bank.close()
        return out

    # ------------------------------------------------------------------ the whole run

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage("corpus", self.corpus)
        for v in (*VARIANTS, "large"):
            self.stage(f"train-{v}", lambda v=v: self.train(v))
        for v in VARIANTS:
            self.stage(f"bank-{v}", lambda v=v: self.bank(v))
        self.stage("retrieval", self.retrieval)
        for v in (*VARIANTS, "large"):
            self.stage(f"eval-{v}", lambda v=v: self.evaluate(v))
        from memory3.train.demo_report import write_report
        return write_report(self.out, self.results, self.sizes, time.perf_counter() - self.t_start,
                            bank_shape=self.model_config("parallel").memory_shape, cpu_s=time.process_time())


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


# ---------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a short run with tiny sizes (tests; well under 2 minutes)")
    p.add_argument("--scale", type=float, default=1.0, metavar="N",
                   help="multiply the training steps by N (default 1: ~495 CPU seconds, ~8.5 minutes on a free "
                        "core of the 2-core CPU, 16 on one shared with other jobs; on a GPU, --scale 20 is the run "
                        "to try for binding at parallel positions, untested)")
    p.add_argument("--out", default="./memory3-demo", metavar="DIR",
                   help="report folder (resumed when it holds finished stages); default ./memory3-demo")
    p.add_argument("--seed", type=int, default=0, help="knowledge base, initialisation and data seed")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: before each stage, the cores not busy with other work "
                        "by the load average)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")


def run_from_args(args: argparse.Namespace) -> int:
    if not args.scale > 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    sizes = DemoSizes.quick() if args.quick else DemoSizes.default(args.scale)
    if args.quick and args.scale != 1.0:
        sizes.steps = {k: max(1, int(v * args.scale)) for k, v in sizes.steps.items()}
    report = Demo(args.out, sizes, seed=args.seed, device=device, progress=not args.quiet, threads=args.threads).run()
    print(report["table"])
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memory3 demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
