"""LxmertConfig (HF fields, JSON, presets, validation) and the attention backend registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from lxmert_fast import AttentionBackendError, ConfigError, LxmertConfig, LxmertForPreTraining
from lxmert_fast.model.attention import (
    AttentionBackend,
    AttentionCall,
    AttentionDispatcher,
    EagerAttention,
    KeyMask,
    PairKeyMask,
    SdpaAttention,
    register_backend,
)
from tests.helpers import random_batch


def test_defaults_are_hf_defaults():
    ours, hf = LxmertConfig(), transformers.LxmertConfig()
    assert isinstance(ours, transformers.LxmertConfig) and ours.model_type == "lxmert"
    for name in LxmertConfig.hf_field_names():
        assert getattr(ours, name) == getattr(hf, name), name
    assert (ours.l_layers, ours.x_layers, ours.r_layers) == (9, 5, 5)
    assert ours.visual_losses == ("obj", "attr", "feat")


def test_hf_keywords_and_attributes():
    """transformers' common config keywords and attributes, as on its own LxmertConfig."""
    cfg = LxmertConfig(num_labels=3, output_attentions=True, output_hidden_states=True, return_dict=False)
    assert (cfg.num_labels, cfg.output_attentions, cfg.output_hidden_states, cfg.return_dict) == (3, True, True, False)
    assert cfg.num_hidden_layers == {"vision": 5, "cross_encoder": 5, "language": 9}


def test_our_config_json_reads_into_transformers_and_back(tmp_path):
    """Our fields are plain config.json fields; transformers' LxmertConfig keeps them through its own round trip."""
    ours = LxmertConfig.preset("tiny", attention_backend="sdpa", kernels="triton", obj_label_loss="masked")
    ours.save_pretrained(tmp_path / "ours")
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert data["model_type"] == "lxmert" and data["attention_backend"] == "sdpa" and data["kernels"] == "triton"
    hf = transformers.LxmertConfig.from_pretrained(tmp_path / "ours")
    assert type(hf) is transformers.LxmertConfig and hf.hidden_size == 32 and hf.obj_label_loss == "masked"
    hf.save_pretrained(tmp_path / "via_hf")
    again = LxmertConfig.from_pretrained(tmp_path / "via_hf")
    assert (again.attention_backend, again.kernels, again.obj_label_loss) == ("sdpa", "triton", "masked")
    for name in LxmertConfig.hf_field_names() + LxmertConfig.own_field_names():
        assert getattr(again, name) == getattr(ours, name), name


def test_reads_an_hf_config_json_and_round_trips(tmp_path):
    transformers.LxmertConfig(hidden_size=96, num_attention_heads=6, num_qa_labels=3129).save_pretrained(tmp_path)
    cfg = LxmertConfig.from_json(tmp_path / "config.json")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_qa_labels) == (96, 6, 3129)
    assert (cfg.attention_backend, cfg.kernels, cfg.obj_label_loss) == ("auto", "torch", "all")  # our defaults
    assert LxmertConfig.from_pretrained(tmp_path).hidden_size == 96
    cfg.to_json_file(tmp_path / "again.json")
    again = LxmertConfig.from_json(tmp_path / "again.json")
    assert again.to_dict() == cfg.to_dict()
    assert json.loads((tmp_path / "again.json").read_text())["model_type"] == "lxmert"
    hf = transformers.LxmertConfig.from_pretrained(tmp_path / "again.json")
    assert hf.hidden_size == 96 and hf.num_qa_labels == 3129


def test_configs_written_before_pretrainedconfig_still_read(tmp_path):
    """config.json files of earlier lxmert-fast versions kept our fields under "lxmert_fast"."""
    data = transformers.LxmertConfig(hidden_size=64, num_attention_heads=4).to_dict()
    data["lxmert_fast"] = {"attention_backend": "eager", "kernels": "torch", "obj_label_loss": "masked"}
    (tmp_path / "old.json").write_text(json.dumps(data))
    cfg = LxmertConfig.from_json(tmp_path / "old.json")
    assert (cfg.hidden_size, cfg.attention_backend, cfg.obj_label_loss) == (64, "eager", "masked")
    assert "lxmert_fast" not in cfg.to_dict()
    data["lxmert_fast"] = {"surprise": 1}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="lxmert_fast"):
        LxmertConfig.from_json(tmp_path / "bad.json")


def test_unknown_hf_keys_are_kept(tmp_path):
    data = LxmertConfig().to_dict()
    data["some_future_field"] = [1, 2]
    (tmp_path / "c.json").write_text(json.dumps(data))
    cfg = LxmertConfig.from_json(tmp_path / "c.json")
    assert cfg.to_dict()["some_future_field"] == [1, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(obj_label_loss="some"), "obj_label_loss"),
        (dict(l_layers=-1), "l_layers"),
        (dict(kernels="cuda"), "kernels"),
        (dict(attention_backend=""), "attention_backend"),
    ],
)
def test_validation_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LxmertConfig(**kwargs)


def test_shape_is_checked_where_a_model_needs_it():
    """As in transformers, a config may hold hidden_size % num_attention_heads != 0 (its tests build one);
    presets, replace() and every model refuse it, naming the fields."""
    loose = LxmertConfig(hidden_size=100, num_attention_heads=12)
    for make in (lambda: LxmertConfig.preset("base", hidden_size=100), lambda: LxmertConfig().replace(hidden_size=100),
                 lambda: LxmertForPreTraining(loose)):
        with pytest.raises(ConfigError, match="hidden_size = 100 is not divisible by num_attention_heads"):
            make()
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hiden_size'\]"):
        LxmertConfig.preset("tiny", hiden_size=8)


def test_bad_config_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*not valid JSON"):
        LxmertConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type"):
        LxmertConfig.from_json(tmp_path / "bert.json")
    with pytest.raises(ConfigError, match="no such config"):
        LxmertConfig.from_json(tmp_path / "missing.json")


def test_presets():
    assert LxmertConfig.preset("base") == LxmertConfig()
    tiny = LxmertConfig.preset("tiny", num_qa_labels=4)
    assert tiny.hidden_size == 32 and tiny.num_qa_labels == 4
    with pytest.raises(ConfigError, match="unknown LxmertConfig preset"):
        LxmertConfig.preset("huge")
    changed = tiny.replace(kernels="triton", l_layers=3)
    assert (changed.kernels, changed.l_layers, tiny.kernels, tiny.l_layers) == ("triton", 3, "torch", 2)


def test_config_overrides_are_typed_and_checked():
    assert LxmertConfig.parse_overrides(" hidden_size=128, initializer_range=0.05,l_layers=2 ,") == {
        "hidden_size": 128, "initializer_range": 0.05, "l_layers": 2}
    assert LxmertConfig.parse_overrides("") == {}
    for text, match in (("hidden_size", "expected field=value"), ("hidden_size=", "expected field=value"),
                        ("hidden_size=1.5", "an integer"), ("initializer_range=big", "a number"),
                        ("vocab_size=3", "'vocab_size' cannot be overridden"), ("foo=1", "'foo' cannot")):
        with pytest.raises(ConfigError, match=match):
            LxmertConfig.parse_overrides(text)
    # the values still go through the config's own validation
    with pytest.raises(ConfigError, match="not divisible"):
        LxmertConfig.preset("tiny", **LxmertConfig.parse_overrides("hidden_size=33"))


# ------------------------------------------------------------------------------------ attention
def _qkv(batch=3, length=11, heads=2, dim=8):
    return torch.randn(batch, length, 3, heads, dim, requires_grad=True)


@pytest.mark.parametrize("dropout_p", [0.0])
def test_backends_agree_with_padding_and_fully_masked_rows(dropout_p):
    qkv = _qkv()
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, :] = False  # no key at all: zeros, not NaN
    results = []
    for backend in (EagerAttention(), SdpaAttention()):
        q, k, v = qkv.unbind(2)
        out, _ = backend.attention(q, k, v, mask, dropout_p, 1 / math.sqrt(8))
        grad, = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), qkv)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        assert out[2].abs().max() == 0
        results.append((out, grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_cross_pair_default_is_two_attentions():
    qkv = _qkv(length=9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 2:4] = False
    out, _ = EagerAttention().cross_pair(qkv, 4, mask, 0.0, 0.5)
    q, k, v = qkv.unbind(2)
    lang, _ = EagerAttention().attention(q[:, :4], k[:, 4:], v[:, 4:], mask[:, 4:], 0.0, 0.5)
    vis, _ = EagerAttention().attention(q[:, 4:], k[:, :4], v[:, :4], mask[:, :4], 0.0, 0.5)
    assert torch.equal(out, torch.cat([lang, vis], 1))


def test_a_prepared_key_mask_gives_the_bare_masks_results():
    """KeyMask: the mask, SDPA's mask (a row with no kept key attends everywhere) and the rows
    without keys, derived once; every backend and the cross pair give bitwise the results of the
    bare bool mask with it; a non-bool mask is refused by name."""
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 2:4] = False
    mask[2, :] = False
    km = KeyMask.of(mask)
    assert torch.equal(km.keep_bl, mask)
    assert km.attend_bl[2].all() and torch.equal(km.attend_bl[:2], mask[:2])
    assert km.empty_b111.flatten().tolist() == [False, False, True]
    rows = torch.tensor([2, 0, 0])
    assert all(torch.equal(a, b) for a, b in zip(km.rows(rows), KeyMask.of(mask[rows])))
    qkv = _qkv(length=9)
    q, k, v = qkv.unbind(2)
    for backend in (EagerAttention(), SdpaAttention()):
        bare, _ = backend.attention(q, k, v, mask, 0.0, 0.5)
        prepared, _ = backend.attention(q, k, v, km, 0.0, 0.5)
        assert torch.equal(bare, prepared) and prepared[2].abs().max() == 0
        pair = PairKeyMask.of(KeyMask.of(mask[:, :4]), KeyMask.of(mask[:, 4:]), 4, 5)
        assert torch.equal(pair.keep_bs, mask)
        assert torch.equal(backend.cross_pair(qkv, 4, mask, 0.0, 0.5)[0], backend.cross_pair(qkv, 4, pair, 0.0, 0.5)[0])
    only_vis = PairKeyMask.of(None, KeyMask.of(mask[:, 4:]), 4, 5)
    assert only_vis.lang is None and only_vis.keep_bs[:, :4].all() and PairKeyMask.of(None, None, 4, 5) is None
    with pytest.raises(TypeError, match="bool tensor"):
        KeyMask.of(mask.long())


def test_the_model_derives_each_mask_once_per_forward():
    """Eager mode: the rows-without-keys reduction runs once per mask (words, objects), not once
    per attention layer (it did: 29 times a forward at the base config)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAny(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.any:
                CountAny.n += 1
            return func(*args, **(kwargs or {}))

    config = LxmertConfig.preset("tiny", attention_backend="sdpa")
    model = LxmertForPreTraining(config).eval()
    inputs = random_batch(config)
    inputs["visual_attention_mask"] = torch.ones(inputs["visual_feats"].shape[:2], dtype=torch.long)
    inputs["visual_attention_mask"][0, -2:] = 0
    with torch.no_grad(), CountAny():
        model(**inputs)
    assert CountAny.n == 2


def test_a_deep_copy_has_its_own_dispatcher():
    """copy.deepcopy(model) (EMA, teacher models): the copy's dispatcher resolves and switches
    on its own (its compile-time resolver is bound to it, not to the original's), and gives the
    original's outputs."""
    import copy

    config = LxmertConfig.preset("tiny", attention_backend="sdpa")
    model = LxmertForPreTraining(config).eval()
    inputs = random_batch(config)
    with torch.no_grad():
        model(**inputs)  # the original has resolved (and cached) its backends
    twin = copy.deepcopy(model)
    ours, theirs = (m.lxmert.encoder.layer[0].attention._ctx.dispatcher for m in (model, twin))
    assert ours is not theirs and theirs._backend_name_for.__closure__[0].cell_contents is theirs
    twin.set_attention_backend("eager")
    assert ours.name == "sdpa" and theirs.name == "eager"
    q = torch.randn(2, 3, 2, 8)
    assert theirs.current(q) == "eager" and ours.current(q) == "sdpa"
    assert theirs._backend_name_for("eager", AttentionCall.of(q, 0.0, False).key()) == "eager"
    with torch.no_grad():
        assert torch.allclose(model(**inputs).prediction_logits, twin(**inputs).prediction_logits, atol=1e-5)


def test_sdpa_dropout_is_on_in_training():
    qkv = _qkv()
    q, k, v = qkv.unbind(2)
    a, _ = SdpaAttention().attention(q, k, v, None, 0.5, 0.3)
    b, _ = SdpaAttention().attention(q, k, v, None, 0.5, 0.3)
    assert not torch.allclose(a, b)


def test_named_backend_that_cannot_serve_raises_with_reasons():
    dispatcher = AttentionDispatcher("sdpa")
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(AttentionBackendError, match="sdpa.*cannot return attention probabilities"):
        dispatcher.attention(q, q, q, None, 0.0, 0.5, need_weights=True)
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'nope'"):
        AttentionDispatcher("nope")


def test_auto_picks_first_capable_and_reports_all_reasons():
    dispatcher = AttentionDispatcher("auto")
    q = torch.randn(1, 3, 2, 4)
    assert dispatcher.current(q) == "sdpa"  # flash_attn and triton cannot serve CPU tensors in auto
    assert dispatcher.current(q, need_weights=True) == "eager"

    class Never(AttentionBackend):
        name = "never"

        def not_supported_reasons(self, call):
            return ["never serves anything"]

    register_backend("never", Never)
    with pytest.raises(AttentionBackendError, match="never serves anything"):
        AttentionDispatcher("never").attention(q, q, q, None, 0.0, 0.5)


def test_model_backend_switch_through_config_and_setter():
    config = LxmertConfig.preset("tiny", attention_backend="eager", hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = LxmertForPreTraining(config).eval()
    inputs = random_batch(config)
    eager = model(**inputs).question_answering_score
    model.set_attention_backend("sdpa")
    assert model.config.attention_backend == "sdpa"
    assert torch.allclose(model(**inputs).question_answering_score, eager, atol=1e-6)
    with pytest.raises(AttentionBackendError):
        model.set_attention_backend("no-such-backend")
