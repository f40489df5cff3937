"""`memory3` command line. Sub-commands arrive with the issues that build them (encode,
generate, train, demo); `info` reports what this installation can run."""
from __future__ import annotations

import argparse
import json
import platform
import sys

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
    }


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory3",
        description="Memory³: language modeling with explicit memory (arXiv 2407.01178).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, build contents, devices, op backends",
                          description="Print what this memory3 installation was built with and can run. "
                                      "Exits 1 when the compiled ops are missing.")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
