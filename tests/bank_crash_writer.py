"""Writer process for tests/test_bank_crash.py (not a test).

    python bank_crash_writer.py   then, on stdin:  "run BANK LOG" | "reap" | "quit"

It imports torch and memory3 once, then for each "run" forks a child that appends the fixed
BATCHES to BANK (creating it if needed) and writes "i\\n" to LOG after batch i commits; it
prints the child's pid so the test can SIGKILL it at a random moment. The child stays a
zombie (its pid cannot be reused) until "reap". Forking from a process that has run no
parallel region yet is safe for torch's thread pool; the child does the work.
"""
from __future__ import annotations

import os
import sys

import torch

from memory3.memory.bank import Bank
from memory3.memory.manifest import MemoryShape

SHAPE = MemoryShape(layers=2, kv_heads=2, tokens=8, head_dim=16)
EMB_DIM = 6
BATCHES = [[f"ref{b}-{i}" for i in range(3)] for b in range(8)]
SHARD_ROWS = 5  # batches straddle shard boundaries


def memory_of(ref_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory [L, 2, Hkv, M, D] and embedding [dim] every writer stores for ref_id."""
    g = torch.Generator().manual_seed(sum(ord(c) * 131**i for i, c in enumerate(ref_id)) % (2**31))
    return torch.randn(SHAPE.memory, generator=g), torch.randn(EMB_DIM, generator=g)


def text_of(ref_id: str) -> str:
    return f"the text of {ref_id}"


def write(bank_path: str, log_path: str) -> None:
    if os.path.exists(os.path.join(bank_path, "manifest.json")):
        bank = Bank.open(bank_path, writable=True, verify=False)
    else:
        bank = Bank.create(bank_path, shape=SHAPE, fingerprint="crash-test", codec="fp32",
                           embedder={"name": "test", "dim": EMB_DIM}, shard_rows=SHARD_ROWS, verify=False)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for b, ids in enumerate(BATCHES):
        mems, embs = zip(*(memory_of(i) for i in ids))
        bank.append(ids, [text_of(i) for i in ids], torch.stack(mems), embeddings=torch.stack(embs),
                    tokens=[[len(i)] * 3 for i in ids])
        os.write(log, f"{b}\n".encode())
    bank.close()


def main() -> None:
    torch.set_num_threads(1)
    child = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            child = os.fork()
            if child == 0:
                try:
                    write(cmd[1], cmd[2])
                    os._exit(0)
                except BaseException as exc:  # reported to the test through the exit status
                    sys.stderr.write(f"writer failed: {exc!r}\n")
                    os._exit(3)
            print(child, flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(child, 0)
            print(status, flush=True)
        else:
            return


if __name__ == "__main__":
    main()
