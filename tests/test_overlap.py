"""The overlap of eq. (6) against a brute-force transcription of its definition, the paper's
examples, the threshold test, input forms, and speed at training sizes."""
from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest
import torch

from memory3.retrieval.overlap import filter_references, overlap, overlap_exceeds


def brute_force(t: list[int], r: list[int]) -> float:
    """max N over index chains with i_N - i_1 <= 2|r|: for every window start a, an O(W |r|)
    LCS table of t[a : a + 2|r| + 1] and r."""
    m = len(r)
    if m == 0:
        return 0.0
    best = 0
    for a in range(len(t)):
        w = t[a : a + 2 * m + 1]
        table = [[0] * (m + 1) for _ in range(len(w) + 1)]
        for i, j in itertools.product(range(1, len(w) + 1), range(1, m + 1)):
            table[i][j] = table[i - 1][j - 1] + 1 if w[i - 1] == r[j - 1] else max(table[i - 1][j], table[i][j - 1])
        best = max(best, table[-1][-1])
    return best / m


def test_against_brute_force_on_random_cases():
    rng = random.Random(0)
    for case in range(300):
        vocab = rng.choice([2, 3, 5, 20])
        t = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        r = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.3 and len(t) > 5:  # plant a (noisy) copy of r in t
            at = rng.randrange(len(t))
            t[at:at] = [x if rng.random() < 0.8 else rng.randrange(vocab) for x in r]
        want = brute_force(t, r)
        assert overlap(t, r) == want, (case, t, r)
        for threshold in (0.0, 0.5, 2 / 3, 0.9, 1.0):
            assert overlap_exceeds(t, r, threshold) == (want > threshold), (case, threshold)


def test_window_is_two_reference_lengths():
    r = [1, 2]  # |r| = 2: matches may span i_N - i_1 <= 4
    assert overlap([1, 9, 9, 9, 2], r) == 1.0
    assert overlap([1, 9, 9, 9, 9, 2], r) == 0.5
    assert overlap([7, 1, 2, 7], r) == 1.0
    assert overlap([2, 1], r) == 0.5  # order matters
    assert overlap([], r) == 0.0 and overlap([1, 2], []) == 0.0


def test_the_papers_examples():
    """A reference containing the question overlaps ~1; a relevant but distinct one far less."""
    rng = random.Random(1)
    question = [rng.randrange(30000) for _ in range(40)]
    containing = [rng.randrange(30000) for _ in range(50)] + question + [rng.randrange(30000) for _ in range(38)]
    assert overlap(containing, question) == 1.0
    assert overlap(question, containing) == pytest.approx(40 / 128)
    paraphrase = [x if i % 5 else rng.randrange(30000) for i, x in enumerate(question)]  # every 5th token changed
    assert overlap(paraphrase, question) == pytest.approx(32 / 40)
    assert filter_references(question, [containing, paraphrase, question[:20]], threshold=2 / 3) == [True, False, False]
    assert filter_references(question, [question[:20]], threshold=1.0) == [True]


def test_inputs_lists_tensors_arrays():
    t, r = [5, 6, 7, 8], [6, 8]
    assert overlap(torch.tensor(t), torch.tensor(r)) == overlap(np.array(t), r) == overlap(tuple(t), r) == 1.0
    with pytest.raises(ValueError, match="text_tokens must be a 1-D integer tensor"):
        overlap(torch.tensor([1.0]), r)
    with pytest.raises(ValueError, match="ref_tokens must be a sequence of int token ids"):
        overlap(t, "abc")
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        filter_references(t, [r], threshold=2)


def test_fast_enough_for_training_time_filtering():
    """A 2048-token training sequence against 32 references of 128 tokens (one per chunk)."""
    rng = random.Random(2)
    text = [rng.randrange(32000) for _ in range(2048)]
    refs = [[rng.randrange(32000) for _ in range(128)] for _ in range(30)] + [text[100:228], text[1000:1128]]
    start = time.perf_counter()
    keep = filter_references(text, refs, threshold=0.9)
    elapsed = time.perf_counter() - start
    assert keep == [True] * 30 + [False, False]
    assert elapsed < 0.5, f"{elapsed:.3f} s for 32 references"


def test_window_bounds_are_the_bag_intersections():
    """The pruning bound of every window (an underestimate would skip the best window)."""
    from collections import Counter

    from memory3.retrieval.overlap import _window_bounds

    rng = random.Random(3)
    for _ in range(100):
        t = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        r = Counter(rng.randrange(4) for _ in range(rng.randrange(1, 6)))
        width = rng.randrange(1, 12)
        starts = range(max(1, len(t) - width + 1))
        want = [sum((Counter(t[a : a + width]) & r).values()) for a in starts]
        assert _window_bounds(t, r, width) == want
