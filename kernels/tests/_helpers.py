"""Shared test utilities: device, dtypes, the agreement rule (lxmert_kernels.testing; docs/design.md).

The device follows the kernels: conftest.py compiled them when the machine has CUDA (ON_GPU, tensors
on CUDA) and made them interpreted otherwise (tensors on the CPU)."""
from __future__ import annotations

import pytest
import torch

from lxmert_kernels import _attention_core, testing
from lxmert_kernels.testing import error_bound, grads_of, leaf, max_err

ON_GPU = not _attention_core.INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
# oracle precision: fp64 on CPU (cheap), fp32 on GPU
REF_DTYPE = torch.float32 if ON_GPU else torch.float64
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

__all__ = ["ON_GPU", "DEVICE", "REF_DTYPE", "F32", "F16", "BF16", "check", "dtype_params", "grads_of", "kernel_class",
           "leaf", "random_padding_mask", "run_with_references"]


def kernel_class():
    """The class of the kernel objects (JITFunction compiled, InterpretedFunction in the interpreter): its
    ``run`` is what every launch goes through."""
    return type(_attention_core._attn_fwd_kernel)


def check(name, ours, ref, torch_lowp=None, fp32_tol=1e-4):
    """fp32: |ours - ref| <= fp32_tol * max(1, |ref|max). fp16/bf16: error at most twice
    PyTorch's own error in that dtype (``torch_lowp``), plus one ulp of the output scale."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    bound, err_torch = error_bound(ref, ours.dtype, fp32_tol, torch_lowp)
    if err_torch is None:
        assert err <= bound, f"{name}: fp32 error {err:.3g} > {bound:.3g}"
    else:
        assert err <= bound, f"{name}: {ours.dtype} error {err:.3g} > 2 x torch {err_torch:.3g} + floor"


def dtype_params(cases, case_id):
    """pytest params of ``cases``, each a tuple whose last item is the dtypes it runs in: the first on
    CPU (the interpreter is slow, and computes attention in fp32 whatever the dtype), each of them on a
    GPU, where a dtype is a compilation of its own. ``case_id(*case_without_dtypes)`` names a case."""
    params = []
    for *case, dtypes in cases:
        for dtype in (dtypes if ON_GPU else dtypes[:1]):
            params.append(pytest.param(*case, dtype, id=f"{case_id(*case)}-{str(dtype)[6:]}"))
    return params


def run_with_references(ours_fn, ref_fn, inputs, dout):
    """lxmert_kernels.testing.run_with_references against the REF_DTYPE reference: (ours, ref, low)."""
    return testing.run_with_references(ours_fn, ref_fn, inputs, dout, REF_DTYPE)


def random_padding_mask(B: int, L: int, gen: torch.Generator, fully_masked_rows=(), min_len=1):
    """bool (B, L), True = keep: random lengths, all False for the given batch rows."""
    lengths = torch.randint(min_len, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    for b in fully_masked_rows:
        mask[b] = False
    return mask
