"""`Memory3Config`: the shape of a Memory³ model and of its explicit memory.

Presets (`Memory3Config.preset(name)`): `tiny` (tests, ~0.25M parameters), `small` (the CPU
demo, ~8M) and `2.4b` (the paper's Memory³-2.4B: 44 layers, 40/8 heads, head dim 80). The
sequence layout the memory fields describe is PAPER.md's "Project decisions": the reference
prefix at positions 0..P-1, memories at their in-reference positions P..P+ref_len-1, the
context after them, chunks of `chunk_size` counted from the first context token.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

MEMORY_POSITIONS = ("parallel", "ranked")

# Special tokens of every tokenizer this project makes (memory3.model.tokenizer); the
# reference prefix `<s>Reference:` is one special token, so P = 1 for them.
PAD_ID, BOS_ID, EOS_ID, REF_ID = 0, 1, 2, 3


@dataclass
class Memory3Config:
    vocab_size: int = 260
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 172  # SwiGLU hidden width
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # Layers that attend to explicit memory and produce it (paper: the first half).
    # None means the first half; () makes a plain Llama (no memory, plain positions).
    memory_layers: tuple[int, ...] | None = None
    memory_tokens: int = 8  # M: tokens kept per (memory layer, KV head) of a reference
    ref_len: int = 128  # a reference is cut to this many tokens; memory keys sit at P..P+ref_len-1
    chunk_size: int = 64  # every chunk of context reads its own memories
    memories_per_chunk: int = 5  # R: references retrieved per chunk
    # "parallel": all memories share the positions P..P+ref_len-1 (paper); "ranked": slot r is
    # shifted by a further r*ref_len, so retrieval order is visible (TRAINING.md).
    memory_positions: str = "parallel"
    reference_prefix: str = "<s>Reference:"  # text of the prefix that opens references and contexts
    prefix_ids: tuple[int, ...] = (REF_ID,)  # its token ids; P = len(prefix_ids)
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        if self.memory_layers is None:
            self.memory_layers = tuple(range(self.n_layers // 2))
        self.memory_layers = tuple(int(i) for i in self.memory_layers)
        self.prefix_ids = tuple(int(i) for i in self.prefix_ids)
        self.validate()

    # ------------------------------------------------------------------ derived sizes

    @property
    def prefix_len(self) -> int:
        """P, the number of prefix tokens; the context's chunk grid starts at index P."""
        return len(self.prefix_ids)

    @property
    def n_memory_layers(self) -> int:
        return len(self.memory_layers)

    @property
    def context_offset(self) -> int:
        """Positions skipped between the prefix and the context: room for the memories."""
        if not self.memory_layers:
            return 0
        slots = self.memories_per_chunk if self.memory_positions == "ranked" else 1
        return slots * self.ref_len

    @property
    def memory_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one reference's memory: (memory layers, 2 (keys, values), Hkv, M, D)."""
        return (self.n_memory_layers, 2, self.n_kv_heads, self.memory_tokens, self.head_dim)

    def param_count(self, embeddings: bool = True) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        layer = attn + 3 * d * self.mlp_dim + 2 * d  # + two RMSNorm weights
        body = self.n_layers * layer + d  # + final norm
        return body + (2 * self.vocab_size * d if embeddings else 0)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ValueError(f"Memory3Config.{name} must be {want}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                     "memory_tokens", "ref_len", "chunk_size", "memories_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, "a positive int")
        if self.n_heads % self.n_kv_heads:
            bad("n_heads", f"a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            bad("head_dim", "even (RoPE rotates pairs)")
        if not self.rope_base > 0:
            bad("rope_base", "> 0")
        if not self.norm_eps > 0:
            bad("norm_eps", "> 0")
        if any(not 0 <= i < self.n_layers for i in self.memory_layers) or len(set(self.memory_layers)) != len(
            self.memory_layers
        ):
            bad("memory_layers", f"distinct layer indices in [0, {self.n_layers})")
        if list(self.memory_layers) != sorted(self.memory_layers):
            bad("memory_layers", "sorted")
        if self.memory_layers and self.memory_layers != tuple(range(self.n_memory_layers)):
            # The encoder runs only the memory layers, so they must be the first ones.
            bad("memory_layers", f"the first layers 0..k-1 (the encoder runs only them)")
        if self.memory_tokens > self.ref_len:
            bad("memory_tokens", f"<= ref_len={self.ref_len}")
        if self.memory_positions not in MEMORY_POSITIONS:
            bad("memory_positions", f"one of {MEMORY_POSITIONS}")
        if self.memory_layers and not self.prefix_ids:
            bad("prefix_ids", "non-empty when the model has memory layers (chunk grid starts after it)")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                bad(name, f"a token id in [0, vocab_size={self.vocab_size})")
        if any(not 0 <= i < self.vocab_size for i in self.prefix_ids):
            bad("prefix_ids", f"token ids in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory_layers"] = list(self.memory_layers)
        out["prefix_ids"] = list(self.prefix_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Memory3Config":
        if not isinstance(data, dict):
            raise ValueError(f"a Memory3Config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Memory3Config field(s) {unknown}; known: {sorted(known)}")
        data = dict(data)
        for name in ("memory_layers", "prefix_ids"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Memory3Config":
        """From a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            try:
                text = path.read_text()
            except OSError as e:
                raise ValueError(f"cannot read model config {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ presets

    @classmethod
    def preset(cls, name: str, **overrides) -> "Memory3Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __str__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in self.to_dict().items())
        return (f"Memory3Config({fields})\n"
                f"  parameters: {self.param_count(False) / 1e9:.3f}B non-embedding, "
                f"{self.param_count() / 1e9:.3f}B total; memory per reference {self.memory_shape}")


PRESETS: dict[str, dict] = {
    # Tests: byte-level vocabulary, 4 layers (0-1 memory layers), ~0.25M parameters.
    "tiny": dict(vocab_size=260, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=172),
    # CPU demo: ~8M parameters, a 4096-token BPE (a byte-level tokenizer fits in it untrained).
    "small": dict(vocab_size=4096, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, mlp_dim=768),
    # The paper's Memory³-2.4B (PAPER.md §1): 2.433B non-embedding parameters.
    "2.4b": dict(vocab_size=60416, dim=3200, n_layers=44, n_heads=40, n_kv_heads=8, head_dim=80, mlp_dim=3200,
                 memory_layers=tuple(range(22))),
}
