"""The model's loss with memory when the bank is stored in each codec (issue 11, item 2).

A trained memory model encodes the synthetic knowledge base (held-out people included) once,
with the real encoder (memory3.memory.encoder.encode_texts); the same fp32 memories are then
stored in one bank per codec, and each bank is read back the way the demo and generation read
it (memory3.train.demo_eval: rows by id in place for int8 / float rows of the model's dtype,
else Bank.gather + the codec's decoder) while the model answers the held-out people's questions
(one per attribute). Per codec: stored bytes per memory, relative L2 error of the decoded
memories against the fp32 ones (mean over memories of |decoded - fp32| / |fp32|), and, with the
right person's memory and (unless --no-retrieval) with the top-1 memory the all-MiniLM-L6-v2
retriever finds over the whole bank, the answer tokens' cross-entropy (nats per answer token,
teacher-forced) and exact match (greedy answer == answer). Ratios are against fp32.

    python bench/bench_codec_loss.py --model memory3-demo/models/parallel   # a trained model
    python bench/bench_codec_loss.py --train-steps 300                       # trains a tiny one first
    python bench/bench_codec_loss.py --model M --codecs fp32,int8,vq --vq-coarse-bits 14

The knowledge base must be the one the model was trained on (--n-train / --n-heldout /
--n-names / --kb-seed, the trainer's and the demo's defaults). Codecs with learned state
(pq, vq) train on the bank's own memories, as `memory3 encode` does. vq needs 2^coarse_bits
vectors per quantizer: --vq-coarse-bits 8 (Residual2x8, 12 bytes per vector) by default here,
since FAISS training of the paper's 2x14 takes minutes on one thread.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memory3.memory.bank import Bank
from memory3.memory.codecs import codec_names
from memory3.memory.encoder import encode_texts
from memory3.memory.manifest import MemoryShape
from memory3.model import load_model
from memory3.train.demo_eval import Answerer
from memory3.train.synthetic import SyntheticConfig, SyntheticKnowledgeBase

DEFAULT_CODECS = ("fp32", "bf16", "fp16", "int8", "int4", "pq", "vq")


def answer_scores(answerer: Answerer, questions, rows: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(mean cross-entropy per answer token, exact match) of the questions with retrieved
    ``rows`` [Q, k], from one teacher-forced pass (Answerer.logits, as the demo scores)."""
    tok = answerer.tokenizer
    nll, n_tokens, right = 0.0, 0, 0
    with torch.inference_mode():
        for s in range(0, len(questions), batch_size):
            qs, rs = questions[s:s + batch_size], rows[s:s + batch_size]
            prompts = [tok.encode(" " + q.prompt) for q in qs]
            answers = [tok.encode(" " + q.answer) for q in qs]
            logits, starts = answerer.logits(rs, [p + a for p, a in zip(prompts, answers)])
            logits = logits.float().cpu()
            for b, (p, a) in enumerate(zip(prompts, answers)):
                first = starts[b] + len(p)
                at = logits[b, first - 1:first - 1 + len(a)]
                target = torch.tensor(a)
                nll += F.cross_entropy(at, target, reduction="sum").item()
                n_tokens += len(a)
                right += at.argmax(-1).tolist() == a
    return nll / n_tokens, right / len(questions)


def build_bank(path: Path, codec: str, config: dict, model, texts, ids, memories, embeddings, embedder_spec) -> Bank:
    c = model.config
    shape = MemoryShape(c.n_memory_layers, c.n_kv_heads, c.memory_tokens, c.head_dim)
    bank = Bank.create(path, shape=shape, fingerprint=model.fingerprint(), codec=codec, codec_config=config,
                       embedder=embedder_spec, device="cpu", dtype=model.dtype)
    if bank.codec.needs_training():
        bank.train_codec(memories)
    bank.append(ids, texts, memories, embeddings=embeddings)
    return bank


def rel_l2(bank: Bank, memories: torch.Tensor, batch: int = 256) -> float:
    """Mean over memories of |decoded - fp32| / |fp32| (the bank decodes to the model's dtype)."""
    errs = []
    for s in range(0, len(memories), batch):
        rows = torch.arange(s, min(s + batch, len(memories)))
        got = bank.gather(rows).float().movedim(2, 0)  # [n, L, 2, Hkv, M, D]
        want = memories[rows]
        errs.append((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1))
    return torch.cat(errs).mean().item()


def train_tiny(out: Path, steps: int, args) -> Path:
    """The trainer's single-stage recipe on the tiny preset (python -m memory3.train)."""
    cmd = [sys.executable, "-m", "memory3.train", "--recipe", "single-stage", "--model", "tiny", "--out", str(out),
           "--steps", str(steps), "--threads", str(args.threads), "--eval-people", "20", "--no-progress",
           "--n-train", str(args.n_train), "--n-heldout", str(args.n_heldout), "--n-names", str(args.n_names),
           "--kb-seed", str(args.kb_seed)]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained model directory (config.json + model.safetensors + tokenizer.json)")
    p.add_argument("--train-steps", type=int, default=300, help="without --model: single-stage steps of a tiny model")
    p.add_argument("--train-out", help="without --model: run folder of that training (default: a temp folder)")
    p.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help=f"comma list of {', '.join(codec_names())}")
    p.add_argument("--vq-coarse-bits", type=int, default=8, help="vq Residual2xB (the paper: 14)")
    p.add_argument("--pq-iters", type=int, default=20)
    p.add_argument("--eval-people", type=int, default=300, help="held-out people asked one question per attribute")
    p.add_argument("--no-retrieval", action="store_true", help="skip the top-1 retrieved-memory columns")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-heldout", type=int, default=300)
    p.add_argument("--n-names", type=int, default=1500)
    p.add_argument("--kb-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    bad = [c for c in codecs if c not in codec_names()]
    if bad or "fp32" not in codecs:
        p.error(f"--codecs must include fp32 (the reference) and name only {', '.join(codec_names())}; got {args.codecs}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="codec-loss-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or train_tiny(Path(args.train_out or tmp / "run"), args.train_steps, args)
        model, tok, trained = load_model(model_dir)
        model.eval()
        if not trained:
            print(f"warning: {model_dir} is an untrained preset: losses say nothing about reading memory")
        kb = SyntheticKnowledgeBase(SyntheticConfig(n_train=args.n_train, n_heldout=args.n_heldout,
                                                    n_names=args.n_names, seed=args.kb_seed))
        refs = kb.references()
        texts, ids = [r["text"] for r in refs], [r["id"] for r in refs]
        row_of = {i: n for n, i in enumerate(ids)}
        questions = kb.questions_for(kb.heldout_people[:args.eval_people])
        with torch.inference_mode():
            memories = encode_texts(model, tok, texts, batch_size=args.batch_size).float().cpu()
        right = torch.tensor([[row_of[q.person_id]] for q in questions])

        embedder = embeddings = spec = None
        if not args.no_retrieval:
            from memory3.retrieval import Embedder
            embedder = Embedder()
            embeddings, spec = embedder.embed(texts, progress=True), embedder.spec()

        configs = {"pq": {"iters": args.pq_iters}, "vq": {"coarse_bits": args.vq_coarse_bits}}
        table, top1 = [], None
        for name in codecs:
            t0 = time.perf_counter()
            bank = build_bank(tmp / f"bank-{name}", name, configs.get(name, {}), model, texts, ids, memories,
                              embeddings, spec)
            try:
                if top1 is None and embedder is not None:
                    from memory3.retrieval import Retriever
                    from memory3.train.demo_eval import retrieve
                    ref_ids = lambda t: tok.reference_ids(t, model.config.ref_len)  # as memory.encode stores them
                    got = retrieve(Retriever(bank, embedder, save=False, tokenize=ref_ids), tok, questions, 1)
                    top1 = got.rows[:, :1]
                    hit = (top1 == right).float().mean().item()
                answerer = Answerer(model, tok, "memory", 1, bank=bank)
                row = {"codec": name, "config": bank.codec.config(), "bytes": bank.bytes_per_memory(),
                       "rel_l2": rel_l2(bank, memories), "right": answer_scores(answerer, questions, right, args.batch_size)}
                if top1 is not None:
                    row["top1"] = answer_scores(answerer, questions, top1, args.batch_size)
            finally:
                bank.close()
            row["seconds"] = time.perf_counter() - t0
            table.append(row)
            r = row["right"]
            print(f"{name}: {row['bytes']} B/memory, rel L2 {row['rel_l2']:.4f}, right memory loss {r[0]:.4f} "
                  f"EM {r[1]:.3f} ({row['seconds']:.1f} s)", flush=True)
        none = answer_scores(Answerer(model, tok, "none"), questions, right, args.batch_size)

    ref = next(r for r in table if r["codec"] == "fp32")
    print(f"\nmodel: {model_dir} ({'trained' if trained else 'UNTRAINED preset'}); knowledge base {len(texts)} "
          f"references; {len(questions)} questions of {min(args.eval_people, len(kb.heldout_people))} held-out people; "
          f"{args.threads} thread(s); {time.perf_counter() - t_start:.0f} s")
    if top1 is not None:
        print(f"retriever top-1 hit rate (all-MiniLM-L6-v2, overlap filter 2/3): {hit:.3f}")
    print(f"no memory: loss {none[0]:.4f}, exact match {none[1]:.3f}")
    vq = next((r["config"] for r in table if r["codec"] == "vq"), None)
    if vq:
        print(f"vq configuration: {vq}")
    head = "| codec | bytes/memory | vs fp32 | rel. L2 | loss, right memory | vs fp32 | EM, right memory |"
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if top1 is not None:
        head += " loss, top-1 | vs fp32 | EM, top-1 |"
        sep += "---:|---:|---:|"
    print(head + "\n" + sep)
    for r in table:
        line = (f"| {r['codec']} | {r['bytes']:,} | {r['bytes'] / ref['bytes']:.3f}x | {r['rel_l2']:.4f} | "
                f"{r['right'][0]:.4f} | {r['right'][0] / ref['right'][0]:.4f}x | {r['right'][1]:.3f} |")
        if top1 is not None:
            line += f" {r['top1'][0]:.4f} | {r['top1'][0] / ref['top1'][0]:.4f}x | {r['top1'][1]:.3f} |"
        print(line)


if __name__ == "__main__":
    main()
