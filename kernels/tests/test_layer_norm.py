"""layer_norm = LayerNorm(dropout(x) + residual): forward and grads of x, residual, weight, bias."""
from __future__ import annotations

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels.reference import layer_norm_ref

from _helpers import BF16, DEVICE, F16, F32, REF_DTYPE, check, dtype_params, grads_of, leaf, run_with_references

pytestmark = pytest.mark.gpu

# (shape of x, residual?, dtypes): the first dtype on CPU, each on a GPU (_helpers.dtype_params): each case
# runs in its own dtype everywhere
CASES = [
    ((3, 7, 48), False, (F32,)),
    ((37, 100), True, (F32,)),
    ((2, 5, 768), True, (F32,)),
    ((3, 7, 100), True, (F16,)),
    ((9, 48), False, (F16,)),
    ((2, 5, 768), True, (BF16,)),
    ((4, 4096), True, (F32,)),
]


def make_inputs(shape, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    r = torch.randn(shape, generator=gen) if residual else None
    w = 1 + 0.1 * torch.randn(N, generator=gen)
    b = 0.1 * torch.randn(N, generator=gen)
    dy = torch.randn(shape, generator=gen)
    return x, r, w, b, dy


@pytest.mark.parametrize("shape,residual,dtype",
                         dtype_params(CASES, lambda shape, res: f"{'x'.join(map(str, shape))}-res{int(res)}"))
def test_matches_reference(shape, residual, dtype):
    x, r, w, b, dy = make_inputs(shape, residual)
    lp = [None if t is None else t.to(DEVICE, dtype) for t in (x, r, w, b)]
    dy = dy.to(DEVICE)
    (ours, og), (ref, rg), (low, lg) = run_with_references(
        lambda x_, r_, w_, b_: lk.layer_norm(x_, w_, b_, 1e-12, r_),
        lambda x_, r_, w_, b_, compute_dtype: layer_norm_ref(x_, w_, b_, 1e-12, r_, compute_dtype=compute_dtype),
        lp, dy)
    assert ours.dtype == dtype and ours.shape == x.shape
    check("y", ours, ref, low, fp32_tol=1e-5)
    for name, g, rr, ll in zip(("dx", "dresidual", "dweight", "dbias"), og, rg, lg):
        if rr is not None:
            check(name, g, rr, ll, fp32_tol=1e-5)


def test_fp32_weights_with_low_precision_activations():
    """Mixed precision: bf16 activations with fp32 LayerNorm parameters."""
    x, r, w, b, dy = make_inputs((6, 100), True, seed=2)
    xs = [leaf(x.to(DEVICE, BF16)), leaf(r.to(DEVICE, BF16)), leaf(w.to(DEVICE)), leaf(b.to(DEVICE))]
    out, g = grads_of(lambda x_, r_, w_, b_: lk.layer_norm(x_, w_, b_, 1e-12, r_), xs, dy.to(DEVICE))
    assert out.dtype == BF16 and g[2].dtype == F32 and g[3].dtype == F32
    ref, rg = grads_of(lambda x_, r_, w_, b_: layer_norm_ref(x_, w_, b_, 1e-12, r_, compute_dtype=REF_DTYPE),
                       [leaf(t, REF_DTYPE) for t in xs], dy.to(DEVICE))
    assert (out.double() - ref.double()).abs().max() < 0.05
    assert (g[2].double() - rg[2].double()).abs().max() < 0.05


def test_dropout_mask_gradients_and_determinism():
    shape, p, seed = (4, 7, 100), 0.2, 5
    x, r, w, b, dy = make_inputs(shape, True, seed=1)
    ts = [t.to(DEVICE) for t in (x, r, w, b)]
    dy = dy.to(DEVICE)
    f = lambda x_, r_, w_, b_: lk.layer_norm(x_, w_, b_, 1e-12, r_, dropout_p=p, seed=seed)  # noqa: E731
    ours, og = grads_of(f, [leaf(t) for t in ts], dy)
    keep = lk.layer_norm_dropout_mask(seed, p, shape, device=DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    ref, rg = grads_of(lambda x_, r_, w_, b_: layer_norm_ref(x_, w_, b_, 1e-12, r_, p, keep, compute_dtype=REF_DTYPE),
                       [leaf(t, REF_DTYPE) for t in ts], dy)
    check("y", ours, ref, fp32_tol=1e-5)
    for name, g, rr in zip(("dx", "dresidual", "dweight", "dbias"), og, rg):
        check(name, g, rr, fp32_tol=1e-5)
    # dropped elements of x get exactly zero gradient
    assert torch.all(og[0][~keep] == 0)
    again, ag = grads_of(f, [leaf(t) for t in ts], dy)
    assert torch.equal(ours, again) and all(torch.equal(a, c) for a, c in zip(og, ag))
    other = lk.layer_norm(ts[0], ts[2], ts[3], 1e-12, ts[1], dropout_p=p, seed=seed + 1)
    assert not torch.equal(ours, other)


def test_input_errors():
    x = torch.randn(3, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        lk.layer_norm(x, torch.ones(7, device=DEVICE), w)
    with pytest.raises(ValueError, match="residual"):
        lk.layer_norm(x, w, w, residual=torch.randn(3, 9, device=DEVICE))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        lk.layer_norm(x.double(), w, w)
    with pytest.raises(ValueError, match="last dim"):
        big = torch.randn(1, 10000, device=DEVICE)
        lk.layer_norm(big, torch.ones(10000, device=DEVICE), torch.ones(10000, device=DEVICE))
