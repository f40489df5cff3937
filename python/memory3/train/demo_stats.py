"""Paired timing differences with a bootstrap confidence interval (the demo's TTFT claims).

Two methods timed on the same questions, interleaved, give one difference per question
(a - b, each method's fastest repeat of that question: the repeat the other jobs of a shared
machine disturbed least, as timeit reports): what the machine's load did to both in the same
moment cancels. The claim "a is faster than b" is made only when the whole 95% interval
of the median difference lies below 0, never from two medians that sit within the noise.
"""
from __future__ import annotations

from typing import Sequence

import torch

CONFIDENCE = 0.95
RESAMPLES = 4000


def per_question_differences(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[float]:
    """a[i], b[i]: the times of question i (one per repeat, same length); returns, per
    question, a's fastest repeat minus b's."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must hold the same questions (at least one), got {len(a)} and {len(b)}")
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or not x:
            raise ValueError(f"question {i}: a and b must hold the same number (>= 1) of repeats, "
                             f"got {len(x)} and {len(y)}")
        out.append(min(x) - min(y))
    return out


def bootstrap_median(diffs: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                     seed: int = 0) -> dict:
    """Median of ``diffs`` and its percentile-bootstrap interval (questions resampled with
    replacement, seeded: the same numbers give the same interval). Returns n, median, lo, hi
    and the verdict: "below" (hi < 0), "above" (lo > 0) or "within noise" (the interval holds 0)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    x = torch.as_tensor(list(diffs), dtype=torch.float64)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"diffs must be a non-empty list of numbers, got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
    medians = _median(x[picks])
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(medians, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    verdict = "below" if hi < 0 else "above" if lo > 0 else "within noise"
    return {"n": x.numel(), "median": float(_median(x)), "lo": lo, "hi": hi, "verdict": verdict}


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median of the last dimension, the mean of the two middle values when it is even
    (torch.median returns the lower one, which biases a small sample's interval)."""
    s = x.sort(dim=-1).values
    n = s.shape[-1]
    return (s[..., (n - 1) // 2] + s[..., n // 2]) / 2
