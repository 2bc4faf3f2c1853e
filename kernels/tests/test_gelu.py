"""bias_gelu = exact erf GELU(x + bias): forward and grads of x and bias."""
from __future__ import annotations

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels.reference import bias_gelu_ref

from _helpers import DEVICE, ON_GPU, REF_DTYPE, check, grads_of, leaf

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    ((3, 7, 48), F32),
    ((37, 100), F32),
    ((2, 20, 3072), F32),
    ((3, 7, 100), F16),
    ((5, 3072), BF16),
]


def _params():
    out = []
    for shape, dt in CASES:
        for d in ((F32, F16, BF16) if ON_GPU else (dt,)):
            out.append(pytest.param(shape, d, id=f"{'x'.join(map(str, shape))}-{str(d)[6:]}"))
    return out


@pytest.mark.parametrize("shape,dtype", _params())
def test_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(DEVICE, dtype)
    b = torch.randn(shape[-1], generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    ours, og = grads_of(lk.bias_gelu, [leaf(x), leaf(b)], dy)
    assert ours.dtype == dtype and ours.shape == x.shape
    ref, rg = grads_of(lambda x_, b_: bias_gelu_ref(x_, b_, compute_dtype=REF_DTYPE),
                       [leaf(x, REF_DTYPE), leaf(b, REF_DTYPE)], dy)
    low, lg = None, [None, None]
    if dtype != F32:
        low, lg = grads_of(lambda x_, b_: bias_gelu_ref(x_, b_, compute_dtype=None), [leaf(x), leaf(b)], dy)
    check("y", ours, ref, low, fp32_tol=1e-5)
    check("dx", og[0], rg[0], lg[0], fp32_tol=1e-5)
    check("dbias", og[1], rg[1], lg[1], fp32_tol=1e-5)


def test_non_contiguous_input_and_determinism():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 2 * 100, generator=gen).to(DEVICE)
    x = base[:, ::2]  # non-contiguous
    b = torch.randn(100, generator=gen).to(DEVICE)
    dy = torch.randn(6, 100, generator=gen).to(DEVICE)
    xl, bl = leaf(x), leaf(b)
    y = lk.bias_gelu(xl, bl)
    check("y", y, bias_gelu_ref(x, b, compute_dtype=REF_DTYPE), fp32_tol=1e-5)
    g1 = torch.autograd.grad(y, [xl, bl], dy, retain_graph=True)
    g2 = torch.autograd.grad(y, [xl, bl], dy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_input_errors():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bias"):
        lk.bias_gelu(x, torch.ones(7, device=DEVICE))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        lk.bias_gelu(x.long(), torch.ones(8, device=DEVICE))
