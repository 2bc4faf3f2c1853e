"""Our models as transformers' own: its base classes, outputs, methods, Trainer and PEFT.

Specification: the models are `PreTrainedModel`s and the config a `PretrainedConfig` (transformers'
`LxmertConfig`), so what a user of transformers' LXMERT does works unchanged: dict-like outputs with
transformers' fields in its order, the config's output switches, the embedding and QA-label resizes,
transformers' config in our models and ours in theirs, `Trainer` fine-tuning the QA model on CPU, and a
PEFT LoRA adapter on the cross-attention that trains while the base weights stay as they were.
"""

from __future__ import annotations

import peft  # a test extra (pip install .[dev])
import pytest
import torch
import transformers
from transformers.models.lxmert import modeling_lxmert as hf_modeling

from lxmert_fast import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from tests.helpers import hf_config, no_dropout, random_batch, random_labels

CONFIG = no_dropout(LxmertConfig.preset("tiny"))


def fresh() -> LxmertConfig:
    """A copy of CONFIG: a model keeps (and its resizes change) the config object it was given, as in transformers."""
    return CONFIG.replace()


def test_models_and_outputs_are_transformers_classes():
    model = LxmertForPreTraining(fresh()).eval()
    assert isinstance(model, transformers.PreTrainedModel) and isinstance(model.config, transformers.LxmertConfig)
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    labels = random_labels(CONFIG, inputs)
    out = model(**inputs, **labels)
    assert isinstance(out, hf_modeling.LxmertForPreTrainingOutput) and isinstance(out, transformers.utils.ModelOutput)
    assert "loss" in out and list(out.keys()) == ["loss", "prediction_logits", "cross_relationship_score",
                                                  "question_answering_score", "losses"]
    assert out[1] is out.prediction_logits and out["cross_relationship_score"] is out[2]
    qa = LxmertForQuestionAnswering(fresh()).eval()(**inputs, labels=torch.tensor([1, 2]))
    assert type(qa) is hf_modeling.LxmertForQuestionAnsweringOutput
    assert list(qa.keys()) == ["loss", "question_answering_score"] and dict(qa.items())["loss"] is qa.loss
    base = LxmertModel(fresh())(**inputs)
    assert type(base) is hf_modeling.LxmertModelOutput and base[2] is base.pooled_output


def test_the_config_switches_outputs_and_transformers_methods():
    config = CONFIG.replace(output_attentions=True, output_hidden_states=True)
    model = LxmertForQuestionAnswering(config).eval()
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    out = model(**inputs)
    assert len(out.language_attentions) == CONFIG.l_layers and len(out.cross_encoder_attentions) == CONFIG.x_layers
    assert len(out.language_hidden_states) == CONFIG.l_layers + CONFIG.x_layers
    model.config.return_dict = False
    assert isinstance(model(**inputs), tuple)
    assert model.get_input_embeddings() is model.lxmert.embeddings.word_embeddings
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_masked_lm_labels_is_the_deprecated_name_of_labels():
    model = LxmertForPreTraining(fresh()).eval()
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    labels = random_labels(CONFIG, inputs)["labels"]
    with pytest.warns(FutureWarning, match="masked_lm_labels"):
        old = model(**inputs, masked_lm_labels=labels).loss
    assert torch.equal(old, model(**inputs, labels=labels).loss)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, labels=labels, masked_lm_labels=labels)


def test_transformers_config_in_our_models_and_ours_in_theirs():
    hf_cfg = hf_config(CONFIG)
    ours = LxmertForPreTraining(hf_cfg)
    assert isinstance(ours.config, LxmertConfig) and ours.config.hidden_size == CONFIG.hidden_size
    assert ours.config.attention_backend == "auto"  # our defaults for our fields
    theirs = transformers.LxmertForPreTraining(CONFIG.replace(attention_backend="sdpa"))
    assert theirs.config.hidden_size == CONFIG.hidden_size


def test_untied_word_embeddings_as_transformers_allows():
    torch.manual_seed(5)
    model = LxmertForPreTraining(CONFIG.replace(tie_word_embeddings=False)).train()
    decoder, embeddings = model.cls.predictions.decoder.weight, model.lxmert.embeddings.word_embeddings.weight
    assert decoder is not embeddings and 0.015 < decoder.std().item() < 0.025  # initialised, as transformers does
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    model(**inputs, **random_labels(CONFIG, inputs)).loss.backward()
    assert decoder.grad is not None and embeddings.grad is not None


def test_resize_token_embeddings_keeps_the_decoder_tied():
    torch.manual_seed(0)
    model = LxmertForPreTraining(fresh()).eval()
    old = model.lxmert.embeddings.word_embeddings.weight.detach().clone()
    old_bias = model.cls.predictions.bias.detach().clone()
    new_size = CONFIG.vocab_size + 13
    model.resize_token_embeddings(new_size)
    emb = model.get_input_embeddings()
    assert emb.weight.shape[0] == new_size and model.config.vocab_size == new_size
    assert model.cls.predictions.decoder.weight is emb.weight
    assert torch.equal(emb.weight[:CONFIG.vocab_size], old) and torch.equal(model.cls.predictions.bias[:-13], old_bias)
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    inputs["input_ids"][0, 1] = new_size - 1
    out = model(**inputs, labels=torch.full((2, 5), new_size - 1))
    assert out.prediction_logits.shape[-1] == new_size and torch.isfinite(out.loss)
    model.resize_token_embeddings(CONFIG.vocab_size - 20)
    assert model.cls.predictions.bias.shape[0] == CONFIG.vocab_size - 20


@pytest.mark.parametrize("model_class", [LxmertForQuestionAnswering, LxmertForPreTraining])
def test_resize_num_qa_labels(model_class):
    torch.manual_seed(1)
    model = model_class(fresh()).eval()
    inputs = random_batch(CONFIG, batch=2, tokens=5, objects=3)
    before = model(**inputs).question_answering_score
    k = CONFIG.num_qa_labels
    layer = model.resize_num_qa_labels(k + 5)
    assert layer is model.get_qa_logit_layer() and layer.out_features == k + 5
    assert model.config.num_qa_labels == k + 5 == model.num_qa_labels
    after = model(**inputs).question_answering_score
    assert after.shape == (2, k + 5) and torch.allclose(after[:, :k], before)
    model.resize_num_qa_labels(3)
    assert model(**inputs).question_answering_score.shape == (2, 3)
    kwargs = {"labels": torch.tensor([0, 2])} if model_class is LxmertForQuestionAnswering else {"ans": torch.tensor([0, 2])}
    assert torch.isfinite(model(**inputs, **kwargs).loss)


def _qa_examples(n: int = 16, answers: int = CONFIG.num_qa_labels, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batch = random_batch(CONFIG, batch=n, tokens=6, objects=4, generator=g)
    labels = torch.randint(0, answers, (n,), generator=g)
    return [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(n)]


def _qa_loss(model, examples) -> float:
    batch = transformers.default_data_collator(examples)
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_trainer_fine_tunes_the_qa_model_on_cpu(tmp_path):
    torch.manual_seed(2)
    model = LxmertForQuestionAnswering(fresh())
    examples = _qa_examples()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = _qa_loss(model, examples)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                   data_collator=transformers.default_data_collator)
    result = trainer.train()
    assert result.global_step == 6 and torch.isfinite(torch.tensor(result.training_loss))
    # everything trains but the last cross layer's vision side, whose output no QA score reads, and the token
    # type embeddings: every token is of type 0, the embedding's padding row (as in transformers: never trained)
    last_vision_side = f"lxmert.encoder.x_layers.{CONFIG.x_layers - 1}.visn_"
    frozen = {n for n in before if n.startswith(last_vision_side)} | {"lxmert.embeddings.token_type_embeddings.weight"}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == set(before) - frozen
    assert _qa_loss(model, examples) < loss_before
    trainer.save_model(str(tmp_path / "saved"))
    again = transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "saved")  # transformers' class reads it
    inputs = transformers.default_data_collator(examples[:2])
    inputs.pop("labels")
    with torch.no_grad():
        assert torch.allclose(again(**inputs).question_answering_score,
                              model.eval()(**inputs).question_answering_score, atol=1e-5)


def test_peft_lora_on_the_cross_attention_trains_the_adapter_only():
    torch.manual_seed(3)
    model = LxmertForQuestionAnswering(fresh())
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["att.qkv"], lora_dropout=0.0))
    adapted = {n for n, _ in lora.named_modules() if n.endswith("att.qkv")}
    assert len(adapted) == CONFIG.x_layers  # each cross layer's shared bidirectional attention, nothing else
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in trainable.items()}
    examples = _qa_examples()
    loss_before = _qa_loss(lora, examples)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    lora.train()
    batch = transformers.default_data_collator(examples)
    for _ in range(8):
        optimizer.zero_grad()
        lora(**batch).loss.backward()
        optimizer.step()
    assert all(not torch.equal(lora_before[n], p) for n, p in trainable.items()), "the adapter trains"
    assert _qa_loss(lora, examples) < loss_before
    for name, param in lora.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer.", ".")
            assert torch.equal(param, base[key]), f"base weight {name} changed"
