"""Learning-rate schedules: warmup-stable-decay (MiniCPM, the paper's) and cosine.

Both ramp linearly from 0 over ``warmup`` steps. WSD then holds the peak and decays
linearly to ``min_ratio`` x peak over the last ``decay_frac`` of the steps; cosine decays
from the peak to ``min_ratio`` x peak over all steps after warmup."""
from __future__ import annotations

import math

SCHEDULES = ("wsd", "cosine")


def lr_at(step: int, *, peak: float, total: int, warmup: int, kind: str = "wsd",
          decay_frac: float = 0.1, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need total > 0 and 0 <= warmup <= total, got total={total}, warmup={warmup}")
    if not 0 <= decay_frac <= 1 or not 0 <= min_ratio <= 1:
        raise ValueError(f"decay_frac and min_ratio must lie in [0, 1], got {decay_frac}, {min_ratio}")
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if kind == "cosine":
        t = (step - warmup) / max(1, total - warmup - 1)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    decay_steps = max(1, round(decay_frac * total)) if decay_frac > 0 else 0
    decay_start = total - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak
    t = (step - decay_start + 1) / decay_steps
    return peak + (floor - peak) * min(t, 1.0)
