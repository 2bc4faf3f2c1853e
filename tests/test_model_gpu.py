"""On a GPU: the base model with the `triton` backend and fused kernels against `eager` in bf16 (LXMERT's
training dtype), forward losses and every gradient (skipped without CUDA: the interpreter cannot run the base
model in reasonable time). Part of the `gpu` selection: `python -m pytest -m gpu`.

One dtype: another would add compilations (a GPU run's main cost: 16 kernel specialisations per dtype here),
not code paths. fp32 is checked at the model level by tests/test_triton_backend.py (a tiny model, compiled on
CUDA too), and by the kernel tests at D=64: fp32 at 20 x 36, 64 x 64 and the 20 + 36 cross pair, fp16 at
64 x 64 and a 7 + 33 cross pair.

Reference: eager in fp32 with TF32 off. The triton model's relative error (norm of the difference / norm of
the reference) is at most 2x that of PyTorch doing the same in that dtype, plus a small floor, for the loss,
each loss term and each parameter's gradient; NaN / inf never pass.
"""
from __future__ import annotations

import pytest
import torch

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from tests.helpers import no_dropout, random_batch, random_labels, to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = no_dropout(LxmertConfig.preset("base"))
BATCH, TOKENS, OBJECTS = 8, 20, 36


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _run(model: LxmertForPreTraining, inputs: dict, labels: dict, dtype: torch.dtype):
    model.zero_grad(set_to_none=True)
    cast = dict(inputs)
    cast["visual_feats"] = inputs["visual_feats"].to(dtype)
    cast["visual_pos"] = inputs["visual_pos"].to(dtype)
    out = model(**cast, **labels)
    out.loss.backward()
    losses = {"loss": out.loss.detach().float(), **{k: v.detach().float() for k, v in out.losses.items()}}
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.fixture(scope="module")
def setup():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    with torch.device("cuda"):
        eager = LxmertForPreTraining(CONFIG.replace(attention_backend="eager")).train()
        fast = LxmertForPreTraining(CONFIG.replace(attention_backend="triton", kernels="triton")).train()
    fast.load_state_dict(eager.state_dict())
    lengths = [TOKENS - (3 * i) % 14 for i in range(BATCH)]
    inputs = random_batch(CONFIG, batch=BATCH, tokens=TOKENS, objects=OBJECTS, lengths=lengths, generator=g)
    labels = random_labels(CONFIG, inputs, generator=g)
    inputs, labels = to_device(inputs, "cuda"), to_device(labels, "cuda")
    ref = _run(eager, inputs, labels, torch.float32)
    yield eager, fast, inputs, labels, ref
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _finite(losses, grads, what):
    for k, v in losses.items():
        assert torch.isfinite(v).all(), f"{what}: loss {k} not finite"
    for k, v in grads.items():
        assert torch.isfinite(v).all(), f"{what}: grad {k} not finite"


def test_triton_error_at_most_twice_pytorchs_in_bf16(setup):
    """PyTorch's own run in bf16 is the yardstick: eager with bf16 weights and activations."""
    dtype = torch.bfloat16
    eager, fast, inputs, labels, (ref_l, ref_g) = setup
    eager_lp = LxmertForPreTraining(CONFIG.replace(attention_backend="eager")).to("cuda").train()
    eager_lp.load_state_dict(eager.state_dict())
    eager_lp.to(dtype)
    fast.load_state_dict(eager.state_dict())
    fast.to(dtype)
    try:
        e_l, e_g = _run(eager_lp, inputs, labels, dtype)
        f_l, f_g = _run(fast, inputs, labels, dtype)
    finally:
        fast.float()
        del eager_lp
        torch.cuda.empty_cache()
    _finite(f_l, f_g, f"triton {dtype}")
    floor = 1e-3
    bad = []
    for k in ref_l:
        ef, ee = _rel(f_l[k], ref_l[k]), _rel(e_l[k], ref_l[k])
        if ef > 2 * ee + floor:
            bad.append(f"loss {k}: triton {ef:.2e} vs eager {ee:.2e}")
    for n in ref_g:
        if ref_g[n].norm() == 0:
            continue
        ef, ee = _rel(f_g[n], ref_g[n]), _rel(e_g[n], ref_g[n])
        if ef > 2 * ee + floor:
            bad.append(f"grad {n}: triton {ef:.2e} vs eager {ee:.2e}")
    assert not bad, f"bf16: {len(bad)} values beyond 2x PyTorch's error: " + "; ".join(bad[:10])
