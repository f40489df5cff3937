"""Every benchmark checks the kernel's answer against the reference once, before it times
anything: a wrong fast kernel fails here instead of showing as a speedup."""
from __future__ import annotations

import torch


class WrongResult(AssertionError):
    pass


def _fail(what: str, detail: str) -> None:
    raise WrongResult(f"{what}: the kernel disagrees with the reference ({detail}); not timing it")


def exact(what: str, got, want) -> None:
    """Data movement and the int8/int4 codecs: bit-identical."""
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype or not torch.equal(g, w):
            _fail(what, f"{tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}, not equal")


def attention_output(what: str, out: torch.Tensor, ref_out: torch.Tensor) -> None:
    """out against the reference (computed in float32, cast to out's dtype): float32/float64
    within 1e-4; bf16/fp16 within one ulp plus float32 accumulation error (the kernel
    accumulates in float32 and rounds once; the reference rounds once too)."""
    ref = ref_out.double()
    err = (out.double() - ref).abs()
    if out.dtype in (torch.bfloat16, torch.float16):
        cap = torch.finfo(out.dtype).eps * ref.abs() * (1 + 1e-3) + 1e-5
    else:
        cap = 1e-4 * (1 + ref.abs())
    if not bool((err <= cap).all()):
        _fail(what, f"max error {err.max().item():.3g}")


def lse(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(torch.isneginf(got), torch.isneginf(want)):
        _fail(what, "different queries see no key")
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite].float()).abs().max().item() if finite.any() else 0.0
    if err > 1e-4 * (1 + want[finite].abs().max().item() if finite.any() else 1):
        _fail(what, f"lse max error {err:.3g}")


def relative(what: str, got, want, tol: float) -> None:
    """Gradients: relative L2 error of each tensor below tol."""
    for i, (g, w) in enumerate(zip(got, want)):
        rel = ((g.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30)).item()
        if not rel < tol:
            _fail(what, f"output {i}: relative error {rel:.3g} >= {tol}")


def pq_codes(what: str, codes: torch.Tensor, ref_codes: torch.Tensor) -> None:
    """pq codes may differ only where two centroids are at (near-)equal distance: rarely."""
    frac = (codes != ref_codes).float().mean().item()
    if frac > 0.01:
        _fail(what, f"{frac:.1%} of pq codes differ")
