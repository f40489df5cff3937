"""Training Memory³ models (`python -m memory3.train --help`).

- `synthetic`: the deterministic synthetic knowledge base (people, biographies, questions,
  the type-only ceiling).
- `data`: corpora -> memory-mapped token shards + manifest; the stateless window sampler.
- `tasks`: what a step reads, per recipe (warmup, continual, single-stage).
- `trainer`: the loop (AdamW, WSD/cosine, clipping, accumulation, bf16 autocast on GPU,
  DDP/FSDP, checkpoints with exact resume, loss curve); `config`: `TrainConfig` and recipes.
- `evaluate`: exact match on held-out people (no memory, k memories, RAG).
"""
