"""Crash safety of the memory bank: a real writer process is SIGKILLed at random moments
mid-append, many times; after each kill the bank opens with every committed memory intact
and no partial one, and re-running the same append completes it."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import bank_crash_writer as writer
from memory3.memory.bank import Bank

HERE = Path(__file__).parent


def check_bank(path: Path, log: Path, writable: bool) -> int:
    """Open the bank; every logged batch is present, every stored memory is exactly the one
    its writer stored. Returns the number of references."""
    committed = {int(x) for x in log.read_text().split()} if log.exists() else set()
    with Bank.open(path, writable=writable, verify=True, dtype=torch.float32) as bank:
        every = [i for ids in writer.BATCHES for i in ids]
        rows = bank.lookup(every)
        for b in committed:
            assert all(rows[every.index(i)] is not None for i in writer.BATCHES[b]), f"batch {b} was committed but is missing"
        present = [(i, r) for i, r in zip(every, rows) if r is not None]
        assert len(bank) == len(present) == bank.rows  # no row without metadata, no metadata without row
        if present:
            ids, row_ids = zip(*present)
            mem = bank.gather(torch.tensor(row_ids))
            emb = bank.embeddings()
            for k, (i, r) in enumerate(present):
                want_mem, want_emb = writer.memory_of(i)
                torch.testing.assert_close(mem[:, :, k], want_mem, rtol=0, atol=0)
                torch.testing.assert_close(emb[r], want_emb, rtol=0, atol=0)
                assert bank.references([r])[0].text == writer.text_of(i)
        # whole batches only: a batch is one commit
        got = {i for i, _ in present}
        for ids in writer.BATCHES:
            assert len(got & set(ids)) in (0, len(ids))
        return len(present)


def test_sigkill_mid_append_many_times(tmp_path):
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    zygote = subprocess.Popen([sys.executable, str(HERE / "bank_crash_writer.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    total = sum(len(b) for b in writer.BATCHES)
    full = 0.0

    def run(bank: Path, log: Path, kill_after: float | None) -> int:
        nonlocal full
        zygote.stdin.write(f"run {bank} {log}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        t0 = time.perf_counter()
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # a zombie until reaped: the pid cannot be reused
        zygote.stdin.write("reap\n")
        zygote.stdin.flush()
        status = int(zygote.stdout.readline())
        if kill_after is None:
            full = time.perf_counter() - t0
        return status

    try:
        assert run(tmp_path / "timing", tmp_path / "timing.log", None) == 0  # also times a whole run
        assert check_bank(tmp_path / "timing", tmp_path / "timing.log", writable=False) == total
        kills = partial = rounds = 0
        deadline = time.perf_counter() + 8.0  # reached only on a loaded machine
        while kills < 14 and time.perf_counter() < deadline:
            bank, log = tmp_path / f"bank{rounds}", tmp_path / f"bank{rounds}.log"
            status = run(bank, log, rng.uniform(0, full))
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed or status == 0, f"writer failed with status {status}"
            kills += killed
            if bank.exists():
                # read-only first (a crash between commit and manifest rename is read through),
                # then writable (which repairs the manifest)
                n = check_bank(bank, log, writable=False)
                assert check_bank(bank, log, writable=True) == n
                partial += 0 < n < total
                if n == total:
                    rounds += 1
        print(f"{kills} kills, {partial} partial banks checked, {rounds} banks completed, a full run {full * 1e3:.0f} ms")
        assert kills >= 6 and partial >= 3, (kills, partial)
        # re-running the same append completes the bank the last kill left (the earlier ones
        # were completed that way inside the loop)
        bank, log = tmp_path / f"bank{rounds}", tmp_path / f"bank{rounds}.log"
        assert run(bank, log, None) == 0
        assert check_bank(bank, log, writable=False) == total
    finally:
        zygote.stdin.write("quit\n")
        zygote.stdin.close()
        zygote.wait(timeout=30)
