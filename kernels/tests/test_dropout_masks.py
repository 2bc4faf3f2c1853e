"""The cheap dropout masks: Philox-4x32-7, one call per 4 elements (lxmert_kernels._dropout).

Our Philox against ``tl.philox``, the masks rebuilt element by element from ``tl.philox`` and their
documented counters, kept fractions and independence. The two helper kernels here are built for
sm_90 offline by test_compile_sm90.py (as every kernel a test module defines), so a kernel only the
interpreter accepts fails on CPU, not on the first GPU run.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import lxmert_kernels as lk
from lxmert_kernels import _dropout

from _helpers import DEVICE

pytestmark = pytest.mark.gpu


@triton.jit
def _philox_pair_kernel(SEED, OUT, N: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.arange(0, N)
    seed = tl.load(SEED)
    c0 = i.to(tl.uint32) * 7 + 3
    c1 = i.to(tl.uint32) * 13
    c2 = (i * 0 + 5).to(tl.uint32)
    c3 = (i * 0 + 1).to(tl.uint32)
    a = _dropout.philox4x32(seed, c0, c1, c2, c3, ROUNDS)
    b = tl.philox(seed, c0, c1, c2, c3, ROUNDS)
    for j in tl.static_range(4):
        tl.store(OUT + j * N + i, a[j])
        tl.store(OUT + (4 + j) * N + i, b[j])


@pytest.mark.parametrize("rounds", [_dropout.PHILOX_ROUNDS.value, 10])
def test_philox_is_tritons_philox(rounds):
    """Our wide-multiply Philox gives the words of tl.philox with the same rounds (seed above
    2**32 included), for the masks' 7 rounds and tl.philox's default 10."""
    out = torch.zeros(8, 16, dtype=torch.int32, device=DEVICE)
    seed = torch.tensor([(7 << 32) + 12345], dtype=torch.int64, device=DEVICE)
    _philox_pair_kernel[(1,)](seed, out, N=16, ROUNDS=rounds)
    assert torch.equal(out[:4], out[4:])
    assert out[:4].unique().numel() > 60


@triton.jit
def _philox_words_kernel(SEED, C_4N, OUT_4N, N: tl.constexpr, ROUNDS: tl.constexpr):
    i = tl.arange(0, N)
    seed = tl.load(SEED)
    # four loads written out: Triton's compiler takes no list comprehension in a kernel (the interpreter does)
    c0 = tl.load(C_4N + i).to(tl.uint32)
    c1 = tl.load(C_4N + N + i).to(tl.uint32)
    c2 = tl.load(C_4N + 2 * N + i).to(tl.uint32)
    c3 = tl.load(C_4N + 3 * N + i).to(tl.uint32)
    words = tl.philox(seed, c0, c1, c2, c3, ROUNDS)
    for j in tl.static_range(4):
        tl.store(OUT_4N + j * N + i, words[j])


def _attention_keep_from_tl_philox(seed, p, rows, cols, rounds):
    """The plain-attention keep mask of (batch, head) 0 rebuilt element by element from the
    documented counter (key // 2, 8 * (query // 16) + query % 8, 0, 0) and word
    2 * ((query // 8) % 2) + key % 2 of tl.philox with ``rounds`` rounds."""
    q = torch.arange(rows).repeat_interleave(cols)
    k = torch.arange(cols).repeat(rows)
    n = q.numel()
    counters = torch.stack([k // 2, 8 * (q // 16) + q % 8, torch.zeros_like(q), torch.zeros_like(q)])
    out = torch.zeros(4, n, dtype=torch.int32, device=DEVICE)
    _philox_words_kernel[(1,)](seed, counters.to(torch.int32).to(DEVICE).contiguous(), out, N=n, ROUNDS=rounds)
    word = out.cpu().gather(0, (2 * ((q // 8) % 2) + k % 2)[None]).squeeze(0).long() & 0xFFFFFFFF
    return (word >= int(p * 2 ** 32)).view(rows, cols)


def test_dropout_masks_use_seven_round_philox():
    """The masks are Philox-4x32-7 (flash-attention 2's dropout generator): the kernels' mask
    equals the one rebuilt from tl.philox(n_rounds=7) and its documented counters, and differs
    from the 10-round one."""
    assert _dropout.PHILOX_ROUNDS.value == 7
    seed = torch.tensor([(3 << 32) + 99], dtype=torch.int64, device=DEVICE)
    keep = lk.attention_dropout_mask(seed, 0.5, 1, 1, 32, 16, device=DEVICE)[0, 0].cpu()
    assert torch.equal(keep, _attention_keep_from_tl_philox(seed, 0.5, 32, 16, 7))
    assert not torch.equal(keep, _attention_keep_from_tl_philox(seed, 0.5, 32, 16, 10))


def test_dropout_keep_fraction_and_independence():
    """Attention and LayerNorm masks: kept fraction within 4 sigma of 1 - p for several p, and
    different (batch, head) planes / seeds are not copies of each other."""
    for p in (0.1, 0.5):
        keep = lk.attention_dropout_mask(21, p, 2, 2, 24, 64, device=DEVICE)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, p
        assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
        ln_keep = lk.layer_norm_dropout_mask(21, p, (30, 96), device=DEVICE)
        n = ln_keep.numel()
        assert abs(ln_keep.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, p
    a = lk.attention_dropout_mask(1, 0.5, 1, 1, 16, 64, device=DEVICE)
    assert not torch.equal(a, lk.attention_dropout_mask(2, 0.5, 1, 1, 16, 64, device=DEVICE))
    # the four columns of one LayerNorm Philox call are not copies of each other
    ln = lk.layer_norm_dropout_mask(1, 0.5, (16, 64), device=DEVICE)
    for j in (1, 2, 3):
        assert not torch.equal(ln[..., 0::4], ln[..., j::4])


def _agree_like_independent_coins(x, y, p):
    """x, y bool masks of the same shape agree as often as independent Bernoulli(1 - p) draws:
    p**2 + (1 - p)**2, within 4 sigma."""
    expected = p ** 2 + (1 - p) ** 2
    n = x.numel()
    rate = (x == y).float().mean().item()
    return abs(rate - expected) < 4 * (expected * (1 - expected) / n) ** 0.5


def test_attention_dropout_words_of_one_philox_call_are_independent():
    """One Philox call serves queries r, r + 8 (r % 16 < 8) x keys c, c + 1 (c even): each
    pair of its four elements agrees as independent coins would; the cross pair's two
    directions draw different streams (at n_lang == n_vis, with the same segment-relative
    indices); the language direction's block is plain attention's mask."""
    p = 0.5
    a = lk.attention_dropout_mask(3, p, 4, 4, 64, 64, device=DEVICE)
    top = a.view(4, 4, 4, 2, 8, 64)[:, :, :, 0]  # rows r with r % 16 < 8
    bottom = a.view(4, 4, 4, 2, 8, 64)[:, :, :, 1]  # rows r + 8
    assert _agree_like_independent_coins(a[..., 0::2], a[..., 1::2], p)
    assert _agree_like_independent_coins(top, bottom, p)
    assert _agree_like_independent_coins(top[..., 0::2], bottom[..., 1::2], p)
    # neighbouring calls (keys c and c + 2, rows r and r + 1) are independent too
    assert _agree_like_independent_coins(a[..., 0::4], a[..., 2::4], p)
    assert _agree_like_independent_coins(a[:, :, 0::2], a[:, :, 1::2], p)

    n = 32
    cross = lk.cross_attention_dropout_mask(3, p, 4, 4, 2 * n, device=DEVICE, n_lang=n)
    lang_to_vis, vis_to_lang = cross[..., :n, n:], cross[..., n:, :n]
    assert _agree_like_independent_coins(lang_to_vis, vis_to_lang, p)
    assert torch.equal(lang_to_vis, lk.attention_dropout_mask(3, p, 4, 4, n, n, device=DEVICE))
    assert cross[..., :n, :n].all() and cross[..., n:, n:].all()
