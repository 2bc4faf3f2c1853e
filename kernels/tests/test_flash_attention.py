"""flash_attention: forward and every gradient against the fp64 (CPU) / fp32 (GPU) reference."""
from __future__ import annotations

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels import _attention_core as core
from lxmert_kernels.reference import attention_ref

from _helpers import (BF16, DEVICE, F16, F32, REF_DTYPE, check, dtype_params, grads_of, leaf, random_padding_mask,
                      run_with_references)

pytestmark = pytest.mark.gpu

# (B, Lq, Lk, D, mask mode, dtypes): the first dtype on CPU, each on a GPU (_helpers.dtype_params). Each case
# runs in its own dtype everywhere; on a GPU bf16 (LXMERT's training dtype) also runs where it meets tiles of
# its own: LXMERT's shapes at D=64 (20 words x 36 objects; 64 x 64, the split-query forward) and the extreme
# head dims (16, the smallest MMA K; 128, the largest tile). Another dtype elsewhere would add compilations
# (a GPU run's main cost), not code paths: fp32 runs the IEEE dots in most other tests too.
# mask modes: "none", "pad" (random lengths), "full" (random lengths + one fully masked batch row)
CASES = [
    (3, 20, 36, 64, "full", (F32, BF16)),
    (1, 36, 20, 32, "none", (F32,)),
    (3, 1, 37, 32, "pad", (F32,)),
    (1, 64, 64, 64, "pad", (F32, BF16)),
    (3, 20, 36, 32, "full", (F16,)),
    (3, 64, 64, 64, "pad", (F16,)),
    (1, 1, 37, 64, "none", (F16,)),
    (3, 36, 20, 64, "full", (BF16,)),
    (1, 64, 64, 32, "pad", (BF16,)),
    (1, 5, 9, 16, "pad", (F32, BF16)),   # smallest supported head dim
    (1, 5, 9, 128, "pad", (F32, BF16)),  # largest supported head dim
]


def make_inputs(B, Lq, Lk, H, D, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=gen)
    k = torch.randn(B, Lk, H, D, generator=gen)
    v = torch.randn(B, Lk, H, D, generator=gen)
    dout = torch.randn(B, Lq, H, D, generator=gen)
    mask = None
    if mode != "none":
        mask = random_padding_mask(B, Lk, gen, fully_masked_rows=(1,) if (mode == "full" and B > 1) else ())
        mask = mask.to(DEVICE)
    return q, k, v, dout, mask


def compare_attention(B, Lq, Lk, H, D, mode, dtype, seed=0):
    q, k, v, dout, mask = make_inputs(B, Lq, Lk, H, D, mode, seed)
    x_lp = [t.to(DEVICE, dtype) for t in (q, k, v)]
    dout = dout.to(DEVICE)
    (ours, ours_g), (ref, ref_g), (low, low_g) = run_with_references(
        lambda a, b, c: lk.flash_attention(a, b, c, mask),
        lambda a, b, c, compute_dtype: attention_ref(a, b, c, mask, compute_dtype=compute_dtype), x_lp, dout)
    assert ours.dtype == dtype and ours.is_contiguous()
    check("out", ours, ref, low)
    for name, g, r, lo in zip(("dq", "dk", "dv"), ours_g, ref_g, low_g):
        check(name, g, r, lo)
    return ours, ours_g, mask


@pytest.mark.parametrize("B,Lq,Lk,D,mode,dtype",
                         dtype_params(CASES, lambda B, Lq, Lk, D, mode: f"B{B}-{Lq}x{Lk}-D{D}-{mode}"))
def test_matches_reference(B, Lq, Lk, D, mode, dtype):
    ours, (dq, dk, dv), mask = compare_attention(B, Lq, Lk, 2, D, mode, dtype)
    if mode == "full" and B > 1:  # batch row 1 has no key at all: zeros, zero grads, no NaN
        assert torch.all(ours[1] == 0)
        assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0)


def test_strided_views_without_copies(monkeypatch):
    """q, k, v as views of a packed (B, L, 3, H, D) projection and of a (B, H, L, D) layout."""
    B, L, H, D = 2, 36, 2, 32
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE).requires_grad_(True)
    mask = random_padding_mask(B, L, gen).to(DEVICE)
    dout = torch.randn(B, L, H, D, generator=gen).to(DEVICE)

    seen = []
    real_forward = core.attention_forward

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr(), q.is_contiguous()))
        return real_forward(q, k, v, *args, **kwargs)

    monkeypatch.setattr(core, "attention_forward", spy)
    q, k, v = qkv.unbind(dim=2)
    out = lk.flash_attention(q, k, v, mask)
    out.backward(dout)
    itemsize = qkv.element_size()
    assert seen == [(qkv.data_ptr(), qkv.data_ptr() + H * D * itemsize, qkv.data_ptr() + 2 * H * D * itemsize,
                     False)], "kernel did not receive the views of qkv"

    ref_in = leaf(qkv, REF_DTYPE)
    ref = attention_ref(*ref_in.unbind(dim=2), mask, compute_dtype=REF_DTYPE)
    ref.backward(dout.to(REF_DTYPE))
    check("out", out, ref)
    check("dqkv", qkv.grad, ref_in.grad)

    # (B, H, L, D) storage seen through a transpose: other strides again
    q_bhld = torch.randn(B, H, L, D, generator=gen).to(DEVICE)
    out_t = lk.flash_attention(q_bhld.transpose(1, 2), k.detach(), v.detach(), mask)
    ref_t = attention_ref(q_bhld.transpose(1, 2), k.detach(), v.detach(), mask, compute_dtype=REF_DTYPE)
    check("out (transposed q)", out_t, ref_t)


def test_dropout_kept_fraction_and_mask_helper():
    """q = k = 0 gives uniform probabilities and v = identity exposes the kernel's keep mask:
    out[b, i, h, j] = keep[b, h, i, j] / ((1 - p) * Lk)."""
    B, Lq, Lk, H, D, p = 2, 64, 32, 2, 32, 0.25
    q = torch.zeros(B, Lq, H, D, device=DEVICE)
    k = torch.zeros(B, Lk, H, D, device=DEVICE)
    v = torch.eye(Lk, D, device=DEVICE)[None, :, None, :].expand(B, Lk, H, D)
    out = lk.flash_attention(q, k, v, dropout_p=p, seed=1234)
    keep_from_out = (out * (1 - p) * Lk).round().permute(0, 2, 1, 3)  # (B, H, Lq, Lk)
    assert set(keep_from_out.unique().tolist()) <= {0.0, 1.0}
    kept = keep_from_out.mean().item()
    n = keep_from_out.numel()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, kept
    helper = lk.attention_dropout_mask(1234, p, B, H, Lq, Lk, device=DEVICE)
    assert torch.equal(helper, keep_from_out.bool())


def test_dropout_gradients_match_reference_with_same_mask():
    B, Lq, Lk, H, D, p, seed = 2, 20, 36, 2, 32, 0.3, 77
    q, k, v, dout, mask = make_inputs(B, Lq, Lk, H, D, "full", seed=5)
    x = [t.to(DEVICE) for t in (q, k, v)]
    dout = dout.to(DEVICE)
    ours, ours_g = grads_of(lambda a, b, c: lk.flash_attention(a, b, c, mask, dropout_p=p, seed=seed),
                            [leaf(t) for t in x], dout)
    keep = lk.attention_dropout_mask(seed, p, B, H, Lq, Lk, device=DEVICE)
    ref, ref_g = grads_of(lambda a, b, c: attention_ref(a, b, c, mask, p, keep, compute_dtype=REF_DTYPE),
                          [leaf(t, REF_DTYPE) for t in x], dout)
    check("out", ours, ref)
    for name, g, r in zip(("dq", "dk", "dv"), ours_g, ref_g):
        check(name, g, r)

    # same seed: bitwise identical output and gradients; other seed: different output
    again, again_g = grads_of(lambda a, b, c: lk.flash_attention(a, b, c, mask, dropout_p=p, seed=seed),
                              [leaf(t) for t in x], dout)
    assert torch.equal(ours, again) and all(torch.equal(a, b) for a, b in zip(ours_g, again_g))
    other = lk.flash_attention(*x, mask, dropout_p=p, seed=seed + 1)
    assert not torch.equal(ours, other)

    # seed=None: drawn from torch's generator
    torch.manual_seed(11)
    a = lk.flash_attention(*x, mask, dropout_p=p)
    torch.manual_seed(11)
    b = lk.flash_attention(*x, mask, dropout_p=p)
    assert torch.equal(a, b)


def test_backward_is_deterministic():
    B, Lq, Lk, H, D = 1, 40, 36, 2, 32
    q, k, v, dout, mask = make_inputs(B, Lq, Lk, H, D, "pad", seed=9)
    x = [leaf(t.to(DEVICE)) for t in (q, k, v)]
    out = lk.flash_attention(*x, mask, dropout_p=0.1, seed=3)
    g1 = torch.autograd.grad(out, x, dout.to(DEVICE), retain_graph=True)
    g2 = torch.autograd.grad(out, x, dout.to(DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_input_errors(monkeypatch):
    q = torch.randn(1, 4, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="4-d"):
        lk.flash_attention(q[0], q, q)
    with pytest.raises(ValueError, match="power of two"):
        x = torch.randn(1, 4, 2, 48, device=DEVICE)
        lk.flash_attention(x, x, x)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        x = torch.randn(1, 4, 2, 32, device=DEVICE, dtype=torch.float64)
        lk.flash_attention(x, x, x)
    with pytest.raises(ValueError, match="bool"):
        lk.flash_attention(q, q, q, torch.ones(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="shape"):
        lk.flash_attention(q, q, q, torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        lk.flash_attention(q, q, q, dropout_p=1.0)
    # outside the interpreter, CPU tensors are refused with a reason
    monkeypatch.setattr(core, "INTERPRETED", False)
    with pytest.raises(ValueError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        lk.flash_attention(q.cpu(), q.cpu(), q.cpu())
