"""Parity with transformers' LXMERT: every output field, each loss and every parameter gradient."""

from __future__ import annotations

import pytest
import torch
import transformers

from lxmert_fast import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from lxmert_fast.checkpoints.layouts import ours_to_hf
from tests.helpers import assert_close_scaled, no_dropout, random_batch, random_labels, twin_models

BACKENDS = ["eager", "sdpa"]
CONFIGS = {
    "tiny": LxmertConfig.preset("tiny"),
    # three heads of 16, more layers, other label counts
    "wide-heads": LxmertConfig.preset("tiny", hidden_size=48, num_attention_heads=3, intermediate_size=80,
                                      l_layers=3, x_layers=1, r_layers=2, num_qa_labels=5),
    # without attribute and feature losses
    "obj-only": LxmertConfig.preset("tiny", visual_attr_loss=False, visual_feat_loss=False),
}


def grads_in_hf_names(model, config) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return ours_to_hf(grads, config)


def compare_grads(ours, hf, config):
    ours_grads = grads_in_hf_names(ours, config)
    hf_grads = {name: p.grad for name, p in hf.named_parameters() if p.grad is not None}
    assert set(ours_grads) == set(hf_grads), set(ours_grads) ^ set(hf_grads)
    for name, ref in hf_grads.items():
        assert_close_scaled(ours_grads[name], ref, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_pretraining_parity_outputs_losses_and_grads(config_name, backend):
    config = no_dropout(CONFIGS[config_name])
    ours, hf = twin_models(config, LxmertForPreTraining, transformers.LxmertForPreTraining)
    ours.set_attention_backend(backend)
    inputs = random_batch(config, batch=3, tokens=9, objects=7, lengths=[9, 4, 1])
    labels = random_labels(config, inputs)
    if config_name == "obj-only":
        labels["obj_labels"] = {"obj": labels["obj_labels"]["obj"]}
    out = ours(**inputs, **labels, output_prediction_logits=True, output_hidden_states=True)
    ref = hf(**inputs, **labels, output_hidden_states=True)
    assert_close_scaled(out.loss, ref.loss, "loss")
    assert_close_scaled(out.prediction_logits, ref.prediction_logits, "prediction_logits")
    assert_close_scaled(out.cross_relationship_score, ref.cross_relationship_score, "cross_relationship_score")
    assert_close_scaled(out.question_answering_score, ref.question_answering_score, "question_answering_score")
    for field in ("language_hidden_states", "vision_hidden_states"):
        ours_states, ref_states = getattr(out, field), getattr(ref, field)
        assert len(ours_states) == len(ref_states)
        for i, (a, b) in enumerate(zip(ours_states, ref_states)):
            assert_close_scaled(a, b, f"{field}[{i}]")
    assert torch.allclose(sum(out.losses.values()), out.loss)
    out.loss.backward()
    ref.loss.backward()
    compare_grads(ours, hf, config)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_only_decoder_gives_the_same_loss_and_grads(backend):
    """Training with labels decodes only masked positions; loss and grads equal the full decoder's."""
    config = no_dropout(CONFIGS["tiny"])
    ours, hf = twin_models(config, LxmertForPreTraining, transformers.LxmertForPreTraining)
    ours.set_attention_backend(backend)
    ours.train()
    inputs = random_batch(config, batch=4, tokens=8, objects=6)
    labels = random_labels(config, inputs)
    out = ours(**inputs, **labels)
    assert out.prediction_logits is None, "training with labels must not materialise all logits by default"
    ref = hf(**inputs, **labels)
    assert_close_scaled(out.loss, ref.loss, "loss")
    out.loss.backward()
    ref.loss.backward()
    compare_grads(ours, hf, config)


@pytest.mark.parametrize("kind", ["labels", "matched_label", "obj_labels", "ans"])
def test_each_label_kind_alone(kind):
    config = no_dropout(CONFIGS["tiny"])
    ours, hf = twin_models(config, LxmertForPreTraining, transformers.LxmertForPreTraining)
    ours.eval(), hf.eval()
    inputs = random_batch(config, batch=2, tokens=6, objects=4)
    labels = {kind: random_labels(config, inputs)[kind]}
    out = ours(**inputs, **labels)
    ref = hf(**inputs, **labels)
    assert_close_scaled(out.loss, ref.loss, f"loss with {kind} alone")
    expected = {"labels": {"mlm"}, "matched_label": {"matched"}, "obj_labels": {"obj", "attr", "feat"}, "ans": {"qa"}}
    assert set(out.losses) == expected[kind]
    assert out.prediction_logits is not None  # eval mode returns all logits, as HF


def test_no_labels_gives_no_loss_and_hf_outputs():
    config = no_dropout(CONFIGS["tiny"])
    ours, hf = twin_models(config, LxmertForPreTraining, transformers.LxmertForPreTraining)
    inputs = random_batch(config, batch=1, tokens=1, objects=3, lengths=[1])  # batch 1, a one-token sentence
    out = ours(**inputs)
    ref = hf(**inputs)
    assert out.loss is None and ref.loss is None and out.losses is None
    assert list(out.keys()) == list(ref.keys())  # transformers' fields, in its order
    assert_close_scaled(out.prediction_logits, ref.prediction_logits, "prediction_logits")
    assert_close_scaled(out.cross_relationship_score, ref.cross_relationship_score, "matching score")
    ours_tuple = ours(**inputs, return_dict=False)
    ref_tuple = hf(**inputs, return_dict=False)
    assert len(ours_tuple) == len(ref_tuple)
    for a, b in zip(ours_tuple, ref_tuple):
        assert_close_scaled(a, b, "tuple output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_model_parity_with_visual_mask_and_36_objects(backend):
    config = no_dropout(CONFIGS["wide-heads"])
    ours, hf = twin_models(config, LxmertModel, transformers.LxmertModel)
    ours.set_attention_backend(backend)
    inputs = random_batch(config, batch=2, tokens=5, objects=36)
    inputs["visual_attention_mask"] = torch.ones(2, 36, dtype=torch.long)
    inputs["visual_attention_mask"][1, 30:] = 0
    out = ours(**inputs)
    ref = hf(**inputs)
    for field in ("language_output", "vision_output", "pooled_output"):
        assert_close_scaled(getattr(out, field), getattr(ref, field), field)
    # random weights: a plain sum would cancel in the LayerNorm-bias grads and measure only rounding
    w_pool, w_vis = torch.randn_like(ref.pooled_output), torch.randn_like(ref.vision_output)
    ((out.pooled_output * w_pool).sum() + (out.vision_output * w_vis).sum()).backward()
    ((ref.pooled_output * w_pool).sum() + (ref.vision_output * w_vis).sum()).backward()
    compare_grads(ours, hf, config)


def test_output_attentions_match_hf_and_auto_picks_eager():
    config = no_dropout(CONFIGS["tiny"])
    ours, hf = twin_models(config, LxmertModel, transformers.LxmertModel)
    inputs = random_batch(config, batch=2, tokens=5, objects=4)
    out = ours(**inputs, output_attentions=True)
    ref = hf(**inputs, output_attentions=True)
    for field in ("language_attentions", "vision_attentions", "cross_encoder_attentions"):
        for a, b in zip(getattr(out, field), getattr(ref, field)):
            # HF leaves padded keys at exp(finfo.min - max) = 0 as well; compare everything
            assert_close_scaled(a, b, field)


def test_question_answering_parity():
    config = no_dropout(CONFIGS["tiny"])
    ours, hf = twin_models(config, LxmertForQuestionAnswering, transformers.LxmertForQuestionAnswering)
    inputs = random_batch(config, batch=3, tokens=6, objects=5)
    labels = torch.tensor([1, 0, 4])
    out = ours(**inputs, labels=labels)
    ref = hf(**inputs, labels=labels)
    assert_close_scaled(out.loss, ref.loss, "qa loss")
    assert_close_scaled(out.question_answering_score, ref.question_answering_score, "qa score")
    out.loss.backward()
    ref.loss.backward()
    compare_grads(ours, hf, config)


def test_paper_masked_only_object_label_loss():
    """obj_label_loss="masked": obj/attr CE weighted by confidence x feature mask (the paper)."""
    config = no_dropout(CONFIGS["tiny"].replace(obj_label_loss="masked"))
    model = LxmertForPreTraining(config).eval()
    inputs = random_batch(config, batch=2, tokens=5, objects=6)
    labels = random_labels(config, inputs)
    out = model(**inputs, obj_labels=labels["obj_labels"])
    scores = model.obj_predict_head(model.lxmert(**inputs).vision_output)
    feat_mask = labels["obj_labels"]["feat"][1]
    for name in ("obj", "attr"):
        ids, conf = labels["obj_labels"][name]
        ce = torch.nn.functional.cross_entropy(scores[name].reshape(-1, scores[name].shape[-1]), ids.reshape(-1),
                                               reduction="none")
        expected = (ce * (conf * feat_mask).reshape(-1)).mean() * config.visual_loss_normalizer
        assert torch.allclose(out.losses[name], expected, atol=1e-6)
    all_objects = LxmertForPreTraining(config.replace(obj_label_loss="all")).eval()
    all_objects.load_state_dict(model.state_dict())
    assert not torch.allclose(all_objects(**inputs, obj_labels=labels["obj_labels"]).losses["obj"], out.losses["obj"])


def test_ignored_labels_give_zero_not_nan_and_original_minus_one_is_ignored():
    config = no_dropout(CONFIGS["tiny"])
    model = LxmertForPreTraining(config).eval()
    inputs = random_batch(config, batch=2, tokens=5, objects=3)
    out = model(**inputs, labels=torch.full((2, 5), -1), ans=torch.tensor([-1, -100]))
    assert out.losses["mlm"].item() == 0.0 and out.losses["qa"].item() == 0.0
    labels = torch.full((2, 5), -100)
    labels[0, 1] = 3
    a = model(**inputs, labels=labels).loss
    b = model(**inputs, labels=labels.masked_fill(labels == -100, -1)).loss
    assert torch.equal(a, b)


def test_missing_obj_label_kind_is_a_clear_error():
    config = no_dropout(CONFIGS["tiny"])
    model = LxmertForPreTraining(config)
    inputs = random_batch(config)
    labels = random_labels(config, inputs)["obj_labels"]
    del labels["attr"]
    with pytest.raises(KeyError, match="attr"):
        model(**inputs, obj_labels=labels)


def test_dropout_is_active_in_training_and_off_in_eval():
    config = CONFIGS["tiny"]
    model = LxmertForPreTraining(config)
    inputs = random_batch(config)
    model.train()
    a = model(**inputs).question_answering_score
    b = model(**inputs).question_answering_score
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(**inputs).question_answering_score, model(**inputs).question_answering_score)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_read_rows_only_same_loss_and_grads_as_the_full_model(backend):
    """Training with labels, the last cross layer's language side runs at [CLS] and the masked words only and the
    object decoders of masked-only outputs at the masked objects: the loss and every gradient equal the full
    computation's. Padded sentences, a one-token sentence, a row with no masked word, padded objects."""
    config = no_dropout(CONFIGS["wide-heads"])
    model = LxmertForPreTraining(config).train()
    model.set_attention_backend(backend)
    inputs = random_batch(config, batch=4, tokens=9, objects=11, lengths=[9, 1, 5, 7])
    inputs["visual_attention_mask"] = torch.ones(4, 11, dtype=torch.long)
    inputs["visual_attention_mask"][2, 6:] = 0
    labels = random_labels(config, inputs)
    labels["labels"][3] = -100                                   # nothing to predict in row 3
    labels["obj_labels"]["feat"][1][1] = 0.0                      # no masked object in row 1
    labels["obj_labels"]["feat"][1][0, :3] = torch.tensor([0.5, 2.0, 1.0])  # weights other than 1 count as given
    grads = []
    last_language_side = model.lxmert.encoder.x_layers[-1].lang_self_att
    rows_calls = []
    rows_only = last_language_side.forward_rows
    last_language_side.forward_rows = lambda *args: rows_calls.append(1) or rows_only(*args)
    # rows only; every row with all logits; every row (hidden states returned) with the masked-only decoder
    for kwargs in ({}, {"output_prediction_logits": True}, {"output_hidden_states": True}):
        model.zero_grad()
        rows_calls.clear()
        out = model(**inputs, **labels, **kwargs)
        assert bool(rows_calls) == (not kwargs)
        assert (out.prediction_logits is None) != ("output_prediction_logits" in kwargs)
        out.loss.backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (rows, g_rows), (ref, g_ref), (states, g_states) = grads
    assert set(rows.losses) == set(ref.losses) == set(states.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    for other, g_other, what in ((rows, g_rows, "rows only"), (states, g_states, "hidden states")):
        for name in ref.losses:
            assert_close_scaled(other.losses[name], ref.losses[name], f"{what}: loss {name}")
        assert_close_scaled(other.cross_relationship_score, ref.cross_relationship_score, f"{what}: matching score")
        assert_close_scaled(other.question_answering_score, ref.question_answering_score, f"{what}: qa score")
        assert set(g_other) == set(g_ref)
        for name, ref_grad in g_ref.items():
            assert_close_scaled(g_other[name], ref_grad, f"{what}: grad {name}")


def test_language_rows_of_the_base_model():
    """LxmertModel(language_rows=...): the last layer's language states at those rows; the pooled output exact."""
    config = no_dropout(CONFIGS["wide-heads"])
    model = LxmertModel(config).eval()
    inputs = random_batch(config, batch=3, tokens=6, objects=5, lengths=[6, 3, 1])
    full = model(**inputs)
    rows = torch.tensor([0, 2, 5, 6, 12, 13])
    part = model(**inputs, language_rows=rows)
    assert part.language_output.shape == (6, config.hidden_size)
    assert_close_scaled(part.language_output, full.language_output.reshape(-1, config.hidden_size)[rows], "rows")
    assert_close_scaled(part.pooled_output, full.pooled_output, "pooled_output")
    assert_close_scaled(part.vision_output, full.vision_output, "vision_output")
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(**inputs, language_rows=rows, output_hidden_states=True)


@pytest.mark.parametrize("mode", ["all", "masked"])
def test_object_losses_at_masked_objects_equal_the_dense_losses(mode):
    from lxmert_fast.model.heads import visual_losses, visual_losses_at_masked_objects
    config = no_dropout(CONFIGS["tiny"].replace(obj_label_loss=mode))
    model = LxmertForPreTraining(config)
    vision = torch.randn(3, 7, config.hidden_size, requires_grad=True)
    labels = random_labels(config, random_batch(config, batch=3, objects=7))["obj_labels"]
    labels["feat"][1][2] = 0.0
    fast = visual_losses_at_masked_objects(config, model.obj_predict_head, vision, labels)
    dense = visual_losses(config, model.obj_predict_head(vision), labels)
    assert set(fast) == set(dense) == {"obj", "attr", "feat"}
    for name in dense:
        assert_close_scaled(fast[name], dense[name], f"loss {name}")
        g_fast, = torch.autograd.grad(fast[name], vision, retain_graph=True)
        g_dense, = torch.autograd.grad(dense[name], vision, retain_graph=True)
        assert_close_scaled(g_fast, g_dense, f"grad of {name} wrt the vision states")
