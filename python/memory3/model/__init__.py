"""The Memory³ model: config, transformer with memory layers, KV cache, weights, tokenizer."""
from memory3.model.cache import KVCache
from memory3.model.config import Memory3Config
from memory3.model.transformer import Memories, Memory3Model

__all__ = ["KVCache", "Memories", "Memory3Config", "Memory3Model"]
