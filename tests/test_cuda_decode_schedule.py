"""The CUDA decode kernel's index arithmetic (csrc/include/memory3/decode_schedule.h: row
blocks, row positions and chunks, the context split, the tiles each block walks, which row
sees which key, the shared-memory layout) checked by a host program against the reference's
definition of which keys each query sees. Runs on every machine with a C++ compiler, GPU or
not (csrc/cuda/nvcc_check/decode_schedule_check.cpp says what it checks)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc/cuda/nvcc_check/decode_schedule_check.cpp"


def test_decode_schedule_matches_reference_visibility(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "decode_schedule_check"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc/include'}", str(SOURCE), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
