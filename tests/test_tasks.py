"""Fine-tuning data: metrics against hand-computed examples, submission file formats, datasets, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from lxmert_fast.data import tasks
from lxmert_fast.data.formats import DataFormatError
from lxmert_fast.data.tokenization import load_tokenizer
from tests.test_finetune_helpers import demo_world


# ---------------------------------------------------------------------------------------------- metrics
def test_vqa_soft_score_overall_and_per_answer_type():
    gold = {
        1: {"2": 1.0, "3": 0.3},          # predicted "3" -> 0.3
        2: {"red": 0.9, "blue": 0.6},     # predicted "red" -> 0.9
        3: {"yes": 1.0},                  # predicted "no" -> 0
        4: {"yes": 0.6, "no": 0.3},       # predicted "no" -> 0.3
        5: None,                          # unlabelled: not scored
    }
    preds = {1: "3", 2: "red", 3: "no", 4: "no", 5: "yes"}
    types = {1: "number", 2: "other", 3: "yes/no", 4: "yes/no", 5: "yes/no"}
    res = tasks.vqa_evaluate(preds, gold, types)
    assert res["count"] == 4
    assert res["score"] == pytest.approx((0.3 + 0.9 + 0.0 + 0.3) / 4)
    assert res["per_type"] == pytest.approx({"number": 0.3, "other": 0.9, "yes/no": 0.15})
    assert res["per_type_count"] == {"number": 1, "other": 1, "yes/no": 2}
    assert tasks.vqa_score("cat", {"dog": 1.0}) == 0.0
    with pytest.raises(ValueError, match="no prediction"):
        tasks.vqa_evaluate({1: "2"}, gold, types)


def test_gqa_accuracy_counts_the_top_answer():
    gold = {"a": {"bike": 1.0}, "b": {"dog": 1.0}, "c": {"left": 1.0}, "d": {"tree": 0.4, "bush": 1.0}}
    preds = {"a": "bike", "b": "cat", "c": "left", "d": "tree"}
    res = tasks.gqa_evaluate(preds, gold)
    assert res == {"accuracy": pytest.approx(2 / 4), "count": 4}
    assert tasks.gold_answer({"tree": 0.4, "bush": 1.0}) == "bush"


def test_nlvr2_accuracy_and_consistency_groups_by_sentence():
    # identifiers split-set-pair-sentence; the official script blanks the pair to group a sentence's examples
    gold = {
        "dev-10-0-1": 1, "dev-10-1-1": 0, "dev-10-2-1": 1,   # sentence dev-10--1: three image pairs
        "dev-10-0-0": 0, "dev-10-1-0": 0,                    # sentence dev-10--0: two pairs
        "dev-11-3-2": 1,                                     # sentence dev-11--2: one pair
    }
    preds = {
        "dev-10-0-1": 1, "dev-10-1-1": 0, "dev-10-2-1": 1,   # all right -> consistent
        "dev-10-0-0": 0, "dev-10-1-0": 1,                    # one wrong -> inconsistent
        "dev-11-3-2": "True",                                # string predictions as the CSV has them
    }
    res = tasks.nlvr2_evaluate(preds, gold)
    assert res["count"] == 6 and res["groups"] == 3
    assert res["accuracy"] == pytest.approx(5 / 6)
    assert res["consistency"] == pytest.approx(2 / 3)
    assert tasks.nlvr2_group("test1-123-2-0") == "test1-123--0"
    assert tasks.nlvr2_evaluate({"x-1-0-0": "False"}, {"x-1-0-0": "false"})["accuracy"] == 1.0


def test_majority_baseline_predicts_the_most_frequent_training_answer():
    ex = lambda labels: tasks.TaskExamples("vqa", ["s"], list(range(len(labels))), ["q"] * len(labels),  # noqa: E731
                                           [("i",)] * len(labels), [("f",)] * len(labels), labels, [None] * len(labels))
    train = ex([{"no": 1.0}, {"no": 0.9, "yes": 0.3}, {"yes": 1.0}, {"2": 1.0}])
    valid = ex([{"no": 1.0}, {"yes": 1.0}, {"no": 0.3, "yes": 0.9}])
    preds = tasks.majority_predictions("vqa", train, valid)
    assert set(preds.values()) == {"no"}
    assert tasks.evaluate("vqa", preds, valid)["score"] == pytest.approx((1.0 + 0.0 + 0.3) / 3)


# ---------------------------------------------------------------------------------------------- prediction files
def test_prediction_files_have_the_official_formats(tmp_path):
    vqa = tasks.write_predictions("vqa", str(tmp_path / "test_predict.json"), {262148000: "yes", 262148001: "2"})
    rows = json.loads(open(vqa).read())
    assert rows == [{"question_id": 262148000, "answer": "yes"}, {"question_id": 262148001, "answer": "2"}]
    assert isinstance(rows[0]["question_id"], int)

    gqa = tasks.write_predictions("gqa", str(tmp_path / "submit_predict.json"), {"201307251": "no", "20a": "bike"})
    assert json.loads(open(gqa).read()) == [{"questionId": "201307251", "prediction": "no"},
                                             {"questionId": "20a", "prediction": "bike"}]

    nlvr = tasks.write_predictions("nlvr2", str(tmp_path / "test_predict.csv"), {"test1-0-1-0": 1, "test1-0-1-1": 0})
    assert open(nlvr).read() == "test1-0-1-0,True\ntest1-0-1-1,False\n"  # identifier,prediction; no header
    assert tasks.read_predictions("nlvr2", nlvr) == {"test1-0-1-0": "True", "test1-0-1-1": "False"}
    assert tasks.prediction_file_name("nlvr2", "test") == "test_predict.csv"
    assert tasks.prediction_file_name("vqa", "minival") == "minival_predict.json"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- datasets
@pytest.fixture(scope="module")
def world():
    return demo_world()


@pytest.fixture(scope="module")
def tok(world):
    return load_tokenizer(os.path.join(world, "vocab.txt"))


def _ds(world, tok, task, splits, store_root, **kw):
    spec = tasks.task_spec(task)
    answers = tasks.TaskAnswers.load(os.path.join(world, task)) if spec.kind == "qa" else None
    return tasks.build_task_dataset(spec, world, splits, tokenizer=tok, answers=answers, store_root=store_root,
                                    log=None, **kw)


def test_vqa_batches_carry_soft_targets_and_the_top_label(world, tok):
    ds = _ds(world, tok, "vqa", "minival", os.path.join(world, "lxmert_fast"))
    recs = json.load(open(os.path.join(world, "vqa", "minival.json")))
    assert len(ds) == len(recs) and ds.examples.ids == [r["question_id"] for r in recs]
    soft = next(i for i, r in enumerate(recs) if len(r["label"]) > 1)
    rows = np.array([0, soft], np.int64)
    b = ds.make_batch(rows)
    k = len(ds.answers)
    assert b["input_ids"].shape == (2, 20) and b["attention_mask"].shape == (2, 20)
    assert b["visual_feats"].shape == (2, 36, 2048) and b["visual_pos"].shape == (2, 36, 4)
    assert b["target"].shape == (2, k)
    for j, r in enumerate(rows.tolist()):
        label = recs[r]["label"]
        expect = torch.zeros(k)
        for a, s in label.items():
            expect[ds.answers.ans2label[a]] = s
        assert torch.equal(b["target"][j], expect)
        assert ds.answers.label2ans[int(b["label"][j])] == max(label, key=label.get)
    # [CLS] ... [SEP] then padding, as the original tokenisation
    assert int(b["input_ids"][0, 0]) == tok.cls_token_id
    n = int(b["attention_mask"][0].sum())
    assert int(b["input_ids"][0, n - 1]) == tok.sep_token_id and int(b["input_ids"][0, n:].abs().sum()) == 0
    # features are the store's rows of that image
    store = ds.stores[int(ds.loc[0, 0, 0])]
    row = store.row_of(recs[0]["img_id"])
    assert torch.equal(b["visual_feats"][0], torch.from_numpy(store.read_features(np.array([row]))[0]))


def test_nlvr2_batches_hold_both_images(world, tok):
    ds = _ds(world, tok, "nlvr2", "valid", os.path.join(world, "lxmert_fast"))
    b = ds.make_batch(np.arange(3))
    assert b["visual_feats"].shape == (3, 2, 36, 2048) and b["visual_pos"].shape == (3, 2, 36, 4)
    recs = json.load(open(os.path.join(world, "nlvr2", "valid.json")))
    assert b["label"].tolist() == [r["label"] for r in recs[:3]]
    s0 = ds.stores[int(ds.loc[0, 1, 0])]
    row1 = s0.row_of(recs[0]["img1"])
    assert torch.equal(b["visual_feats"][0, 1], torch.from_numpy(s0.read_features(np.array([row1]))[0]))


def test_unlabelled_test_split_has_no_targets_but_predicts(world, tok, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(world, "gqa"), root / "gqa")
    os.makedirs(root / "vg_gqa_imgfeat")
    os.symlink(os.path.join(world, "vg_gqa_imgfeat", "gqa_testdev_obj36.tsv"),
               root / "vg_gqa_imgfeat" / "gqa_testdev_obj36.tsv")
    recs = json.load(open(root / "gqa" / "testdev.json"))
    for r in recs:
        r.pop("label")
    (root / "gqa" / "testdev.json").write_text(json.dumps(recs))
    ds = _ds(str(root), tok, "gqa", "testdev", str(root / "stores"))
    assert ds.examples.labelled == 0 and (ds.label == -100).all()
    assert tasks.evaluate("gqa", {r["question_id"]: "x" for r in recs}, ds.examples) == {}
    preds = ds.predictions_from({i: 0 for i in range(len(ds))})
    assert list(preds) == [r["question_id"] for r in recs]


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_answer_table_names_the_file(tmp_path):
    with pytest.raises(tasks.TaskDataError, match="trainval_ans2label.json"):
        tasks.TaskAnswers.load(str(tmp_path))


def test_answer_tables_that_disagree_are_an_error(tmp_path):
    (tmp_path / "trainval_ans2label.json").write_text(json.dumps({"yes": 0, "no": 1}))
    (tmp_path / "trainval_label2ans.json").write_text(json.dumps(["no", "yes"]))
    with pytest.raises(DataFormatError, match="trainval_label2ans.json.*does not agree"):
        tasks.TaskAnswers.load(str(tmp_path))
    (tmp_path / "trainval_label2ans.json").write_text(json.dumps(["yes", "no"]))
    assert tasks.TaskAnswers.load(str(tmp_path)).label2ans == ["yes", "no"]


def test_an_img_id_without_features_names_file_field_and_id(world, tok, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(world, "vqa"), root / "vqa")
    os.makedirs(root / "mscoco_imgfeat")
    os.symlink(os.path.join(world, "mscoco_imgfeat", "val2014_obj36.tsv"), root / "mscoco_imgfeat" / "val2014_obj36.tsv")
    recs = json.load(open(root / "vqa" / "minival.json"))
    recs[3]["img_id"] = "COCO_val2014_999999999999"
    (root / "vqa" / "minival.json").write_text(json.dumps(recs, indent=1))
    with pytest.raises(DataFormatError) as err:
        _ds(str(root), tok, "vqa", "minival", str(root / "stores"))
    msg = str(err.value)
    assert "minival.json" in msg and "img_id" in msg and "COCO_val2014_999999999999" in msg
    assert "val2014_obj36.tsv" in msg and err.value.line is not None
    ds = _ds(str(root), tok, "vqa", "minival", str(root / "stores"), skip_bad=True)  # skipped and reported
    assert len(ds) == len(recs) - 1 and recs[3]["question_id"] not in ds.examples.ids


def test_unknown_task_and_unknown_split_features():
    with pytest.raises(tasks.TaskDataError, match="unknown task 'okvqa'"):
        tasks.task_spec("okvqa")
    with pytest.raises(tasks.TaskDataError, match="--features"):
        tasks.feature_file(tasks.task_spec("vqa"), "/data", "test-dev2015")
    assert tasks.feature_file(tasks.task_spec("vqa"), "/data", "x", {"x": "/f/x_obj36.tsv"}) == "/f/x_obj36.tsv"
    assert tasks.feature_file(tasks.task_spec("gqa"), "/d", "submit") == "/d/vg_gqa_imgfeat/vg_gqa_obj36.tsv"
    assert tasks.feature_file(tasks.task_spec("gqa"), "/d", "testdev") == "/d/vg_gqa_imgfeat/gqa_testdev_obj36.tsv"
