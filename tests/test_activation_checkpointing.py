"""Activation checkpointing (`model.set_activation_checkpointing(True)`, `--activation_checkpointing`; transformers'
`gradient_checkpointing_enable` refuses LXMERT, ours as theirs).

Specification: with it on, every language, vision and cross layer (transformers' `GradientCheckpointingLayer`s)
runs its forward again in backward (torch's non-reentrant checkpoint by default, the reentrant one on request),
and the step gives the same loss and every gradient as without it,
with dropout on (fp32, 1e-6 relative to each tensor's scale): the recomputation replays the same dropout
masks, those of `F.dropout` and the Triton kernels' (seed tensors drawn on the device inside the layer).
Covered: the eager and sdpa attention backends; the exact masked-row selection and the static row budget
(the rows-only last cross layer either way); fine-tuning's QA model; the Triton backend and fused ops (on
CUDA when the machine has it, else in the interpreter); inside `torch.compile(fullgraph=True)` one graph, no break, one checkpoint region per
layer. The switch reaches every encoder, transformers' names work, and evaluation / no_grad run plainly.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.model.layers import LxmertLayer, LxmertXLayer
from lxmert_fast.model.lxmert import LxmertForQuestionAnswering
from lxmert_fast.model.rows import RowBudget
from tests.helpers import assert_close_scaled, kernel_device, random_batch, random_labels, to_device

REL = 1e-6
CONFIG = LxmertConfig.preset("tiny", hidden_size=48, num_attention_heads=3, intermediate_size=80,
                             l_layers=2, x_layers=2, r_layers=1, num_qa_labels=5)
BUDGET = RowBudget.for_batch(4, 9, 11, word_rate=0.4, obj_rate=0.3)  # random_labels masks at 0.4 / 0.3


def _batch(config=CONFIG, batch=4, tokens=9, objects=11, lengths=(9, 2, 5, 7), seed=3):
    g = torch.Generator().manual_seed(seed)
    inputs = random_batch(config, batch=batch, tokens=tokens, objects=objects, lengths=list(lengths), generator=g)
    inputs["visual_attention_mask"] = torch.ones(batch, objects, dtype=torch.long)
    inputs["visual_attention_mask"][-1, objects // 2:] = 0  # padded objects too
    return inputs, random_labels(config, inputs, generator=g)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (LxmertLayer, LxmertXLayer))]


def _first_parts(model):
    """Each layer's first submodule: its hooks run whenever the layer's forward runs, in the recomputation too
    (transformers checkpoints a layer's forward, its own hooks staying outside)."""
    return [layer.attention if isinstance(layer, LxmertLayer) else layer.visual_attention for layer in _layers(model)]


def _step(model, inputs, labels, checkpointing, seed: int, run=None, count_calls=True, **kwargs):
    """One forward + backward from RNG seed `seed`: (loss, {name: grad}, next random draw, the layers' forward
    calls, counted by pre-hooks on their first part: a recomputation stops once it has rebuilt what backward
    needs, before the forward's end). `checkpointing` None: as the model is set."""
    if checkpointing is not None:
        model.set_activation_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    calls: list[int] = []
    hooks = [part.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
             for i, part in enumerate(_first_parts(model))] if count_calls else []
    try:
        torch.manual_seed(seed)
        out = (run if run is not None else model)(**inputs, **labels, **kwargs)
        out.loss.backward()
        after = torch.rand(4)  # the global RNG stream goes on as without checkpointing
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, after, calls


def _assert_same(got, ref, what, rel=REL):
    loss, grads, after, _ = got
    ref_loss, ref_grads, ref_after, _ = ref
    assert_close_scaled(loss, ref_loss, f"{what}: loss", rel=rel)
    assert set(grads) == set(ref_grads) and len(ref_grads) > 0, f"{what}: other parameters got gradients"
    for name, g in ref_grads.items():
        assert_close_scaled(grads[name], g, f"{what}: grad {name}", rel=rel)
    assert torch.equal(after, ref_after), f"{what}: the RNG stream after the step differs"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("budget", [None, BUDGET], ids=["exact_rows", "row_budget"])
def test_same_loss_and_gradients_with_dropout_and_every_layer_recomputed(backend, budget):
    assert CONFIG.hidden_dropout_prob > 0 and CONFIG.attention_probs_dropout_prob > 0
    model = LxmertForPreTraining(CONFIG).train()
    model.set_attention_backend(backend)
    inputs, labels = _batch()
    ref = _step(model, inputs, labels, False, seed=11, row_budget=budget)
    got = _step(model, inputs, labels, True, seed=11, row_budget=budget)
    _assert_same(got, ref, f"{backend}, {'budget' if budget else 'exact rows'}")
    n = len(_layers(model))
    assert n == CONFIG.l_layers + CONFIG.r_layers + CONFIG.x_layers
    assert sorted(ref[3]) == list(range(n)), "without checkpointing each layer runs once"
    assert sorted(got[3]) == sorted(list(range(n)) * 2), "with checkpointing each layer runs again in backward"
    other_seed = _step(model, inputs, labels, True, seed=12, row_budget=budget)
    assert not torch.equal(other_seed[0], got[0]), "dropout is on: another seed must give another loss"


def test_fine_tuning_model_same_gradients():
    config = CONFIG.replace(num_qa_labels=7)
    model = LxmertForQuestionAnswering(config).train()
    model.set_attention_backend("sdpa")
    inputs, _ = _batch(config)
    labels = {"labels": torch.tensor([0, 3, 6, 2])}
    _assert_same(_step(model, inputs, labels, True, seed=5), _step(model, inputs, labels, False, seed=5), "QA model")


@pytest.mark.slow
@pytest.mark.gpu
def test_triton_kernels_replay_their_dropout_seeds():
    """The Triton attention backend and fused ops (on CUDA, else in the interpreter): their dropout seeds are
    device tensors drawn in the layer's forward; the recomputation draws them again from the restored RNG state,
    so the kernels' backward regenerates the same masks. One cross layer (it runs every kernel: cross pair,
    packed self-attention, the rows-only attention, the dropout LayerNorms, bias-GELU); small shapes: the
    interpreter is slow."""
    device = kernel_device()
    config = CONFIG.replace(hidden_size=32, num_attention_heads=2, intermediate_size=48, l_layers=0, x_layers=1,
                            r_layers=0)  # head dim 16
    model = LxmertForPreTraining(config).train().to(device)
    model.set_attention_backend("triton")
    model.set_kernels("triton")
    inputs, labels = to_device(_batch(config, batch=2, tokens=5, objects=4, lengths=(5, 2)), device)
    budget = RowBudget.for_batch(2, 5, 4, word_rate=0.4, obj_rate=0.3)
    ref = _step(model, inputs, labels, False, seed=9, row_budget=budget)
    got = _step(model, inputs, labels, True, seed=9, row_budget=budget)
    _assert_same(got, ref, "triton")
    assert len(got[3]) == 2 * len(ref[3]) == 2


def test_compiled_fullgraph_one_graph_with_a_checkpoint_region_per_layer():
    """torch.compile(fullgraph=True, backend aot_eager: the capture, functionalisation and partitioned forward/
    backward graphs inductor gets): no graph break, one graph holding one `tag_activation_checkpoint` region per
    encoder layer, and the eager model's loss and gradients without checkpointing (dropout on)."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters

    config = CONFIG.replace(l_layers=1, x_layers=1, r_layers=1)
    regions = []

    def counting_aot_eager(gm, example_inputs):
        regions.append(sum(1 for node in gm.graph.nodes if node.op == "call_function"
                           and node.target is torch.ops.higher_order.tag_activation_checkpoint))
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    try:
        model = LxmertForPreTraining(config).train()
        model.set_attention_backend("sdpa")
        inputs, labels = _batch(config)
        model.set_activation_checkpointing(True)
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counting_aot_eager)
        got = _step(model, inputs, labels, True, seed=21, run=compiled, count_calls=False, row_budget=BUDGET)
        ref = _step(model, inputs, labels, False, seed=21, row_budget=BUDGET)
        _assert_same(got, ref, "compiled with checkpointing vs eager without")
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert regions == [3], f"checkpoint regions per captured graph: {regions} (expected one per layer: 3)"
    finally:
        torch._dynamo.reset()


def test_the_switch_reaches_every_layer_and_transformers_switch_refuses_as_for_its_lxmert():
    model = LxmertForPreTraining(CONFIG)
    assert not model.is_gradient_checkpointing and not model.supports_gradient_checkpointing
    with pytest.raises(ValueError, match="does not support"):  # transformers 5.17 says gradient, 5.25 activation
        model.gradient_checkpointing_enable()
    assert not any(layer.gradient_checkpointing for layer in _layers(model))
    model.set_activation_checkpointing(True)
    assert model.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in _layers(model))
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in _layers(model))
    model.set_activation_checkpointing(False)
    assert not model.is_gradient_checkpointing and not any(layer.gradient_checkpointing for layer in _layers(model))


def test_reentrant_checkpoint_on_request_same_gradients():
    """use_reentrant=True works too (the same loss and gradients; it breaks a compiled graph)."""
    model = LxmertForPreTraining(CONFIG).train()
    model.set_attention_backend("sdpa")
    inputs, labels = _batch()
    ref = _step(model, inputs, labels, False, seed=13)
    model.set_activation_checkpointing(True, use_reentrant=True)
    got = _step(model, inputs, labels, None, seed=13)
    _assert_same(got, ref, "reentrant")
    assert len(got[3]) == 2 * len(ref[3])


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_evaluation_and_no_grad_run_the_layers_once(mode):
    model = LxmertForPreTraining(CONFIG)
    model.set_activation_checkpointing(True)
    model.train(mode != "eval")
    inputs, labels = _batch()
    calls = []
    hooks = [part.register_forward_pre_hook(lambda *a: calls.append(1)) for part in _first_parts(model)]
    with torch.set_grad_enabled(mode != "no_grad"):
        out = model(**inputs, **labels)
    if mode == "eval":
        out.loss.backward()
    for h in hooks:
        h.remove()
    assert len(calls) == len(_layers(model))
