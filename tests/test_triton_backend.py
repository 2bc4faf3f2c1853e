"""The whole model with the `triton` backend and fused kernels matches `eager`: on CUDA when the machine has it
(compiled kernels), else on the CPU in Triton's interpreter (tests/conftest.py). The tests that run the kernels
are the `gpu` marker's."""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import AttentionBackendError, LxmertConfig, LxmertForPreTraining
from lxmert_fast.model.attention import AttentionDispatcher
from tests.helpers import (assert_close_scaled, kernel_device, no_dropout, random_batch, random_labels,
                           to_device)

# head_dim 32: a size the kernels serve; one layer of each kind keeps the interpreter quick.
CONFIG = no_dropout(LxmertConfig.preset("tiny", hidden_size=64, num_attention_heads=2, intermediate_size=96,
                                        l_layers=1, x_layers=1, r_layers=1))


@pytest.mark.gpu
def test_model_with_triton_attention_and_kernels_matches_eager():
    device = kernel_device()
    torch.manual_seed(3)
    eager = LxmertForPreTraining(CONFIG.replace(attention_backend="eager")).to(device)
    fast = LxmertForPreTraining(CONFIG.replace(attention_backend="triton", kernels="triton")).to(device)
    fast.load_state_dict(eager.state_dict())
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=7, lengths=[5, 2])
    labels = to_device(random_labels(CONFIG, inputs), device)
    inputs = to_device(inputs, device)
    out_e = eager(**inputs, **labels)
    out_f = fast(**inputs, **labels)
    assert_close_scaled(out_f.loss, out_e.loss, "loss", rel=1e-4)
    for name in out_e.losses:
        assert_close_scaled(out_f.losses[name], out_e.losses[name], f"loss {name}", rel=1e-4)
    out_e.loss.backward()
    out_f.loss.backward()
    fast_params = dict(fast.named_parameters())
    for name, param in eager.named_parameters():
        assert_close_scaled(fast_params[name].grad, param.grad, f"grad {name}", rel=1e-4)


def test_auto_never_picks_the_interpreter_and_explicit_triton_says_why_not():
    q = torch.randn(1, 3, 2, 32)
    assert AttentionDispatcher("auto").current(q) == "sdpa"
    with pytest.raises(AttentionBackendError, match="head_dim 24"):
        AttentionDispatcher("triton").attention(*(torch.randn(1, 3, 2, 24),) * 3, None, 0.0, 0.2)


def test_flash_attn_backend_reports_why_it_cannot_serve():
    # flash-attn cannot be installed without CUDA: the backend must say why it cannot serve
    dispatcher = AttentionDispatcher("flash_attn")
    q = torch.randn(1, 3, 2, 32)
    with pytest.raises(AttentionBackendError, match="flash_attn"):
        dispatcher.attention(q, q, q, None, 0.0, 0.2)


@pytest.mark.gpu
def test_triton_backend_attention_qkv_matches_the_unbound_views():
    """`attention_qkv` (packed self-attention, one dqkv from the kernels) equals `attention` on
    the views of the same projection, output and gradient, with dropout for a fixed seed."""
    from lxmert_fast.model.triton_backend import TritonAttention

    device = kernel_device()
    backend = TritonAttention()
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 7, 3, 2, 32, generator=gen).to(device)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3], device=device)
    dout = torch.randn(2, 7, 2, 32, generator=gen).to(device)
    outs, grads = [], []
    for packed in (True, False):
        x = qkv.clone().requires_grad_(True)
        torch.manual_seed(5)
        if packed:
            out, probs = backend.attention_qkv(x, mask, 0.1, 0.2)
        else:
            out, probs = backend.attention(*x.unbind(2), mask, 0.1, 0.2)
        assert probs is None
        out.backward(dout)
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1])
    assert_close_scaled(grads[0], grads[1], "dqkv", rel=1e-6)


@pytest.mark.gpu
def test_a_model_on_the_triton_backend_and_kernels_deep_copies():
    """copy.deepcopy of a model whose backend and fused ops imported lxmert_kernels (modules do
    not copy): the copy shares them and gives the same outputs."""
    import copy

    device = kernel_device()
    model = LxmertForPreTraining(CONFIG.replace(attention_backend="triton", kernels="triton")).eval().to(device)
    inputs = to_device(random_batch(CONFIG, batch=2, tokens=5, objects=7, lengths=[5, 2]), device)
    with torch.no_grad():
        before = model(**inputs).prediction_logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(**inputs).prediction_logits, before)
