"""Prints the folder holding CUTLASS's `include/` as shipped by the `nvidia-cutlass` wheel.

The wheel installs the package `cutlass_library`, whose `source/include` holds the cutlass/
and cute/ headers. Nothing is downloaded at build time: when the wheel is absent this prints
nothing and exits 1, and CMake builds without the kernels that need CUTLASS.
"""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("cutlass_library")
if spec is None or spec.origin is None:
    sys.exit(1)
source = Path(spec.origin).resolve().parent / "source"
if not (source / "include" / "cutlass" / "cutlass.h").exists():
    sys.exit(1)
print(source)
