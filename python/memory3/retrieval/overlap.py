"""The overlap of a text and a reference, eq. (6) of the paper (PAPER.md §5.4), on token ids.

    overlap(t, r) = (1/|r|) * max N such that there are indices i_1 < ... < i_N in t and
                    j_1 < ... < j_N in r with t[i_k] = r[j_k] and i_N - i_1 <= 2|r|

i.e. the longest common subsequence of r and a window of 2|r|+1 tokens of t, over all
windows, divided by |r|. Used to drop leaking references: at evaluation a reference whose
overlap with the question exceeds 2/3, in training one exceeding 0.9 of the text.

How it is fast: each window's LCS is computed with the bit-parallel algorithm of Crochemore
et al. (2001) on Python ints (one |r|-bit word per token of t), and windows are visited in
decreasing order of an upper bound (the multiset intersection of the window and r, kept
for every window in one sliding pass), stopping as soon as no remaining window can beat
the best found (or, for a threshold test, as soon as the answer is known).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch


def _tokens(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1 or x.is_floating_point():
            raise ValueError(f"{name} must be a 1-D integer tensor of token ids, got {x.dtype} {list(x.shape)}")
        return x.tolist()
    if hasattr(x, "tolist"):  # numpy
        x = x.tolist()
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)) or not all(isinstance(v, int) for v in x):
        raise ValueError(f"{name} must be a sequence of int token ids (list, tuple, tensor), got {type(x).__name__}")
    return list(x)


def _window_bounds(t: list[int], r_count: Counter, width: int) -> list[int]:
    """For every window t[a : a + width] (a in 0..len(t)-width, or the whole t when shorter):
    sum over tokens of min(count in window, count in r), an upper bound of its LCS with r."""
    width = min(width, len(t))
    inside: Counter = Counter()
    bound = 0
    for c in t[:width]:
        inside[c] += 1
        if inside[c] <= r_count.get(c, 0):
            bound += 1
    bounds = [bound]
    for a in range(1, len(t) - width + 1):
        out, new = t[a - 1], t[a + width - 1]
        if inside[out] <= r_count.get(out, 0):
            bound -= 1
        inside[out] -= 1
        inside[new] += 1
        if inside[new] <= r_count.get(new, 0):
            bound += 1
        bounds.append(bound)
    return bounds


def _lcs_bits(window: list[int], masks: dict[int, int], m: int) -> int:
    """LCS length of `window` and the reference whose positions of each token are `masks`."""
    full = (1 << m) - 1
    v = full
    for c in window:
        u = v & masks.get(c, 0)
        v = ((v + u) | (v - u)) & full
    return m - bin(v).count("1")


def _windowed_lcs(t: list[int], r: list[int], beat: int | None = None) -> int:
    """max over windows of LCS(window, r); with `beat`, may stop early once the result is
    known to be > beat, or known to be <= beat (then returns a value <= beat)."""
    m = len(r)
    width = 2 * m + 1
    if m == 0 or not t:
        return 0
    r_count = Counter(r)
    masks: dict[int, int] = {}
    for j, c in enumerate(r):
        masks[c] = masks.get(c, 0) | (1 << j)
    bounds = _window_bounds(t, r_count, width)
    floor = -1 if beat is None else beat  # windows that cannot exceed this are skipped
    best = 0
    for a in sorted(range(len(bounds)), key=bounds.__getitem__, reverse=True):
        if bounds[a] <= max(best, floor):
            break
        best = max(best, _lcs_bits(t[a : a + width], masks, m))
        if best == m or (beat is not None and best > beat):
            break
    return best


def overlap(text_tokens, ref_tokens) -> float:
    """Eq. (6): overlap of a text t with a reference r, in [0, 1] (0 for an empty r)."""
    t, r = _tokens(text_tokens, "text_tokens"), _tokens(ref_tokens, "ref_tokens")
    return _windowed_lcs(t, r) / len(r) if r else 0.0


def overlap_exceeds(text_tokens, ref_tokens, threshold: float) -> bool:
    """overlap(t, r) > threshold, usually without computing the overlap in full."""
    t, r = _tokens(text_tokens, "text_tokens"), _tokens(ref_tokens, "ref_tokens")
    if not r:
        return False
    m = len(r)
    beat = math.floor(threshold * m)  # the largest N with N / m <= threshold, as floats compare
    while (beat + 1) / m <= threshold:
        beat += 1
    while beat >= 0 and beat / m > threshold:
        beat -= 1
    return _windowed_lcs(t, r, beat) > beat


def filter_references(query_tokens, refs, threshold: float = 2 / 3) -> list[bool]:
    """Which references to keep: True where overlap(query, ref) <= threshold (the paper
    drops references above 2/3 at evaluation, above 0.9 in training). refs: token-id
    sequences."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    t = _tokens(query_tokens, "query_tokens")
    return [not overlap_exceeds(t, r, threshold) for r in refs]
