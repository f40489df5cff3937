"""`TrainConfig`: every knob of a training run, with named recipes.

Recipes (``TrainConfig.recipe_defaults(name)``):

- ``warmup``: the paper's stage 1, plain LM on token shards, WSD schedule.
- ``continual``: the paper's stage 2, the same text with retrieved references encoded in the
  same forward pass (chunk c reads the references of chunks c-4..c), leakage filter 0.9.
- ``single-stage``: TRAINING.md's recipe on the synthetic knowledge base (memories from step
  0, 20% RAG steps, answer-only loss, curriculum 1 -> 5 memories, AdamW lr 3e-3, wd 0.1,
  betas 0.9/0.98, 5% warmup + cosine, clip 1.0, batch 32). Option ``bind_supervision``:
  an auxiliary loss on the memory layers' attention to the right memory (`binding.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from memory3.train.schedule import SCHEDULES

RECIPES = ("warmup", "continual", "single-stage")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    recipe: str = "single-stage"
    steps: int = 1000
    batch_size: int = 32          # sequences per optimizer step, over all ranks and micro-steps
    micro_batch: int = 0          # sequences per rank and micro-step; 0 = no accumulation
    seq_len: int = 256            # text tokens per sequence (warmup / continual)
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_frac: float = 0.05
    decay_frac: float = 0.1       # WSD: share of the steps spent decaying
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clip: float = 1.0
    precision: str = "auto"       # auto: bf16 autocast on CUDA, fp32 on CPU
    parallel: str = "ddp"         # with several ranks: DDP, or FSDP (parameters, gradients and
                                  # optimizer state sharded; one unit around encoder + model)
    seed: int = 0
    checkpoint_every: int = 0     # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    # continual stage
    ref_window: int = 4           # chunk c reads the references of chunks c-ref_window..c
    leak_threshold: float = 0.9   # drop references overlapping the text by more (eq. 6)
    retrieve_candidates: int = 4  # top-k looked at per chunk before the leakage filter
    # single-stage recipe (memory3.train.tasks.SyntheticRecipe)
    rag_share: float = 0.2
    max_memories: int = 5
    curriculum_frac: float = 0.3
    rag_references: int = 1
    right_first: float | None = None
    questions_per_sample: int = 5
    curriculum_start: float = 0.0
    # binding supervision (memory3.train.binding): weight of the auxiliary loss -log(attention
    # share on the right memory) at the answer positions of memory steps; 0 = off
    bind_supervision: float = 0.0
    bind_until: float = 1.0       # share of the steps it is on (afterwards the answer loss alone)
    bind_layers: tuple[int, ...] | None = None  # supervised memory layers; None: all but the first
    extra: dict = field(default_factory=dict)  # free-form notes saved with the run

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.bind_layers is not None:
            self.bind_layers = tuple(int(i) for i in self.bind_layers)
        if self.bind_supervision < 0 or not 0 <= self.bind_until <= 1:
            raise ValueError(f"bind_supervision must be >= 0 and bind_until in [0, 1], got "
                             f"{self.bind_supervision}, {self.bind_until}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch < 0 or self.checkpoint_every < 0:
            raise ValueError("micro_batch and checkpoint_every must be >= 0")

    def layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch per rank, accumulation steps) making ``batch_size`` per optimizer step."""
        micro = self.micro_batch or self.batch_size // world_size
        if micro <= 0 or self.batch_size % (micro * world_size):
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch x world_size = "
                             f"{micro} x {world_size}")
        return micro, self.batch_size // (micro * world_size)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_frac * self.steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    @classmethod
    def recipe_defaults(cls, recipe: str, **overrides) -> "TrainConfig":
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        base = {
            "warmup": dict(schedule="wsd", lr=1e-3, warmup_frac=0.02, seq_len=256),
            "continual": dict(schedule="wsd", lr=5e-4, warmup_frac=0.02, seq_len=256),
            "single-stage": dict(schedule="cosine", lr=3e-3, warmup_frac=0.05, batch_size=32),
        }[recipe]
        return cls(recipe=recipe, **{**base, **overrides})
