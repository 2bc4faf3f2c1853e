"""Checkpoint I/O: HF directories both ways, the original release's layout, our saves, bad files.

`from_pretrained` / `save_pretrained` are transformers' (with our weight conversions): what does not fit is
reported as transformers reports it (missing and unexpected keys in the load report and
`output_loading_info`; a shape that does not fit is an error unless `ignore_mismatched_sizes=True`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lxmert_fast import CheckpointError, LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from tests.helpers import assert_close_scaled, hf_config, no_dropout, random_batch

CONFIG = no_dropout(LxmertConfig.preset("tiny"))


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(1)
    hf = transformers.LxmertForPreTraining(hf_config(CONFIG)).eval()
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    return hf, path


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.prediction_logits, out.cross_relationship_score, out.question_answering_score


def test_hf_directory_loads_and_gives_hf_outputs(hf_dir):
    hf, path = hf_dir
    ours = LxmertForPreTraining.from_pretrained(path)
    inputs = random_batch(CONFIG, batch=2, tokens=6, objects=4)
    for a, b in zip(outputs(ours, inputs), outputs(hf, inputs)):
        assert_close_scaled(a, b, "output after loading an HF directory")


def test_hf_to_ours_to_hf_is_bit_identical(hf_dir, tmp_path):
    _, path = hf_dir
    ours = LxmertForPreTraining.from_pretrained(path)
    out_dir = tmp_path / "again"
    ours.save_pretrained(out_dir)
    original, again = load_file(path / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert set(original) == set(again)
    for key in original:
        assert original[key].dtype == again[key].dtype and torch.equal(original[key], again[key]), key
    cfg_a = json.loads((path / "config.json").read_text())
    cfg_b = json.loads((out_dir / "config.json").read_text())
    for name in LxmertConfig.hf_field_names():
        assert cfg_a.get(name, getattr(LxmertConfig(), name)) == cfg_b[name], name


def test_our_save_loads_into_transformers_with_no_missing_or_unexpected_keys(tmp_path):
    torch.manual_seed(2)
    ours = LxmertForPreTraining(CONFIG).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf, info = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    for a, b in zip(outputs(ours, inputs), outputs(hf.eval(), inputs)):
        assert_close_scaled(a, b, "transformers output after loading our save")
    again = LxmertForPreTraining.from_pretrained(tmp_path / "ours")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # our own fields are plain config.json fields, which transformers' config keeps
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["obj_label_loss"] == "all"
    assert hf.config.obj_label_loss == "all" and hf.config.attention_backend == CONFIG.attention_backend


def test_pytorch_model_bin_directory(hf_dir, tmp_path):
    hf, path = hf_dir
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ours = LxmertForPreTraining.from_pretrained(bin_dir)
    inputs = random_batch(CONFIG, batch=2, tokens=4, objects=3)
    for a, b in zip(outputs(ours, inputs), outputs(hf, inputs)):
        assert_close_scaled(a, b, "output after loading pytorch_model.bin")


@pytest.mark.parametrize("layer_norm_names", ["weight/bias", "gamma/beta"])
def test_original_release_layout(hf_dir, tmp_path, layer_norm_names):
    """Epoch20_LXRT.pth: `module.bert.` keys from nn.DataParallel, no config beside it."""
    hf, _ = hf_dir
    original = {}
    for key, value in hf.state_dict().items():
        key = "module." + key.replace("lxmert.", "bert.", 1)
        if layer_norm_names == "gamma/beta" and ("LayerNorm" in key or "layer_norm" in key):
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        original[key] = value
    assert "module.bert.encoder.x_layers.0.visual_attention.att.query.weight" in original
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(original, path)
    ours = LxmertForPreTraining.from_pretrained(path, num_attention_heads=CONFIG.num_attention_heads,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert ours.config.num_qa_labels == CONFIG.num_qa_labels and ours.config.l_layers == CONFIG.l_layers
    inputs = random_batch(CONFIG, batch=2, tokens=6, objects=5)
    for a, b in zip(outputs(ours, inputs), outputs(hf, inputs)):
        assert_close_scaled(a, b, "output after loading the original layout")


def test_heads_are_dropped_for_base_and_qa_models(hf_dir):
    hf, path = hf_dir
    base = LxmertModel.from_pretrained(path).eval()
    qa = LxmertForQuestionAnswering.from_pretrained(path).eval()
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    with torch.no_grad():
        ref = hf.lxmert(**inputs)
        assert_close_scaled(base(**inputs).pooled_output, ref.pooled_output, "base model pooled output")
        assert_close_scaled(qa(**inputs).question_answering_score, hf(**inputs).question_answering_score, "qa score")


def test_deepspeed_style_wrapped_state_dict_in_our_layout(tmp_path):
    ours = LxmertForPreTraining(CONFIG)
    ckpt_dir = tmp_path / "ds"
    ckpt_dir.mkdir()
    torch.save({"module": ours.state_dict(), "step": 3}, ckpt_dir / "mp_rank_00_model_states.pt")
    CONFIG.save_pretrained(ckpt_dir)
    again = LxmertForPreTraining.from_pretrained(ckpt_dir / "mp_rank_00_model_states.pt")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _save_hf_state(tmp_path, state):
    path = tmp_path / "bad"
    path.mkdir(exist_ok=True)
    CONFIG.save_pretrained(path)
    torch.save(state, path / "pytorch_model.bin")
    return path


def test_missing_and_extra_keys_are_reported(hf_dir, tmp_path):
    hf, _ = hf_dir
    state = hf.state_dict()
    del state["lxmert.pooler.dense.weight"]
    state["lxmert.surprise.weight"] = torch.zeros(3)
    model, info = LxmertForPreTraining.from_pretrained(_save_hf_state(tmp_path, state), output_loading_info=True)
    assert info["missing_keys"] == {"lxmert.pooler.dense.weight"}, info
    assert info["unexpected_keys"] == {"lxmert.surprise.weight"}, info
    assert model.lxmert.pooler.dense.weight.std() > 0  # initialised, as transformers does


def test_wrong_shapes_are_an_error_unless_ignored(hf_dir, tmp_path):
    hf, _ = hf_dir
    state = hf.state_dict()
    state["lxmert.pooler.dense.bias"] = torch.zeros(CONFIG.hidden_size + 1)
    path = _save_hf_state(tmp_path, state)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LxmertForPreTraining.from_pretrained(path)
    _, info = LxmertForPreTraining.from_pretrained(path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["lxmert.pooler.dense.bias"], info


def test_partial_qkv_is_an_error(hf_dir, tmp_path):
    hf, _ = hf_dir
    state = hf.state_dict()
    del state["lxmert.encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LxmertForPreTraining.from_pretrained(_save_hf_state(tmp_path, state))


def test_from_pretrained_keywords(hf_dir):
    """transformers' keywords: the dtype to load in (torch_dtype or dtype), config overrides."""
    hf, path = hf_dir
    for kwargs in ({"torch_dtype": torch.bfloat16}, {"dtype": torch.bfloat16}):
        model = LxmertForPreTraining.from_pretrained(path, **kwargs)
        assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}, kwargs
    model = LxmertForPreTraining.from_pretrained(path, attention_backend="eager", num_labels=5)
    assert model.config.attention_backend == "eager" and model.config.num_labels == 5
    assert model.context.dispatcher.name == "eager"


def test_headless_directories_load_into_models_with_heads_both_ways(tmp_path):
    """An LxmertModel directory (no heads) loads into the QA model, the head initialised and reported missing,
    whichever library saved it and whichever loads it."""
    torch.manual_seed(4)
    base = LxmertModel(CONFIG).eval()
    base.save_pretrained(tmp_path / "ours")
    transformers.LxmertModel(hf_config(CONFIG)).save_pretrained(tmp_path / "hf")
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    for loader, source in ((LxmertForQuestionAnswering, "ours"), (LxmertForQuestionAnswering, "hf"),
                           (transformers.LxmertForQuestionAnswering, "ours")):
        qa, info = loader.from_pretrained(tmp_path / source, output_loading_info=True)
        assert info["missing_keys"] and all(k.startswith("answer_head.") for k in info["missing_keys"]), info
        assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    qa = LxmertForQuestionAnswering.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close_scaled(qa.lxmert(**inputs).pooled_output, base(**inputs).pooled_output, "encoder of the QA model")


def test_non_checkpoint_files_are_clear_errors(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pth.*cannot be read"):
        LxmertForPreTraining.from_pretrained(text)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        LxmertForPreTraining.from_pretrained(listing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="has no weights"):
        LxmertForPreTraining.from_pretrained(empty_dir)
    with pytest.raises(CheckpointError, match="no such file"):
        LxmertForPreTraining.from_pretrained(tmp_path / "nowhere")
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="safetensors"):
        LxmertForPreTraining.from_pretrained(bad_st)


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is refused."""
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        LxmertForPreTraining.from_pretrained(path)


def test_save_writes_config_and_weights_only(tmp_path):
    model = LxmertForPreTraining(CONFIG)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    """What the exports and fine-tuning saves write into: the old directory stays until the new one is complete."""
    from lxmert_fast.utils import atomic_directory

    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        LxmertForPreTraining(CONFIG).save_pretrained(tmp)
    first = (target / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(target) as tmp:
            (tmp_path / "marker").write_text(tmp)
            raise RuntimeError("interrupted")
    assert (target / "model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["export", "marker"]
