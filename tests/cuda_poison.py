"""NaN in every block the CUDA caching allocator will hand out next, so an output element a
kernel never writes shows as NaN (the GPU tests' poisoned outputs).

One big NaN tensor is not enough: allocations up to 1 MB come from a separate pool of 2 MB
segments, and every allocation takes the smallest free block that fits, which is usually a
leftover piece of a segment that holds the test's inputs. So: drop the free segments, then
fill the free pieces of the live ones, largest first, with NaN tensors until a size fits
nowhere any more (the allocator reserves a new segment; that one is given back at once),
add one NaN segment to each pool for outputs that fit no piece, and free them all."""
from __future__ import annotations

import torch

# Large pool first (blocks over 1 MB), then the small pool's sizes down to its 512-byte unit.
_SIZES = [1 << 26, 1 << 24, 1 << 22, (1 << 20) + 512, 1 << 20, 1 << 18, 1 << 16, 1 << 14, 1 << 12, 1 << 10, 512]
_MAX_PER_SIZE = 256  # a bound on the loop (each free piece takes at most 3 of the next size down)


def poison_cache() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = []
    for nbytes in _SIZES:
        for _ in range(_MAX_PER_SIZE):
            before = torch.cuda.memory_reserved()
            t = torch.full((nbytes // 4,), float("nan"), device="cuda")
            if torch.cuda.memory_reserved() != before:  # no free piece this size is left
                del t
                torch.cuda.empty_cache()  # the new segment holds nothing else: back it goes
                break
            held.append(t)
    nan = float("nan")
    held += [torch.full((1 << 24,), nan, device="cuda")]  # 64 MB: the large pool's spare
    held += [torch.full((1 << 18,), nan, device="cuda") for _ in range(2)]  # 2 x 1 MB: a small segment
    torch.cuda.synchronize()
    del held
