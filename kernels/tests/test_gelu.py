"""bias_gelu = exact erf GELU(x + bias): forward and grads of x and bias."""
from __future__ import annotations

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels.reference import bias_gelu_ref

from _helpers import BF16, DEVICE, F16, F32, REF_DTYPE, check, dtype_params, leaf, run_with_references

pytestmark = pytest.mark.gpu

# (shape of x, dtypes): the first dtype on CPU, each on a GPU (_helpers.dtype_params): each case runs in its
# own dtype everywhere
CASES = [
    ((3, 7, 48), (F32,)),
    ((37, 100), (F32,)),
    ((2, 20, 3072), (F32,)),
    ((3, 7, 100), (F16,)),
    ((5, 3072), (BF16,)),
]


@pytest.mark.parametrize("shape,dtype", dtype_params(CASES, lambda shape: "x".join(map(str, shape))))
def test_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(DEVICE, dtype)
    b = torch.randn(shape[-1], generator=gen).to(DEVICE, dtype)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    (ours, og), (ref, rg), (low, lg) = run_with_references(lk.bias_gelu, bias_gelu_ref, [x, b], dy)
    assert ours.dtype == dtype and ours.shape == x.shape
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
