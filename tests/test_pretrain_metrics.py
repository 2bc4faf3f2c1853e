"""Validation metrics and the grounding check, against hand-made model outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lxmert_fast.metrics import PretrainEval, grounding_counts, grounding_result, mask_target_words


def test_pretrain_eval_counts_each_head():
    acc = PretrainEval(torch.device("cpu"))
    vocab, b, l, n = 6, 2, 3, 4
    labels = torch.tensor([[-100, 2, 3], [1, -100, -100]])
    logits = torch.zeros(b, l, vocab)
    logits[0, 1, 2] = logits[0, 2, 0] = logits[1, 0, 1] = 1.0  # 2 of 3 masked words right
    out = SimpleNamespace(
        loss=torch.tensor(2.0), prediction_logits=logits,
        cross_relationship_score=torch.tensor([[0.0, 1.0], [0.0, 1.0]]),  # says "matched" twice
        question_answering_score=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    )
    obj_scores = {"obj": torch.zeros(b, n, 5), "attr": torch.zeros(b, n, 3)}
    obj_scores["obj"][..., 4] = 1.0  # always class 4
    obj_ids = torch.tensor([[4, 4, 0, 0], [4, 1, 1, 1]])
    feat_mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # masked: 4,0 | 4,1 -> 2 of 4
    batch = {
        "labels": labels, "matched_label": torch.tensor([1, 0]), "ans": torch.tensor([0, -100]),
        "obj_labels": {"obj": (obj_ids, torch.ones(b, n)), "attr": (torch.zeros(b, n, dtype=torch.long), torch.ones(b, n)),
                       "feat": (torch.zeros(b, n, 7), feat_mask)},
    }
    acc.update(batch, out, obj_scores)
    res = acc.result()
    assert res["loss"] == pytest.approx(2.0)
    assert res["mlm_acc"] == pytest.approx(2 / 3)
    assert res["matched_acc"] == pytest.approx(0.5)
    assert res["obj_acc"] == pytest.approx(0.5)
    assert res["attr_acc"] == pytest.approx(1.0)
    assert res["qa_acc"] == pytest.approx(1.0)  # the one row with an answer


def test_mask_target_words():
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    masked, labels = mask_target_words(ids, torch.tensor([11, 12]), mask_id=4)
    assert masked.tolist() == [[2, 10, 4, 4, 3, 0]]
    assert labels.tolist() == [[-100, -100, 11, 12, -100, -100]]


def test_grounding_counts_separate_a_model_that_reads_the_image():
    """A fake model that predicts each masked word from the image (feature 0 holds the word id)."""
    vocab, mask_id = 20, 4
    words = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3], [2, 14, 15, 3], [2, 16, 17, 3]])
    feats = torch.zeros(4, 2, 8)
    feats[:, 0, 0] = torch.tensor([10.0, 12.0, 14.0, 16.0])
    feats[:, 0, 1] = torch.tensor([11.0, 13.0, 15.0, 17.0])

    def forward(input_ids, visual_feats, visual_pos, attention_mask, token_type_ids):
        logits = torch.zeros(*input_ids.shape, vocab)
        for i in range(input_ids.shape[0]):
            for j in range(input_ids.shape[1]):
                if input_ids[i, j] == mask_id:
                    logits[i, j, int(visual_feats[i, 0, j - 1])] = 1.0
        return SimpleNamespace(prediction_logits=logits, cross_relationship_score=torch.tensor([[0.0, 1.0]] * 4))

    raw = {"input_ids": words, "attention_mask": torch.ones_like(words), "token_type_ids": torch.zeros_like(words),
           "visual_feats": feats, "visual_pos": torch.zeros(4, 2, 4), "matched_label": torch.tensor([1, 1, 1, 0]),
           "img_index": torch.tensor([0, 1, 2, 3])}
    maskers = {"named_words": lambda raw: mask_target_words(raw["input_ids"], torch.arange(10, 18), mask_id),
               "masked_words": lambda raw: mask_target_words(raw["input_ids"], torch.tensor([11, 13, 15, 17]), mask_id)}
    counts = grounding_counts(forward, [raw], maskers, torch.device("cpu"))
    res = grounding_result(counts, maskers)
    assert res["words_true"] == 6  # rows 0-2 (row 3 is a mismatched pair)
    assert res["word_acc_true_image"] == 1.0
    assert res["word_acc_shuffled_image"] == 0.0
    assert res["masked_words_true"] == 3 and res["masked_acc_true_image"] == 1.0 and res["masked_acc_shuffled_image"] == 0
    assert res["matched_acc"] == 0.75 and res["matched_pairs"] == 4
