import torch
from memory3 import _C  # noqa: F401
