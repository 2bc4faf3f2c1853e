"""The analytic FLOP count: LXMERT.md's figures for the base model, and torch's own counter on a tiny one."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.flops import flop_breakdown, peak_tflops_for, throughput, train_flops_per_sample


def test_base_matches_the_published_figures():
    base = LxmertConfig.preset("base")
    every_token = train_flops_per_sample(base, seq_len=20, num_objects=36) / 1e9
    ours = train_flops_per_sample(base, seq_len=20, num_objects=36, mlm_tokens=0.15 * 20,
                                  masked_objects=0.15 * 36) / 1e9
    assert every_token == pytest.approx(35.5, rel=0.01)   # transformers' model
    assert ours == pytest.approx(32.25, rel=0.01)          # what ours computes while training


def test_disabled_heads_cost_nothing():
    base = LxmertConfig.preset("base")
    no_qa = base.replace(task_qa=False)
    assert flop_breakdown(no_qa).qa_head == 0
    assert flop_breakdown(base).qa_head > 0
    assert train_flops_per_sample(no_qa) < train_flops_per_sample(base)


def test_forward_count_equals_torch_flop_counter():
    """torch counts 2 FLOPs per multiply-add of every matmul in the forward pass (for the whole batch)."""
    config = LxmertConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attention_backend="eager")
    model = LxmertForPreTraining(config).eval()
    batch, tokens, objects = 2, 9, 7
    inputs = dict(
        input_ids=torch.randint(1, config.vocab_size, (batch, tokens)),
        visual_feats=torch.randn(batch, objects, config.visual_feat_dim),
        visual_pos=torch.rand(batch, objects, 4),
        attention_mask=torch.ones(batch, tokens, dtype=torch.long),
    )
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    # eval forward: MLM decoder on every token; the object head runs only with obj_labels, so add it.
    expected = flop_breakdown(config, seq_len=tokens, num_objects=objects)
    expected_macs = expected.forward_macs - expected.object_head
    assert counter.get_total_flops() == batch * 2 * expected_macs


def test_mfu_and_peak_table():
    tflops, mfu = throughput(1000.0, 33e9, num_devices=1, peak_tflops=989.0)
    assert tflops == pytest.approx(33.0)
    assert mfu == pytest.approx(33.0 / 989.0)
    assert throughput(10.0, 1e9)[1] is None
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("cpu") is None


@pytest.mark.parametrize("mode", ["all", "masked"])
def test_training_count_equals_torch_flop_counter(mode):
    """Training with labels: the MLM decoder and the last cross layer's language side at the masked words (+ [CLS]),
    the masked-only object outputs at the masked objects; the count follows what the model runs."""
    config = LxmertConfig.preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attention_backend="eager", obj_label_loss=mode)
    model = LxmertForPreTraining(config).train()
    batch, tokens, objects, words, masked = 2, 9, 7, 3, 2
    labels = torch.full((batch, tokens), -100)
    labels[:, 2:2 + words] = 5
    feat_mask = torch.zeros(batch, objects)
    feat_mask[:, 1:1 + masked] = 1.0
    inputs = dict(
        input_ids=torch.randint(1, config.vocab_size, (batch, tokens)),
        visual_feats=torch.randn(batch, objects, config.visual_feat_dim),
        visual_pos=torch.rand(batch, objects, 4),
        attention_mask=torch.ones(batch, tokens, dtype=torch.long),
        labels=labels, matched_label=torch.tensor([1, 0]), ans=torch.tensor([1, -100]),
        obj_labels={"obj": (torch.zeros(batch, objects, dtype=torch.long), torch.ones(batch, objects)),
                    "attr": (torch.zeros(batch, objects, dtype=torch.long), torch.ones(batch, objects)),
                    "feat": (torch.randn(batch, objects, config.visual_feat_dim), feat_mask)},
    )
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(**inputs)
    assert out.prediction_logits is None and out.language_hidden_states is None  # the rows-only path
    expected = flop_breakdown(config, seq_len=tokens, num_objects=objects, mlm_tokens=words, masked_objects=masked)
    assert counter.get_total_flops() == batch * 2 * expected.forward_macs
