"""Random inputs for tests and benchmarks: memory_attention calls drawn fresh per case, and
sample inputs of every op on any device."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


def require_kernel(op: str, device: str) -> None:
    """In a test: skip when memory3::<op> has no kernel for the device in this build (the CUDA
    kernels arrive op by op); on the CPU every op must have one."""
    import pytest

    key = "CUDA" if str(device).startswith("cuda") else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memory3::{op}", key):
        if key == "CPU":
            pytest.fail(f"memory3::{op} has no CPU kernel")
        pytest.skip(f"memory3::{op} has no {key} kernel in this build")


@dataclass
class AttentionCase:
    """One memory_attention call. kv_lens=None means every sequence fills S."""

    B: int = 2
    T: int = 1
    S: int = 97
    Hq: int = 8
    Hkv: int = 2
    D: int = 64
    N: int = 33
    M: int = 8
    R: int = 5
    chunk_size: int = 16
    chunk_start: int = 3
    dtype: torch.dtype = torch.float32
    kv_lens: list[int] | None = None
    int8_bank: bool = False
    empty_slot_frac: float = 0.2

    @property
    def chunks(self) -> int:
        return max(1, (self.S - 1 - self.chunk_start) // self.chunk_size + 1)

    def seed(self) -> int:
        return zlib.crc32(repr(self).encode())

    def make(self, device: str = "cpu", requires_grad: bool = False) -> dict:
        """Keyword arguments for memory3.ops.memory_attention (and the reference)."""
        g = torch.Generator().manual_seed(self.seed())

        def randn(*shape):
            t = torch.randn(*shape, generator=g).to(self.dtype).to(device)
            return t.requires_grad_(requires_grad)

        q = randn(self.B, self.T, self.Hq, self.D)
        k = randn(self.B, self.S, self.Hkv, self.D)
        v = randn(self.B, self.S, self.Hkv, self.D)
        ids = torch.randint(0, self.N, (self.B, self.chunks, self.R), generator=g, dtype=torch.int32)
        ids[torch.rand(ids.shape, generator=g) < self.empty_slot_frac] = -1
        args = dict(q=q, k=k, v=v, mem_ids=ids.to(device), chunk_size=self.chunk_size, chunk_start=self.chunk_start)
        if self.int8_bank:
            shape = (self.N, self.Hkv, self.M, self.D)
            args["mem_k"] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)
            args["mem_v"] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8).to(device)
            args["mem_k_scale"] = (torch.rand(shape[:3], generator=g) / 64).to(device)
            args["mem_v_scale"] = (torch.rand(shape[:3], generator=g) / 64).to(device)
        else:
            args["mem_k"] = randn(self.N, self.Hkv, self.M, self.D)
            args["mem_v"] = randn(self.N, self.Hkv, self.M, self.D)
        if self.kv_lens is not None:
            args["kv_lens"] = torch.tensor(self.kv_lens, dtype=torch.int32, device=device)
        return args


# ---------------------------------------------------------------------------- sample inputs
# One list per op, in the op's schema order (args tuple, as torch.library.opcheck takes
# them), covering the branches of its kernels, on any device: the CUDA tests are the CPU
# tests with device="cuda" (pytorch/extension-cpp's sample_inputs).

ATTENTION_SAMPLE_CASES = (
    AttentionCase(T=6, S=20, D=16),  # float bank, GQA 4, prefix before the first chunk
    AttentionCase(T=5, S=23, Hq=10, Hkv=2, D=24, chunk_size=4, chunk_start=2, kv_lens=[23, 9]),  # GQA 5, ragged
    AttentionCase(T=1, S=30, Hq=5, Hkv=1, D=16, int8_bank=True, kv_lens=[30, 12]),  # decode, int8 bank
    AttentionCase(T=7, S=7, Hq=4, Hkv=4, D=8, int8_bank=True, dtype=torch.float64, kv_lens=[7, 3]),  # padded queries
    AttentionCase(T=9, S=17, Hq=6, Hkv=3, D=32, dtype=torch.bfloat16, chunk_size=5, chunk_start=0),
)
ATTENTION_ARG_ORDER = ("q", "k", "v", "mem_k", "mem_v", "mem_ids", "kv_lens", "chunk_size", "chunk_start", "scale",
                       "mem_k_scale", "mem_v_scale")


def attention_args(kwargs: dict) -> tuple:
    """memory_attention keyword arguments (AttentionCase.make) as the op's positional args."""
    return tuple(kwargs.get(name) for name in ATTENTION_ARG_ORDER)


def low_precision_errors(out: torch.Tensor, exact: torch.Tensor,
                         same_dtype: torch.Tensor) -> tuple[float, float, float]:
    """A bf16/fp16 output measured against the exact (float64) answer: (its max error, the max
    error of `same_dtype` -- the same computation done by PyTorch in out's dtype -- and its
    worst error over the float32-accumulation cap eps/2 |exact| (1 + 1e-3) + 1e-5).
    FlashAttention's rule is err <= 2 x the second; a kernel that accumulates in float32 and
    rounds once has the third <= 1."""
    exact = exact.detach().double().cpu()
    err = (out.detach().double().cpu() - exact).abs()
    same_err = (same_dtype.detach().double().cpu() - exact).abs().max().item()
    cap = 0.5 * torch.finfo(out.dtype).eps * exact.abs() * (1 + 1e-3) + 1e-5
    return err.max().item(), same_err, (err / cap).max().item()


def memory_attention_samples(device: str = "cpu", requires_grad: bool = False) -> list[tuple]:
    """Float and int8 banks, GQA 4 and 5, ragged kv_lens (int32 and int64), decode, padded
    queries, bf16 and float64."""
    samples = []
    for i, case in enumerate(ATTENTION_SAMPLE_CASES):
        kwargs = case.make(device, requires_grad)
        if i == 1:  # int64 indices are accepted (checked, then narrowed)
            kwargs["mem_ids"], kwargs["kv_lens"] = kwargs["mem_ids"].long(), kwargs["kv_lens"].long()
        samples.append(attention_args(kwargs))
    return samples


def _bank(g: torch.Generator, shape: tuple, int8: bool, dtype=torch.float32):
    """(mem_k, mem_v, mem_k_scale, mem_v_scale) of a random bank."""
    if int8:
        mk, mv = (torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for _ in range(2))
        return mk, mv, torch.rand(shape[:3], generator=g) / 64, torch.rand(shape[:3], generator=g) / 64
    mk, mv = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    return mk, mv, None, None


def gather_memory_samples(device: str = "cpu", requires_grad: bool = False) -> list[tuple]:
    """(mem_k, mem_v, ids, out_dtype, mem_k_scale, mem_v_scale): float and int8 banks, ids of
    several shapes and both index dtypes with empty slots and repeats."""
    g = torch.Generator().manual_seed(11)
    samples = []
    for shape, int8, dtype, out_dtype, ids, ids_dtype in (
        ((7, 2, 3, 80), False, torch.bfloat16, None, [[3, -1, 3], [0, 6, 2]], torch.int32),
        ((9, 1, 8, 16), False, torch.float32, torch.float64, [5, 5, -1, 8], torch.int64),
        ((7, 2, 3, 48), True, None, torch.float32, [[[6, -1]], [[0, 6]]], torch.int32),
        ((5, 2, 2, 16), True, None, None, 4, torch.int64),  # a 0-d id
    ):
        mk, mv, ks, vs = (None if t is None else t.to(device) for t in _bank(g, shape, int8, dtype))
        if requires_grad and not int8:
            mk.requires_grad_(), mv.requires_grad_()
        samples.append((mk, mv, torch.tensor(ids, dtype=ids_dtype, device=device), out_dtype, ks, vs))
    return samples


def quantize_memory_samples(device: str = "cpu") -> list[tuple]:
    """(x, codec, codebook): every codec, a short last int4 group, several input dtypes."""
    g = torch.Generator().manual_seed(12)
    samples = []
    for codec, shape, dtype in (("int8", (7, 2, 3, 80), torch.bfloat16), ("int4", (5, 2, 3, 48), torch.float32),
                                ("pq", (6, 2, 3, 32), torch.float16), ("pq", (3, 1, 2, 16), torch.float64)):
        x = torch.randn(shape, generator=g).to(dtype).to(device)
        cb = torch.randn(shape[1], shape[3] // 8, 256, 8, generator=g).to(device) if codec == "pq" else None
        samples.append((x, codec, cb))
    return samples


def dequantize_memory_samples(device: str = "cpu") -> list[tuple]:
    """(codes, meta, codec, ids, out_dtype): every codec, with and without ids."""
    from memory3.reference import quantize_memory_ref

    samples = []
    for i, (x, codec, cb) in enumerate(quantize_memory_samples("cpu")):
        codes, meta = quantize_memory_ref(x, codec, cb)
        ids = torch.tensor([[x.shape[0] - 1, -1], [0, 1]], dtype=torch.int32 if i % 2 else torch.int64)
        out_dtype = (torch.float16, None, torch.float32, torch.bfloat16)[i]
        samples.append((codes.to(device), meta.to(device), codec, ids.to(device) if i != 2 else None, out_dtype))
    return samples


SAMPLE_INPUTS = {
    "memory_attention": memory_attention_samples,
    "gather_memory": gather_memory_samples,
    "quantize_memory": quantize_memory_samples,
    "dequantize_memory": dequantize_memory_samples,
}
