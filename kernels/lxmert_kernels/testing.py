"""The numerical agreement rule of lxmert_kernels (docs/design.md), for its tests (kernels/tests): one
definition of "close enough" and of how an op is run for it.

Against a reference computed in fp32 (fp64 on CPU), every output and gradient must satisfy

* fp32 inputs: ``max |ours - ref| <= fp32_tol * max(1, max |ref|)`` (1e-5 for elementwise ops,
  1e-4 for attention);
* fp16 / bf16 inputs: ``max |ours - ref| <= 2 * max |torch_lowp - ref| + ulp * max(1, max |ref|)``,
  where ``torch_lowp`` is the same computation done by PyTorch in that dtype (at most twice
  PyTorch's own error, plus one unit of the dtype's precision at the reference's scale).

Imports torch only; nothing here is imported by ``lxmert_kernels`` itself.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# one unit of precision (2^-mantissa bits) of each low-precision dtype, at scale 1
LOWP_FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0 for empty tensors)."""
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def scale_of(ref: torch.Tensor) -> float:
    """max(1, max |ref|): the scale the bounds are relative to."""
    return max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1.0


def error_bound(ref: torch.Tensor, dtype: torch.dtype, fp32_tol: float,
                torch_lowp: Optional[torch.Tensor] = None) -> tuple[float, Optional[float]]:
    """(the largest error allowed for a result in ``dtype`` against ``ref``, PyTorch's own error in
    that dtype or None for fp32). fp16 / bf16 need ``torch_lowp``, PyTorch's result in that dtype."""
    scale = scale_of(ref)
    if dtype == torch.float32:
        return fp32_tol * scale, None
    if dtype not in LOWP_FLOOR:
        raise ValueError(f"lxmert_kernels.testing: no bound for dtype {dtype} (float32, float16 or bfloat16)")
    if torch_lowp is None:
        raise ValueError(f"lxmert_kernels.testing: a {dtype} bound needs PyTorch's own result in {dtype} (torch_lowp)")
    torch_err = max_err(torch_lowp, ref)
    return 2.0 * torch_err + LOWP_FLOOR[dtype] * scale, torch_err


def leaf(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A fresh leaf copy of ``t`` (in ``dtype`` when given) that requires grad; None stays None."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def grads_of(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
             dout: torch.Tensor) -> tuple[torch.Tensor, list[Optional[torch.Tensor]]]:
    """Run ``fn(*inputs)`` (leaves, or None for an absent optional input), backpropagate ``dout`` (cast
    to the output's dtype) and return (output, [each input's gradient, None for a None input])."""
    for t in inputs:
        if t is not None:
            t.grad = None
    out = fn(*inputs)
    out.backward(dout.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in inputs]


def run_with_references(ours_fn: Callable[..., torch.Tensor], ref_fn: Callable[..., torch.Tensor],
                        inputs: Sequence[Optional[torch.Tensor]], dout: torch.Tensor, ref_dtype: torch.dtype):
    """The three runs a comparison needs, each (output, [gradient of each input]):

    * ours: ``ours_fn`` on leaves of ``inputs`` (the dtype under test; None for an absent optional input);
    * the reference: ``ref_fn(*inputs, compute_dtype=ref_dtype)`` on ``ref_dtype`` copies of the same values;
    * PyTorch's own: ``ref_fn(*inputs, compute_dtype=None)`` on leaves of ``inputs``, the basis of the fp16 /
      bf16 bound; (None, [None, ...]) when ours' output is fp32.
    """
    ours = grads_of(ours_fn, [leaf(t) for t in inputs], dout)
    ref = grads_of(lambda *x: ref_fn(*x, compute_dtype=ref_dtype), [leaf(t, ref_dtype) for t in inputs], dout)
    low = (None, [None] * len(inputs))
    if ours[0].dtype != torch.float32:
        low = grads_of(lambda *x: ref_fn(*x, compute_dtype=None), [leaf(t) for t in inputs], dout)
    return ours, ref, low
