"""The kernels as torch custom ops: opcheck, torch.compile without graph breaks, device seeds.

Every op is registered as ``lxmert_kernels::<op>_fwd`` / ``<op>_bwd`` (torch.library.custom_op
with fake impls and an autograd rule), and the dropout seed is a device tensor the kernels read:
nothing on the call path of forward or backward reads a value back to the host.
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from torch._dynamo.utils import counters

import lxmert_kernels as lk
from lxmert_kernels import _common

from _helpers import DEVICE, ON_GPU, check, leaf

pytestmark = pytest.mark.gpu

# the package re-exports functions named like their modules: import the modules themselves
fa = importlib.import_module("lxmert_kernels.flash_attention")
ca = importlib.import_module("lxmert_kernels.cross_attention")
ln = importlib.import_module("lxmert_kernels.layer_norm")
ge = importlib.import_module("lxmert_kernels.gelu")

OPS = ("flash_attention", "flash_attention_qkv", "cross_attention", "layer_norm", "bias_gelu")


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _opcheck(op, args):
    results = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_every_op_is_registered_under_the_namespace():
    names = {f"{op}_{kind}" for op in OPS for kind in ("fwd", "bwd")}
    assert names <= set(dir(torch.ops.lxmert_kernels)), names - set(dir(torch.ops.lxmert_kernels))


@pytest.mark.parametrize("masked_dropout", [True, False], ids=["mask+dropout", "plain"])
def test_opcheck_attention(masked_dropout):
    gen = torch.Generator().manual_seed(0)
    B, Lq, Lk, H, D = 2, 5, 7, 2, 16
    q = _rand(gen, B, Lq, H, D).requires_grad_(True)
    k = _rand(gen, B, Lk, H, D).requires_grad_(True)
    v = _rand(gen, B, Lk, H, D).requires_grad_(True)
    mask = (torch.rand(B, Lk, generator=gen) > 0.3).to(DEVICE) if masked_dropout else None
    seed, p = (_seed(7), 0.25) if masked_dropout else (None, 0.0)
    _opcheck(fa.flash_attention_fwd, (q, k, v, mask, seed, p, 0.25))
    o, lse = fa.flash_attention_fwd(q, k, v, mask, seed, p, 0.25)
    do = _rand(gen, B, Lq, H, D)
    _opcheck(fa.flash_attention_bwd, (do, q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), mask, seed, p, 0.25))

    L, n_lang = 9, 4
    qkv = _rand(gen, B, L, 3, H, D).requires_grad_(True)
    mask = (torch.rand(B, L, generator=gen) > 0.3).to(DEVICE) if masked_dropout else None
    _opcheck(ca.cross_attention_fwd, (qkv, n_lang, mask, seed, p, 0.25))
    o, lse = ca.cross_attention_fwd(qkv, n_lang, mask, seed, p, 0.25)
    do = _rand(gen, B, L, H, D)
    _opcheck(ca.cross_attention_bwd, (do, qkv.detach(), o.detach(), lse.detach(), n_lang, mask, seed, p, 0.25))


@pytest.mark.parametrize("residual_dropout", [True, False], ids=["residual+dropout", "plain"])
def test_opcheck_layer_norm_and_gelu(residual_dropout):
    gen = torch.Generator().manual_seed(1)
    shape, N = (3, 5, 24), 24
    x = _rand(gen, *shape).requires_grad_(True)
    w = (1 + 0.1 * _rand(gen, N)).requires_grad_(True)
    b = _rand(gen, N).requires_grad_(True)
    r = _rand(gen, *shape).requires_grad_(True) if residual_dropout else None
    seed, p = (_seed(3), 0.2) if residual_dropout else (None, 0.0)
    _opcheck(ln.layer_norm_fwd, (x, w, b, r, seed, 1e-12, p))
    _, mean, rstd = ln.layer_norm_fwd(x, w, b, r, seed, 1e-12, p)
    dy = _rand(gen, *shape)
    _opcheck(ln.layer_norm_bwd, (dy, x.detach(), w.detach(), b.detach(), None if r is None else r.detach(),
                                 mean.detach(), rstd.detach(), seed, p))
    if residual_dropout:
        return
    xg = _rand(gen, 3, 5, 40).requires_grad_(True)
    bg = _rand(gen, 40).requires_grad_(True)
    _opcheck(ge.bias_gelu_fwd, (xg, bg))
    _opcheck(ge.bias_gelu_bwd, (_rand(gen, 3, 5, 40), xg.detach(), bg.detach()))


def _all_ops(q, k, v, mask, qkv, x, w, b, r, xg, bg, p=0.2, seed=None):
    """Every public op with dropout where it has one, reduced to one scalar."""
    o = lk.flash_attention(q, k, v, mask, dropout_p=p, seed=seed)
    c = lk.bidirectional_cross_attention(qkv, 3, dropout_p=p, seed=seed)
    c = c + lk.flash_attention_qkv(qkv, dropout_p=p, seed=seed)
    y = lk.layer_norm(x, w, b, 1e-12, r, dropout_p=p, seed=seed)
    z = lk.bias_gelu(xg, bg)
    return (o * o).sum() + c.sum() + (y * y).sum() + z.sum()


def _all_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    B, Lq, Lk, H, D = 2, 5, 7, 2, 16
    mask = (torch.arange(Lk)[None, :] < torch.tensor([[7], [4]])).to(DEVICE)
    leaves = [_rand(gen, *s) for s in ((B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D))]
    leaves += [_rand(gen, B, 8, 3, H, D), _rand(gen, 3, 5, 24), 1 + 0.1 * _rand(gen, 24), _rand(gen, 24),
               _rand(gen, 3, 5, 24), _rand(gen, 3, 5, 40), _rand(gen, 40)]
    leaves = [leaf(t) for t in leaves]
    return leaves[:3] + [mask] + leaves[3:], leaves


def test_compile_fullgraph_forward_backward_matches_eager():
    """torch.compile(fullgraph=True) of the public API: one graph, no break, no recompile on a
    second call with other data, and (with inductor's RNG falling back to torch's) the same
    dropout masks, output and gradients as eager for the same torch.manual_seed. (torch's config
    patches, not pytest's monkeypatch: its undo leaves torch's config modules without the setting.)"""
    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, fullgraph=True)
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):
            args_c, leaves_c = _all_inputs(step)
            torch.manual_seed(100 + step)
            out_c = compiled(*args_c)
            out_c.backward()
            args_e, leaves_e = _all_inputs(step)
            torch.manual_seed(100 + step)
            out_e = _all_ops(*args_e)
            out_e.backward()
            check("out", out_c, out_e.detach())
            for i, (a, e) in enumerate(zip(leaves_c, leaves_e)):
                check(f"grad {i}", a.grad, e.grad)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


@contextlib.contextmanager
def _host_reads_raise(monkeypatch):
    """Make every device -> host read of a tensor value raise."""
    def refuse(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name} called on the kernels' call path")
        return raise_

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse(name))
        m.setattr(torch, "nonzero", refuse("nonzero"))
        yield


def test_no_host_read_in_forward_or_backward(monkeypatch):
    """seed=None draws the seed on the device; no .item()/.tolist()/bool()/nonzero anywhere on
    the call path of any op's forward and backward, with dropout on."""
    args, leaves = _all_inputs(5)
    with _host_reads_raise(monkeypatch):
        out = _all_ops(*args)
        out.backward()
    assert all(t.grad is not None for t in leaves)


def test_seed_contract():
    """seed=None follows torch.manual_seed; int and int64-tensor seeds give the same mask; the
    seed tensor is validated; the mask helpers take either."""
    gen = torch.Generator().manual_seed(2)
    x = _rand(gen, 4, 64)
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    torch.manual_seed(9)
    a = lk.layer_norm(x, w, b, dropout_p=0.3)
    torch.manual_seed(9)
    assert torch.equal(a, lk.layer_norm(x, w, b, dropout_p=0.3))
    assert not torch.equal(a, lk.layer_norm(x, w, b, dropout_p=0.3))  # the generator advanced
    by_int = lk.layer_norm(x, w, b, dropout_p=0.3, seed=1234)
    assert torch.equal(by_int, lk.layer_norm(x, w, b, dropout_p=0.3, seed=_seed(1234)))
    assert torch.equal(lk.layer_norm_dropout_mask(1234, 0.3, (4, 64), device=DEVICE),
                       lk.layer_norm_dropout_mask(_seed(1234), 0.3, (4, 64), device=DEVICE))
    q = _rand(gen, 1, 3, 2, 16)
    assert torch.equal(lk.attention_dropout_mask(5, 0.5, 1, 2, 3, 3, device=DEVICE),
                       lk.attention_dropout_mask(_seed(5), 0.5, 1, 2, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="int64 with shape"):
        lk.flash_attention(q, q, q, dropout_p=0.1, seed=torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="int64 with shape"):
        lk.flash_attention(q, q, q, dropout_p=0.1, seed=torch.tensor([1.0], device=DEVICE))
    with pytest.raises(ValueError, match="non-negative"):
        lk.flash_attention(q, q, q, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="seed must be"):
        lk.flash_attention(q, q, q, dropout_p=0.1, seed="7")


def test_an_int_seed_is_refused_while_a_cuda_graph_is_captured(monkeypatch):
    """An int seed becomes a host-to-device copy, which CUDA-graph capture cannot record: while the
    current stream captures, it is refused with the reason (no obscure capture error later); a seed
    tensor is used as is, and off CUDA there is nothing to capture."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for call in (lambda: _common.as_seed_tensor(5, "cuda"), lambda: _common.seed_tensor(5, 0.1, torch.device("cuda"))):
        with pytest.raises(ValueError, match="CUDA-graph capture cannot record"):
            call()
    seed = _seed(5)
    assert _common.as_seed_tensor(seed, DEVICE) is seed
    assert _common.seed_tensor(5, 0.0, torch.device("cuda")) is None  # no dropout, no seed
    assert _common.as_seed_tensor(5, "cpu").tolist() == [5]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _common.as_seed_tensor(5, "cpu").tolist() == [5]


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA (a CUDA graph)")
def test_dropout_ops_in_a_captured_cuda_graph():
    """On a GPU: inside torch.cuda.graph an int seed is refused with the reason, and seed=None (drawn
    on the device) is captured: each replay draws a new seed, so a new mask."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = _rand(gen, 4, 64), 1 + 0.1 * _rand(gen, 64), _rand(gen, 64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        lk.layer_norm(x, w, b, dropout_p=0.3)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with pytest.raises(ValueError, match="CUDA-graph capture cannot record"):
            lk.layer_norm(x, w, b, dropout_p=0.3, seed=5)
        y = lk.layer_norm(x, w, b, dropout_p=0.3)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, y)
