"""`memory3` command line: info, encode, generate, bank info|delete|compact|reencode.

Each sub-command is an `add_*` function below that registers its parser and handler;
`SUBCOMMANDS` lists them in help order (train and demo register theirs there). User mistakes
(a missing file, a bad jsonl line, a bank of another model) end as one line on stderr and
exit code 2; set MEMORY3_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import memory3
from memory3 import _extension


def collect_info() -> dict:
    """Versions, what memory3._C was built with, which devices torch sees, and which
    backend each op has."""
    ops = ["memory_attention", "memory_attention_backward", "gather_memory", "quantize_memory", "dequantize_memory"]
    backends = {}
    if _extension.available():
        for op in ops:
            backends[op] = [
                key for key in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{op}", key)
            ]
    return {
        "memory3": memory3.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "compiled_ops": _extension.available(),
        "load_error": None if _extension.available() else str(_extension.LOAD_ERROR),
        "build": _extension.build_info(),
        "op_backends": backends,
        "cuda_attention_paths": _cuda_attention_paths(backends),
    }


def _cuda_attention_paths(backends: dict) -> str:
    """Which CUDA kernel serves memory_attention at which query length (csrc/cuda/memory_attention.cu)."""
    if "CUDA" not in backends.get("memory_attention", []):
        return "none (no CUDA kernels in this build)"
    return ("T <= 16: decode kernel (split-K, GQA packed, bank read by id); T > 16: tensor-core prefill kernel "
            "(bf16/fp16, head dim 32/64/80/96/128, 16-byte aligned rows), else the decode kernel over every row block")


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["compiled_ops"] else 1
    rows = []
    for key, value in info.items():
        if key == "op_backends":
            rows += [(f"op {op}", ", ".join(keys) or "none") for op, keys in value.items()]
        elif key == "build":
            rows += [(f"build {k}", v) for k, v in value.items()]
        else:
            rows.append((key, value))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if info["compiled_ops"] else 1



# ---------------------------------------------------------------------- shared helpers


class CliParser(argparse.ArgumentParser):
    """Usage mistakes as one line (with where to look), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(handler, args: argparse.Namespace) -> int:
    """Run a sub-command; a ValueError/OSError (a user mistake: every bank, model and
    knowledge-base error is one) becomes one line on stderr and exit code 2."""
    try:
        return handler(args)
    except (ValueError, OSError) as e:
        if os.environ.get("MEMORY3_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"memory3: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memory3: interrupted", file=sys.stderr)
        return 130


def load_model_arg(name: str, *, device: str = "cpu", quiet: bool = False):
    """(model, tokenizer) from --model: a saved model directory or a preset name."""
    from memory3.model import load_model

    if not Path(name).is_dir() and ("/" in name or name.startswith(".")):
        raise ValueError(f"--model {name}: no such model directory")
    model, tokenizer, trained = load_model(name, device=device)
    if not trained and not quiet:
        print(f"memory3: note: --model {name} is an untrained preset (random weights, seed 0): "
              "its memories and text are noise", file=sys.stderr)
    return model, tokenizer


def load_embedder(name: str, *, device: str | None = None):
    from transformers.utils import logging as hf_logging

    from memory3.retrieval import Embedder

    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on every command
    return Embedder(name, device=device)


def _add_model(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required, metavar="M",
                        help="a saved model directory (config.json, model.safetensors, tokenizer.json) or a preset "
                             "name (tiny, small, 2.4b: untrained, random weights)")


def _fingerprint_matches(bank, model) -> bool:
    from memory3.model import fingerprint

    return bank.fingerprint == fingerprint(model)


def report_bank(path, model=None, as_json: bool = False) -> dict:
    """Print (and return) what a bank holds."""
    from memory3.memory.bank import Bank

    with Bank.open(path, device="cpu", verify=False) as bank:
        m = bank.manifest
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        index = sorted(str(f.relative_to(path)) for f in (Path(path) / "index").glob("*")) if (Path(path) / "index").is_dir() else []
        info = {
            "bank": str(path), "live": m.counts["live"], "deleted": m.counts["deleted"], "rows": bank.rows,
            "memory_shape": list(m.shape.memory), "codec": m.codec["name"], "bytes_per_memory": bank.bytes_per_memory(),
            "bytes_on_disk": size, "shards": len(m.shards), "fingerprint": m.fingerprint, "embedder": m.embedder,
            "index": index, "commit": m.commit,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at)),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.updated_at)),
        }
        if model is not None:
            info["model_matches"] = _fingerprint_matches(bank, model)
    if as_json:
        print(json.dumps(info, indent=2))
        return info
    dense = 2 * m.shape.layers * m.shape.kv_heads * m.shape.tokens * m.shape.head_dim * 2  # bf16
    rows = [
        ("bank", info["bank"]),
        ("references", f"{info['live']} live, {info['deleted']} deleted ({info['rows']} rows in {info['shards']} shards)"),
        ("memory shape", f"{tuple(m.shape.memory)} (layers, k/v, KV heads, tokens, head dim)"),
        ("codec", f"{info['codec']}: {info['bytes_per_memory']} bytes per memory ({dense / info['bytes_per_memory']:.1f}x "
                  f"smaller than bf16)"),
        ("on disk", f"{size / 2**20:.2f} MiB"),
        ("fingerprint", info["fingerprint"]),
        ("embedder", "none" if not m.embedder else f"{m.embedder['name']} (dim {m.embedder['dim']})"),
        ("index", ", ".join(index) or "not built yet (built on first retrieval)"),
        ("updated", f"{info['updated']} (commit {m.commit})"),
    ]
    if model is not None:
        rows.append(("model", "matches this bank" if info["model_matches"] else
                     "DOES NOT match this bank: run `memory3 bank reencode` with it"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return info


# ---------------------------------------------------------------------- info


def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, build contents, devices, op backends",
                       description="Print what this memory3 installation was built with and can run. "
                                   "Exits 1 when the compiled ops are missing.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


# ---------------------------------------------------------------------- encode


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    from memory3.memory.codecs import codec_names
    from memory3.retrieval import DEFAULT_EMBEDDER, INDEX_KINDS

    p.add_argument("kb", metavar="KB.jsonl",
                   help='knowledge base: one JSON object per line, {"id": ..., "text": ..., "source": ... (optional)}')
    _add_model(p)
    p.add_argument("--out", required=True, metavar="BANK",
                   help="bank directory: created, or appended to when it holds a bank of the same model")
    p.add_argument("--codec", default=None, choices=codec_names(),
                   help="how memories are stored (default int8 for a new bank; an existing bank keeps its own)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="references per model forward (default 64)")
    p.add_argument("--embedder", default=DEFAULT_EMBEDDER, metavar="E",
                   help=f"retrieval embedder: {DEFAULT_EMBEDDER} (shipped, offline) or a local sentence-transformers "
                        "model directory")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS, help="retrieval index kind (default flat: exact)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="turn a jsonl knowledge base into a memory bank",
                       description="Encode every reference of a jsonl knowledge base into an explicit memory (the "
                                   "model's memory layers, top-8 tokens per KV head), embed it for retrieval and "
                                   "store both in a memory bank. Re-running adds only new or changed references. "
                                   "For several processes: torchrun --nproc-per-node N -m memory3.memory.encode ...")
    add_encode_arguments(p)
    p.set_defaults(func=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    from memory3.memory.encode import check_existing_bank, encode_knowledge_base, read_knowledge_base
    from memory3.retrieval import Retriever

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = read_knowledge_base(args.kb)  # a bad file fails before anything loads
    model, tokenizer = load_model_arg(args.model)
    check_existing_bank(args.out, model, None, args.codec)  # fail before the (slow) embedder loads
    embedder = load_embedder(args.embedder)
    t0 = time.perf_counter()
    bank, stats = encode_knowledge_base(records, args.out, model, tokenizer, embedder, codec=args.codec,
                                        batch_size=args.batch_size, progress=not args.quiet)
    with bank:
        t1 = time.perf_counter()
        Retriever(bank, embedder, kind=args.index)  # builds and saves the index under BANK/index
        t2 = time.perf_counter()
    print(f"{stats}; index {t2 - t1:.1f} s; total {t2 - t0:.1f} s", file=sys.stderr)
    report_bank(args.out)
    return 0


# ---------------------------------------------------------------------- generate


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text that reads a memory bank",
                       description="Continue each prompt with the model, retrieving 5 references per 64-token chunk "
                                   "from the bank (prompt chunks by their own text, generated chunks by the 64 "
                                   "tokens before them) and attending to their memories. One prompt streams to "
                                   "stdout as it is generated.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue (several: one batch)")
    _add_model(p)
    p.add_argument("--bank", metavar="BANK", help="memory bank encoded by this model (omit: no explicit memory)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    p.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    p.add_argument("--overlap-threshold", type=float, default=2 / 3, metavar="X",
                   help="drop a retrieved reference whose overlap with the query (eq. 6) exceeds X (default 2/3)")
    p.add_argument("--no-overlap-filter", action="store_true", help="keep every retrieved reference")
    p.add_argument("--embedder", default=None, metavar="E",
                   help="retrieval embedder (default: the one the bank records; give the directory of a local model)")
    p.add_argument("--show-retrieval", action="store_true", help="print the references each chunk read (stderr)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from memory3.generate import generate
    from memory3.memory.bank import Bank
    from memory3.model import fingerprint
    from memory3.retrieval import Retriever

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer = load_model_arg(args.model)
    retriever = None
    if args.bank:
        bank = Bank.open(args.bank, expect_fingerprint=fingerprint(model), dtype=model.dtype)
        if bank.embedder is None:
            raise ValueError(f"memory bank {args.bank} has no retrieval embeddings")
        retriever = Retriever(bank, load_embedder(args.embedder or bank.embedder["name"]), tokenize=tokenizer.encode)
    single = len(args.prompts) == 1
    stream = (lambda i, text: print(text, end="", flush=True)) if single else None
    texts, retrieval = generate(
        model, tokenizer, args.prompts, retriever=retriever, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop, on_text=stream,
        overlap_threshold=None if args.no_overlap_filter else args.overlap_threshold, return_retrieval=True)
    if single:
        print()
    else:
        for prompt, text in zip(args.prompts, texts):
            print(f"--- {prompt}\n{text}")
    if args.show_retrieval:
        for i, chunks in enumerate(retrieval):
            for rec in chunks:
                refs = ", ".join(f"{rid} ({score:.3f})" for rid, score in zip(rec.ids, rec.scores))
                query = "kept from the previous chunk" if rec.query is None else f"query {rec.query[:40]!r}"
                print(f"prompt {i} chunk {rec.chunk}: {query} -> {refs or 'nothing'}", file=sys.stderr)
    if retriever is not None:
        print(f"memory3: {retriever.bank.cache_stats()}", file=sys.stderr)
        retriever.bank.close()
    return 0


# ---------------------------------------------------------------------- bank


def add_bank(sub) -> None:
    p = sub.add_parser("bank", help="inspect and maintain a memory bank",
                       description="Inspect (info) and maintain (delete, compact, reencode) a memory bank.")
    actions = p.add_subparsers(dest="action", required=True, metavar="{info,delete,compact,reencode}")
    info = actions.add_parser("info", help="what the bank holds",
                              description="References, memory shape, codec and bytes per memory, size on disk, "
                                          "model fingerprint, embedder and index of a bank.")
    info.add_argument("bank", metavar="BANK")
    _add_model(info, required=False)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_bank_info)
    delete = actions.add_parser("delete", help="tombstone references by id",
                                description="Mark references deleted: retrieval skips them at once; "
                                            "`bank compact` reclaims their space.")
    delete.add_argument("bank", metavar="BANK")
    delete.add_argument("ids", nargs="+", metavar="ID", help="reference ids")
    delete.set_defaults(func=cmd_bank_delete)
    compact = actions.add_parser("compact", help="drop deleted references, renumbering rows",
                                 description="Rewrite the bank without its tombstoned references (crash-safe: the "
                                             "old bank stays until the new one is committed).")
    compact.add_argument("bank", metavar="BANK")
    compact.set_defaults(func=cmd_bank_compact)
    reencode = actions.add_parser("reencode", help="rebuild every memory with another model",
                                  description="Re-encode every live reference from its stored text with --model "
                                              "(after training, or for a bank another model wrote); the bank then "
                                              "records that model's fingerprint.")
    reencode.add_argument("bank", metavar="BANK")
    _add_model(reencode)
    reencode.add_argument("--batch-size", type=int, default=64, metavar="N", help="references per forward (default 64)")
    reencode.set_defaults(func=cmd_bank_reencode)


def _open_writable(path):
    from memory3.memory.bank import Bank

    return Bank.open(path, writable=True, device="cpu")


def cmd_bank_info(args: argparse.Namespace) -> int:
    model = load_model_arg(args.model, quiet=True)[0] if args.model else None
    report_bank(args.bank, model, as_json=args.json)
    return 0


def cmd_bank_delete(args: argparse.Namespace) -> int:
    with _open_writable(args.bank) as bank:
        n = bank.delete(args.ids)
        print(f"deleted {n} of {len(args.ids)} ids ({len(args.ids) - n} not found or already deleted); "
              f"{len(bank)} live references remain")
    return 0


def cmd_bank_compact(args: argparse.Namespace) -> int:
    from memory3.memory.rewrite import compact

    with _open_writable(args.bank) as bank:
        dropped = compact(bank)
        print(f"compacted: dropped {dropped} deleted rows, {bank.rows} rows remain")
    return 0


def cmd_bank_reencode(args: argparse.Namespace) -> int:
    from memory3.memory.encoder import encode_texts
    from memory3.memory.rewrite import reencode
    from memory3.model import fingerprint

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = load_model_arg(args.model)
    with _open_writable(args.bank) as bank:
        reencode(bank, lambda texts: encode_texts(model, tokenizer, texts, batch_size=args.batch_size,
                                                  progress=False).float().cpu(),
                 fingerprint(model), batch_size=max(args.batch_size, 256))
        print(f"reencoded {len(bank)} references with --model {args.model}")
    return 0


# ---------------------------------------------------------------------- demo


def add_demo(sub) -> None:
    from memory3.train.demo import add_arguments

    p = sub.add_parser("demo", help="train, encode and compare explicit memory with RAG on a synthetic knowledge base",
                       description="Generate a synthetic knowledge base, train a small memory model (parallel and "
                                   "ranked memory positions) and a 4x larger one without memory, encode the "
                                   "knowledge base into a bank, answer questions about held-out people with "
                                   "retrieval (no memory, explicit memory, RAG, full-KV reuse) and write "
                                   "report.md, results.json and PNG plots. Measured: 11-16 minutes on the 2-core CPU "
                                   "machine shared with other jobs (load average 2-8); --scale 0.5 for a shorter run.")
    add_arguments(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from memory3.train.demo import run_from_args

    return run_from_args(args)


# ---------------------------------------------------------------------- train


def add_train(sub) -> None:
    # The trainer owns its options (memory3.train.run): main() hands everything after `train`,
    # `--help` included, to it, so the two command lines never drift apart. This entry only
    # lists the command in `memory3 --help`.
    sub.add_parser("train", help="train a model (warmup, continual, single-stage recipes); "
                                 "`memory3 train --help` lists its options")


# ---------------------------------------------------------------------- entry

# Help order.
SUBCOMMANDS = [add_info, add_encode, add_generate, add_bank, add_train, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="memory3",
        description="Memory³: language modeling with explicit memory (arXiv 2407.01178). Encode a knowledge base "
                    "into a memory bank, generate text that reads it, maintain banks.",
        epilog="Example: memory3 encode kb.jsonl --model small --out bank/ && memory3 bank info bank/ && "
               "memory3 generate --model small --bank bank/ \"Alice Smith was born in\"",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CliParser)
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer parses its own options (see add_train)
        from memory3.train.run import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
