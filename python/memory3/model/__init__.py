"""The Memory³ model: config, transformer with memory layers, KV cache, weights, tokenizer."""
from memory3.model.cache import KVCache
from memory3.model.config import Memory3Config
from memory3.model.hf import from_hf, to_hf
from memory3.model.tokenizer import Memory3Tokenizer, train_bpe
from memory3.model.transformer import Memories, Memory3Model
from memory3.model.weights import fingerprint, from_pretrained, load_model, save_pretrained

__all__ = [
    "KVCache",
    "Memories",
    "Memory3Config",
    "Memory3Model",
    "Memory3Tokenizer",
    "fingerprint",
    "from_hf",
    "from_pretrained",
    "load_model",
    "save_pretrained",
    "to_hf",
    "train_bpe",
]
