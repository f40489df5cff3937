"""Loads memory3._C (the compiled ops). The package still imports when it is missing, and
says what is unavailable and how to build it (torchao's pattern)."""
from __future__ import annotations

try:
    from memory3 import _C

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc


def available() -> bool:
    return _C is not None


def require() -> None:
    """Raise a clear error when the compiled ops are missing."""
    if _C is None:
        raise RuntimeError(
            "memory3's compiled ops (memory3._C) are not available: "
            f"{LOAD_ERROR}. Build them against the installed torch with "
            "`pip install --no-build-isolation -e .` in the memory3 checkout."
        )


def build_info() -> dict:
    """What this build contains (version, CUDA arches, CPU ISA variants); {} when not built."""
    return dict(_C.build_info()) if _C is not None else {}
