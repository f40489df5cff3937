"""memory3: language modeling with explicit memory (Memory³, arXiv 2407.01178).

The compiled ops live in ``torch.ops.memory3`` and are reached through :mod:`memory3.ops`.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

__version__ = "0.1.0"

from memory3 import ops  # noqa: E402,F401
