"""bidirectional_cross_attention: both directions from one packed projection, one launch."""
from __future__ import annotations

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels import _attention_core as core
from lxmert_kernels.reference import cross_attention_ref

from _helpers import BF16, DEVICE, F16, F32, REF_DTYPE, check, dtype_params, grads_of, leaf, run_with_references

pytestmark = pytest.mark.gpu

# (B, n_lang, n_vis, D, mask mode, dtypes): the first dtype on CPU, each on a GPU (_helpers.dtype_params):
# each case in its own dtype, LXMERT's 20 + 36 at D=64 also in bf16 on a GPU (test_flash_attention.py says why)
# "lang_pad": random language lengths (vision unmasked, as in LXMERT);
# "dir_full": additionally batch row 1 has no language token kept -> vision->lang is fully masked
CASES = [
    (3, 20, 36, 64, "dir_full", (F32, BF16)),
    (2, 7, 33, 32, "lang_pad", (F32,)),
    (1, 20, 36, 32, "none", (F32,)),
    (3, 7, 33, 64, "dir_full", (F16,)),
    (2, 20, 36, 32, "lang_pad", (BF16,)),
]


def make_inputs(B, nl, nv, H, D, mode, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = nl + nv
    qkv = torch.randn(B, L, 3, H, D, generator=gen)
    dout = torch.randn(B, L, H, D, generator=gen)
    mask = None
    if mode != "none":
        lengths = torch.randint(1, nl + 1, (B,), generator=gen)
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, :nl] = torch.arange(nl)[None, :] < lengths[:, None]
        if mode == "dir_full":
            mask[1, :nl] = False
        mask = mask.to(DEVICE)
    return qkv, dout, mask


@pytest.mark.parametrize("B,nl,nv,D,mode,dtype",
                         dtype_params(CASES, lambda B, nl, nv, D, mode: f"B{B}-{nl}+{nv}-D{D}-{mode}"))
def test_matches_reference(B, nl, nv, D, mode, dtype):
    H = 2
    qkv, dout, mask = make_inputs(B, nl, nv, H, D, mode)
    qkv = qkv.to(DEVICE, dtype)
    dout = dout.to(DEVICE)
    (ours, (g,)), (ref, (rg,)), (low, (lg,)) = run_with_references(
        lambda x: lk.bidirectional_cross_attention(x, nl, mask),
        lambda x, compute_dtype: cross_attention_ref(x, nl, mask, compute_dtype=compute_dtype), [qkv], dout)
    assert ours.shape == (B, nl + nv, H, D) and ours.dtype == dtype and g.shape == qkv.shape
    check("out", ours, ref, low)
    for i, name in enumerate(("dq", "dk", "dv")):
        check(name, g[:, :, i], rg[:, :, i], None if lg is None else lg[:, :, i])
    if mode == "dir_full":
        # vision queries of batch row 1 see no key: zeros out, zero grads; the language keys of
        # that row are masked so they receive no gradient either
        assert torch.all(ours[1, nl:] == 0)
        assert torch.all(g[1, nl:, 0] == 0) and torch.all(g[1, :nl, 1:] == 0)


def test_one_launch_per_phase_and_dqkv_layout(monkeypatch):
    calls = {"fwd": 0, "bwd": 0}
    real_f, real_b = core.attention_forward, core.attention_backward

    def spy_f(*a, **k):
        calls["fwd"] += 1
        assert k["two_segments"] is True
        return real_f(*a, **k)

    def spy_b(*a, **k):
        calls["bwd"] += 1
        assert k["two_segments"] is True
        return real_b(*a, **k)

    monkeypatch.setattr(core, "attention_forward", spy_f)
    monkeypatch.setattr(core, "attention_backward", spy_b)
    B, nl, nv, H, D = 1, 7, 9, 2, 32
    qkv, dout, mask = make_inputs(B, nl, nv, H, D, "lang_pad", seed=4)
    x = leaf(qkv.to(DEVICE))
    out = lk.bidirectional_cross_attention(x, nl, mask)
    out.backward(dout.to(DEVICE))
    assert calls == {"fwd": 1, "bwd": 1}
    assert x.grad.shape == (B, nl + nv, 3, H, D)


def test_edge_segments_and_views():
    """n_lang = 0 leaves only vision queries with no key (zeros); a strided qkv view works."""
    B, L, H, D = 1, 9, 2, 32
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE)
    out = lk.bidirectional_cross_attention(qkv, 0)
    assert torch.all(out == 0)
    big = torch.randn(B, L, 3, H, 2 * D, generator=gen).to(DEVICE)
    view = big[..., :D]  # non-contiguous head dim slices
    out = lk.bidirectional_cross_attention(view, 4)
    check("out (strided view)", out, cross_attention_ref(view, 4, compute_dtype=REF_DTYPE))


def test_dropout_same_mask_and_determinism():
    B, nl, nv, H, D, p, seed = 2, 7, 33, 2, 32, 0.2, 99
    qkv, dout, mask = make_inputs(B, nl, nv, H, D, "lang_pad", seed=6)
    qkv, dout = qkv.to(DEVICE), dout.to(DEVICE)
    f = lambda x: lk.bidirectional_cross_attention(x, nl, mask, dropout_p=p, seed=seed)  # noqa: E731
    ours, (g,) = grads_of(f, [leaf(qkv)], dout)
    keep = lk.cross_attention_dropout_mask(seed, p, B, H, nl + nv, device=DEVICE, n_lang=nl)
    ref, (rg,) = grads_of(lambda x: cross_attention_ref(x, nl, mask, p, keep, compute_dtype=REF_DTYPE),
                          [leaf(qkv, REF_DTYPE)], dout)
    check("out", ours, ref)
    check("dqkv", g, rg)
    again, (g2,) = grads_of(f, [leaf(qkv)], dout)
    assert torch.equal(ours, again) and torch.equal(g, g2)
    assert not torch.equal(ours, lk.bidirectional_cross_attention(qkv, nl, mask, dropout_p=p, seed=seed + 1))


def test_input_errors():
    qkv = torch.randn(1, 8, 3, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(B, L, 3, H, D\)"):
        lk.bidirectional_cross_attention(qkv[:, :, 0], 3)
    with pytest.raises(ValueError, match="n_lang"):
        lk.bidirectional_cross_attention(qkv, 9)
    with pytest.raises(ValueError, match="shape"):
        lk.bidirectional_cross_attention(qkv, 3, torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
