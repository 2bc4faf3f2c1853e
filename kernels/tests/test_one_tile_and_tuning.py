"""Kernels v2: the one-tile path (one launch per pass), the multi-launch path it leaves for long
sequences, the packed self-attention entry, and the tuning table / cache (the dropout masks:
test_dropout_masks.py)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

import lxmert_kernels as lk
from lxmert_kernels import _attention_core as core
from lxmert_kernels import tuning
from lxmert_kernels.reference import attention_ref, cross_attention_ref

from _helpers import (DEVICE, ON_GPU, REF_DTYPE, check, grads_of, kernel_class, leaf, random_padding_mask,
                      run_with_references)

PACKAGE_DIR = Path(lk.__file__).resolve().parent


@pytest.fixture
def launches(monkeypatch):
    """Count kernel launches by kernel name (interpreter or compiled)."""
    counts: dict = {}
    cls = kernel_class()
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
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


@pytest.mark.gpu
@pytest.mark.parametrize("L,masked", [(36, False), (47, True)])
def test_split_query_forward_and_one_tile_backward_share_the_dropout_mask(L, masked, monkeypatch):
    """At 33-64 tokens the forward runs one program per 32 queries (tuning.forward_query_block)
    while the backward keeps every query in one program: with dropout, the output and the packed
    gradient match the reference with the helper's mask (odd lengths, a fully masked row)."""
    assert tuning.forward_query_block(64, 64) == 32 and tuning.forward_query_block(32, 64) == 32
    assert tuning.forward_query_block(128, 128) == 128  # beyond 64 x 64: unmeasured, unchanged
    grids = {}
    cls = kernel_class()
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


@pytest.mark.gpu
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


def _check_bf16_attention(B, Lq, Lk, H=2, D=64):
    """flash_attention in bf16 against the reference, output and every gradient (padding; batch row 1
    fully masked)."""
    gen = torch.Generator().manual_seed(Lq)
    q, k, v = (torch.randn(B, n, H, D, generator=gen).to(DEVICE, torch.bfloat16) for n in (Lq, Lk, Lk))
    dout = torch.randn(B, Lq, H, D, generator=gen).to(DEVICE)
    mask = random_padding_mask(B, Lk, gen, fully_masked_rows=(1,) if B > 1 else ()).to(DEVICE)
    (ours, og), (ref, rg), (low, lg) = run_with_references(
        lambda a, b, c: lk.flash_attention(a, b, c, mask),
        lambda a, b, c, compute_dtype: attention_ref(a, b, c, mask, compute_dtype=compute_dtype), [q, k, v], dout)
    check("out", ours, ref, low)
    for name, g, r, lo in zip(("dq", "dk", "dv"), og, rg, lg):
        check(name, g, r, lo)


@pytest.mark.autotune
@pytest.mark.skipif(not ON_GPU, reason="autotuning needs a GPU")
def test_autotuned_configs_agree(tmp_path, monkeypatch):
    """The autotuned kernels (pruned candidates, cached in tmp_path) match the reference too, on the
    one-tile and the multi-launch paths and for the cross pair. It benchmarks every candidate: out of
    the default run, selected with -m autotune."""
    monkeypatch.setattr(tuning, "tuner", tuning.Autotuner())
    tuning.set_autotune(True, cache_dir=str(tmp_path))
    try:
        _check_bf16_attention(3, 20, 36)
        _check_bf16_attention(1, 200, 150)
        B, nl, nv, H, D = 4, 20, 36, 12, 64
        qkv = torch.randn(B, nl + nv, 3, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        out = lk.bidirectional_cross_attention(qkv, nl)
        out.float().sum().backward()
        ref = cross_attention_ref(qkv.detach(), nl, compute_dtype=REF_DTYPE)
        assert (out.float() - ref.float()).abs().max().item() < 3e-2
    finally:
        tuning.set_autotune(False)
    assert list(tmp_path.glob("autotune-*.json")), "the tuned configs were not cached on disk"


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
