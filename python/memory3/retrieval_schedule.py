"""Which text each chunk retrieves with while generating (PAPER.md "Project decisions").

Chunks are `chunk_size` tokens counted from the first context token (index P, after the
reference prefix), on one grid over the prompt and the generated text:

- a prompt chunk (one that holds prompt tokens) retrieves with its own prompt tokens;
- a generated chunk (one that starts at or after the end of the prompt) retrieves with the
  `chunk_size` tokens before it, except the first generated chunk, which keeps the memories
  of the last prompt chunk (paper: "the first decoded chunk inherits the explicit memories
  retrieved by the last input chunk").

Spans are half-open index ranges [start, stop) into a sequence laid out as
`prefix + <s> + text` (index 0 is the first prefix token).
"""
from __future__ import annotations

import math


def chunk_of(index: int, prefix_len: int, chunk_size: int) -> int:
    """The chunk of context index `index` (>= prefix_len)."""
    if index < prefix_len:
        raise ValueError(f"index {index} lies in the reference prefix (P={prefix_len}): it has no chunk")
    return (index - prefix_len) // chunk_size


def prompt_chunk_spans(prompt_len: int, prefix_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) of the prompt tokens of each prompt chunk (the last may be partial)."""
    if prompt_len <= prefix_len:
        raise ValueError(f"a prompt must hold at least one context token after the prefix (P={prefix_len}), "
                         f"got {prompt_len} tokens")
    n_chunks = math.ceil((prompt_len - prefix_len) / chunk_size)
    return [(prefix_len + c * chunk_size, min(prefix_len + (c + 1) * chunk_size, prompt_len)) for c in range(n_chunks)]


def starts_chunk(index: int, prefix_len: int, chunk_size: int) -> bool:
    """True when context index `index` is the first token of a chunk."""
    return index >= prefix_len and (index - prefix_len) % chunk_size == 0


def generated_chunk_query(start: int, prompt_len: int, chunk_size: int) -> tuple[int, int] | None:
    """The query span of the generated chunk that starts at index `start` (>= prompt_len):
    the `chunk_size` tokens before it, or None for the first generated chunk (it keeps the
    last prompt chunk's memories: its chunk_size predecessors are not all generated yet)."""
    if start < prompt_len:
        raise ValueError(f"the chunk starting at {start} holds prompt tokens (prompt length {prompt_len}): "
                         "it retrieves with its own text")
    if start - chunk_size < prompt_len:
        return None
    return (start - chunk_size, start)
