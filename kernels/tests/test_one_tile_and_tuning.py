"""Kernels v2: the one-tile path (one launch per pass), the multi-launch path it leaves for long
sequences, the packed self-attention entry, cheap dropout, and the tuning table / cache."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import lxmert_kernels as lk
from lxmert_kernels import _attention_core as core
from lxmert_kernels import _dropout, tuning
from lxmert_kernels.reference import attention_ref, cross_attention_ref

from _helpers import DEVICE, ON_GPU, REF_DTYPE, check, grads_of, leaf, random_padding_mask

PACKAGE_DIR = Path(lk.__file__).resolve().parent


@pytest.fixture
def launches(monkeypatch):
    """Count kernel launches by kernel name (interpreter or compiled)."""
    counts: dict = {}
    if ON_GPU:
        from triton.runtime.jit import JITFunction as cls
    else:
        from triton.runtime.interpreter import InterpretedFunction as cls
    real_run = cls.run

    def run(self, *args, **kwargs):
        counts[self.__name__] = counts.get(self.__name__, 0) + 1
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return counts


def _cross_inputs(B, nl, nv, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = nl + nv
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE)
    dout = torch.randn(B, L, H, D, generator=gen).to(DEVICE)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, :nl] = torch.arange(nl)[None, :] < torch.randint(1, nl + 1, (B, 1), generator=gen)
    if B > 1:
        mask[1, :nl] = False  # vision -> language fully masked for batch row 1
    return qkv, dout, mask.to(DEVICE)


def test_cross_pair_is_one_launch_forward_and_one_backward_at_20_36(launches):
    """LXMERT's 20 words + 36 objects: forward one launch, backward one launch (delta, dQ, dK,
    dV inside), both directions together."""
    qkv, dout, mask = _cross_inputs(2, 20, 36, 1, 16)
    x = leaf(qkv)
    out = lk.bidirectional_cross_attention(x, 20, mask, dropout_p=0.1, seed=4)
    assert launches == {"_attn_fwd_one_tile_kernel": 1}
    launches.clear()
    out.backward(dout)
    assert launches == {"_attn_bwd_one_tile_kernel": 1}


def test_long_sequences_take_the_multi_launch_path(launches):
    """A direction longer than one tile: forward, then delta + dK/dV + dQ (three launches)."""
    B, Lq, Lk, H, D = 1, 150, 9, 1, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, H, D, generator=gen).to(DEVICE) for n in (Lq, Lk, Lk))
    dout = torch.randn(B, Lq, H, D, generator=gen).to(DEVICE)
    mask = random_padding_mask(B, Lk, gen).to(DEVICE)
    assert not core.uses_one_tile(Lq, Lk, D)
    ours, g = grads_of(lambda a, b, c: lk.flash_attention(a, b, c, mask), [leaf(t) for t in (q, k, v)], dout)
    assert launches == {"_attn_fwd_kernel": 1, "_attn_bwd_preprocess_kernel": 1, "_attn_bwd_dkdv_kernel": 1,
                        "_attn_bwd_dq_kernel": 1}
    ref, rg = grads_of(lambda a, b, c: attention_ref(a, b, c, mask, compute_dtype=REF_DTYPE),
                       [leaf(t, REF_DTYPE) for t in (q, k, v)], dout)
    check("out", ours, ref)
    for name, a, r in zip(("dq", "dk", "dv"), g, rg):
        check(name, a, r)


@pytest.mark.parametrize("nl,nv", [(20, 36), (7, 33)])
def test_one_tile_and_multi_launch_paths_agree_with_the_same_dropout_mask(nl, nv, monkeypatch):
    """Both paths against the reference with dropout: the mask does not depend on the tiles, so
    the one-tile and the multi-launch kernels drop the same elements for a seed."""
    B, H, D, p, seed = 2, 1, 16, 0.2, 11
    qkv, dout, mask = _cross_inputs(B, nl, nv, H, D, seed=3)
    keep = lk.cross_attention_dropout_mask(seed, p, B, H, nl + nv, device=DEVICE, n_lang=nl)
    ref, (rg,) = grads_of(lambda x: cross_attention_ref(x, nl, mask, p, keep, compute_dtype=REF_DTYPE),
                          [leaf(qkv, REF_DTYPE)], dout)
    fn = lambda x: lk.bidirectional_cross_attention(x, nl, mask, dropout_p=p, seed=seed)  # noqa: E731
    one, (g_one,) = grads_of(fn, [leaf(qkv)], dout)
    monkeypatch.setattr(core, "ONE_TILE_MAX", 0)  # force the multi-launch kernels
    multi, (g_multi,) = grads_of(fn, [leaf(qkv)], dout)
    for name, out, g in (("one-tile", one, g_one), ("multi-launch", multi, g_multi)):
        check(f"{name} out", out, ref)
        check(f"{name} dqkv", g, rg)


@pytest.mark.parametrize("B,L,H,D,masked", [(2, 20, 2, 32, True), (1, 36, 3, 16, False), (2, 13, 1, 64, True)])
def test_flash_attention_qkv_matches_reference_with_one_gradient(B, L, H, D, masked, launches):
    gen = torch.Generator().manual_seed(L)
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE)
    dout = torch.randn(B, L, H, D, generator=gen).to(DEVICE)
    mask = random_padding_mask(B, L, gen, fully_masked_rows=(1,) if B > 1 else ()).to(DEVICE) if masked else None
    ours, (g,) = grads_of(lambda x: lk.flash_attention_qkv(x, mask), [leaf(qkv)], dout)
    assert g.shape == qkv.shape and g.is_contiguous()
    assert launches == {"_attn_fwd_one_tile_kernel": 1, "_attn_bwd_one_tile_kernel": 1}
    ref, (rg,) = grads_of(lambda x: attention_ref(*x.unbind(2), mask, compute_dtype=REF_DTYPE),
                          [leaf(qkv, REF_DTYPE)], dout)
    check("out", ours, ref)
    check("dqkv", g, rg)
    # same seed: the packed entry drops what flash_attention on the views drops
    a = lk.flash_attention_qkv(qkv, mask, dropout_p=0.3, seed=5)
    b = lk.flash_attention(*qkv.unbind(2), mask, dropout_p=0.3, seed=5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("L,masked", [(36, False), (47, True)])
def test_split_query_forward_and_one_tile_backward_share_the_dropout_mask(L, masked, monkeypatch):
    """At 33-64 tokens the forward runs one program per 32 queries (tuning.forward_query_block)
    while the backward keeps every query in one program: with dropout, the output and the packed
    gradient match the reference with the helper's mask (odd lengths, a fully masked row)."""
    assert tuning.forward_query_block(64, 64) == 32 and tuning.forward_query_block(32, 64) == 32
    assert tuning.forward_query_block(128, 128) == 128  # beyond 64 x 64: unmeasured, unchanged
    grids = {}
    if ON_GPU:
        from triton.runtime.jit import JITFunction as cls
    else:
        from triton.runtime.interpreter import InterpretedFunction as cls
    real_run = cls.run

    def run(self, *args, grid, **kwargs):
        grids.setdefault(self.__name__, []).append(tuple(grid))
        return real_run(self, *args, grid=grid, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    B, H, D, p, seed = 2, 2, 16, 0.3, 11
    gen = torch.Generator().manual_seed(L)
    qkv = torch.randn(B, L, 3, H, D, generator=gen).to(DEVICE)
    dout = torch.randn(B, L, H, D, generator=gen).to(DEVICE)
    mask = random_padding_mask(B, L, gen, fully_masked_rows=(1,)).to(DEVICE) if masked else None
    ours, (g,) = grads_of(lambda x: lk.flash_attention_qkv(x, mask, dropout_p=p, seed=seed), [leaf(qkv)], dout)
    assert grids == {"_attn_fwd_one_tile_kernel": [(B * H, 2)], "_attn_bwd_one_tile_kernel": [(B * H, 1)]}
    keep = lk.attention_dropout_mask(seed, p, B, H, L, L, device=DEVICE)
    ref, (rg,) = grads_of(lambda x: attention_ref(*x.unbind(2), mask, p, keep, compute_dtype=REF_DTYPE),
                          [leaf(qkv, REF_DTYPE)], dout)
    check("out", ours, ref)
    check("dqkv", g, rg)


def test_opcheck_flash_attention_qkv():
    fa = importlib.import_module("lxmert_kernels.flash_attention")
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3, 2, 16, generator=gen).to(DEVICE).requires_grad_(True)
    mask = (torch.rand(2, 7, generator=gen) > 0.3).to(DEVICE)
    seed = torch.tensor([3], device=DEVICE)
    torch.library.opcheck(fa.flash_attention_qkv_fwd, (qkv, mask, seed, 0.2, 0.25))
    o, lse = fa.flash_attention_qkv_fwd(qkv, mask, seed, 0.2, 0.25)
    do = torch.randn(2, 7, 2, 16, generator=gen).to(DEVICE)
    torch.library.opcheck(fa.flash_attention_qkv_bwd, (do, qkv.detach(), o.detach(), lse.detach(), mask, seed,
                                                       0.2, 0.25))


# ----------------------------------------------------------------------------------------------
# cheap dropout
# ----------------------------------------------------------------------------------------------
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
    c = [tl.load(C_4N + j * N + i).to(tl.uint32) for j in tl.static_range(4)]
    words = tl.philox(seed, c[0], c[1], c[2], c[3], ROUNDS)
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


# ----------------------------------------------------------------------------------------------
# tuning: heuristics table by default, opt-in autotuning cached on disk
# ----------------------------------------------------------------------------------------------
def test_heuristics_table_covers_the_lxmert_shapes():
    for kernel in ("fwd_one_tile", "bwd_one_tile"):
        for lq, lk_ in ((20, 36), (36, 20), (20, 20), (36, 36), (128, 64)):
            for dtype in ("bfloat16", "float16", "float32"):
                cfg = tuning.heuristic(kernel, 90, lq, lk_, 64, dtype, True)
                assert set(cfg) == {"num_warps", "num_stages"}
    for kernel in ("fwd", "dkdv", "dq"):
        cfg = tuning.heuristic(kernel, 90, 512, 512, 128, "bfloat16", False)
        assert {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} <= set(cfg)
    with pytest.raises(ValueError, match="no heuristic row"):
        tuning.heuristic("fwd_one_tile", 90, 256, 256, 64, "bfloat16", False)


def test_autotuner_picks_the_fastest_and_caches_it_across_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "settings", tuning.Settings(autotune=True, cache_dir=str(tmp_path)))
    timings = {2: 3.0, 4: 1.0, 8: 2.0}
    calls = []

    def fake_bench(fn):
        fn()
        return timings[calls[-1]["num_warps"]]

    first = tuning.Autotuner(bench=fake_bench)
    cfgs = tuning.candidates("fwd_one_tile", 20, 30, 64)
    assert {c["num_warps"] for c in cfgs} == {2, 4, 8}
    best = first.choose("k1", cfgs, launch=calls.append)
    assert best["num_warps"] == 4 and len(calls) == len(cfgs)
    saved = json.loads(next(tmp_path.glob("autotune-*.json")).read_text())
    assert saved["k1"] == best
    # a new process: reads the file, benchmarks nothing
    second = tuning.Autotuner(bench=lambda fn: pytest.fail("benchmarked a cached key"))
    assert second.choose("k1", cfgs, launch=calls.append) == best
    # pruned multi-block candidates: no block larger than the bucketed lengths need
    for c in tuning.candidates("fwd", 20, 36, 64):
        assert c["BLOCK_M"] <= 32 and c["BLOCK_N"] <= 64


def test_autotune_is_a_module_setting_not_an_environment_variable(monkeypatch):
    sources = "".join(p.read_text() for p in PACKAGE_DIR.glob("*.py"))
    assert sources.count("os.environ") == 1  # _common.interpret_requested: TRITON_INTERPRET only
    assert "LXMERT_KERNELS_AUTOTUNE" not in sources
    assert tuning.settings.autotune is False
    if not ON_GPU:
        monkeypatch.setattr(tuning, "settings", tuning.Settings(autotune=True))
        q = torch.randn(1, 4, 1, 16, device=DEVICE)
        with pytest.raises(ValueError, match="autotuning needs a GPU"):
            lk.flash_attention(q, q, q)
