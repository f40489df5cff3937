"""Shared fixtures: the device every kernel test runs on, per-test seeding, and the
sample inputs of each op (memory3.testing), so the CUDA tests are the CPU tests with
device="cuda". CUDA cases skip without a GPU, or while the build has no CUDA kernel for the
op (the skip names it)."""
from __future__ import annotations

import zlib

import pytest
import torch

import memory3  # noqa: F401  (loads memory3._C and registers the fake kernels)
from memory3 import testing

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu" always; "cuda" when a GPU is visible, else skipped."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture
def seeded(request) -> torch.Generator:
    """torch's global RNG seeded from the test id (a failure reproduces), also returned as a
    CPU generator with the same seed."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=sorted(testing.SAMPLE_INPUTS))
def op_name(request) -> str:
    return request.param


@pytest.fixture
def sample_inputs():
    """sample_inputs(op, device, **kw) -> list of the op's positional argument tuples."""

    def make(op: str, device: str, **kwargs) -> list[tuple]:
        testing.require_kernel(op, device)
        return testing.SAMPLE_INPUTS[op](device, **kwargs)

    return make


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two, and far faster on a shared machine
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
