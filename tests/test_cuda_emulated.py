"""The CUDA kernels themselves compiled by the host compiler and run on the CPU, each block
as its threads (csrc/cuda/nvcc_check/cuda_emulation.h), under AddressSanitizer where the
compiler has it: the decode kernel with its split merge against a float64 reference
(indexing, shared-memory layout, pipeline, online softmax, int8 dequantization, merge), and
the gather, codec and vq kernels against the CPU kernels (bit for bit where those are).
Needs CUDA's headers (cuda_runtime.h, cuda_bf16.h), not a GPU; the GPU runs the same code
in tests/test_cuda_memory_attention.py and tests/test_cuda_gather_codecs.py."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "csrc/cuda/nvcc_check"


def cuda_include() -> Path | None:
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime.h").exists() and (c / "cuda_bf16.h").exists()), None)


@pytest.mark.parametrize("program", ["decode_emulator", "memory_emulator"])
def test_kernels_emulated_on_the_cpu_match_the_reference(program, tmp_path):
    cxx = shutil.which("g++") or shutil.which("clang++")
    include = cuda_include()
    if cxx is None or include is None:
        pytest.skip("needs a C++20 compiler and CUDA's headers")
    source = CHECKS / f"{program}.cpp"
    exe = tmp_path / program
    base = [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-Wno-attributes", f"-I{include}",
            f"-I{ROOT / 'csrc/include'}", f"-I{CHECKS}", str(source), "-o", str(exe)]
    built = subprocess.run(base[:2] + ["-fsanitize=address"] + base[2:], capture_output=True, text=True)
    if built.returncode != 0:  # no AddressSanitizer runtime: build without it
        subprocess.run(base, check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]
