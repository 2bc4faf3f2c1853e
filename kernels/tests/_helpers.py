"""Shared test utilities: device, dtypes, tolerances (DESIGN.md conventions)."""
from __future__ import annotations

import os

import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
# oracle precision: fp64 on CPU (cheap), fp32 on GPU
REF_DTYPE = torch.float32 if ON_GPU else torch.float64

LOWP_FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def scale_of(ref: torch.Tensor) -> float:
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def check(name, ours, ref, torch_lowp=None, fp32_tol=1e-4):
    """fp32: |ours - ref| <= fp32_tol * max(1, |ref|max). fp16/bf16: error at most twice
    PyTorch's own error in that dtype (``torch_lowp``), plus one ulp of the output scale."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    scale = scale_of(ref)
    if ours.dtype == torch.float32:
        assert err <= fp32_tol * scale, f"{name}: fp32 error {err:.3g} > {fp32_tol * scale:.3g}"
    else:
        assert torch_lowp is not None
        err_torch = max_err(torch_lowp, ref)
        bound = 2.0 * err_torch + LOWP_FLOOR[ours.dtype] * scale
        assert err <= bound, f"{name}: {ours.dtype} error {err:.3g} > 2 x torch {err_torch:.3g} + floor"


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def grads_of(fn, inputs, dout):
    """Run fn(*inputs) (inputs are leaves), backprop dout, return (out, [grads])."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def random_padding_mask(B: int, L: int, gen: torch.Generator, fully_masked_rows=(), min_len=1):
    """bool (B, L), True = keep: random lengths, all False for the given batch rows."""
    lengths = torch.randint(min_len, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    for b in fully_masked_rows:
        mask[b] = False
    return mask
