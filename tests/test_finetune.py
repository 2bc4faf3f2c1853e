"""Fine-tuning: heads and losses, every checkpoint kind --load takes, the CLI end to end on the demo world.

The accuracy test runs a real (short) pre-training with lxmert_fast.pretrain on the demo world, then
the same VQA fine-tune (the paper's recipe: lr 5e-5, 4 epochs, batch 32, warmup 10%, clip 5) from
it and from random weights, and compares both with the majority-answer baseline.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

from lxmert_fast import CheckpointError, LxmertConfig, LxmertForPreTraining
from lxmert_fast.checkpoints import task as ckpts
from lxmert_fast.model import task_heads
from lxmert_fast.checkpoints.layouts import hf_state_dict
from tests.helpers import hf_config, no_dropout, random_batch
from tests.test_finetune_helpers import demo_pretraining, demo_world, finetune_run

TINY = no_dropout(LxmertConfig.preset("tiny", num_qa_labels=11))
PRE_ANSWERS = ["yes", "no", "2", "red", "blue", "dog", "cat", "1", "green", "car", "3"]   # the checkpoint's table
TASK_ANSWERS = ["no", "two", "purple", "The Dog", "yes", "kite"]   # "two" -> "2", "The Dog" -> "dog" (normalised)
SHARED = {0: 1, 1: 2, 3: 5, 4: 0}                                   # task label -> checkpoint row


# ---------------------------------------------------------------------------------------------- losses and heads
def test_vqa_loss_is_bce_on_soft_scores_times_the_number_of_answers():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, -2.0, 0.5]])
    target = torch.tensor([[0.0, 1.0, 0.3], [0.9, 0.0, 0.0]])
    x, z = logits, target
    per = torch.clamp(x, min=0) - x * z + torch.log1p(torch.exp(-x.abs()))   # BCE with logits, elementwise
    assert task_heads.vqa_loss(logits, target).item() == pytest.approx(per.mean().item() * 3, rel=1e-6)


def test_cross_entropy_ignores_examples_without_a_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    label = torch.tensor([0, -100, 1])
    expect = (torch.nn.functional.cross_entropy(logits[[0, 2]], label[[0, 2]])).item()
    assert task_heads.ce_loss(logits, label).item() == pytest.approx(expect, rel=1e-6)
    assert task_heads.ce_loss(logits, torch.full((3,), -100)).item() == 0.0


def test_nlvr2_head_concatenates_the_pooled_outputs_of_both_images():
    torch.manual_seed(3)
    model = task_heads.LxmertForNLVR2(TINY).eval()
    b = random_batch(TINY, batch=2, tokens=6, objects=5)
    feats = torch.randn(2, 2, 5, TINY.visual_feat_dim)
    pos = torch.rand(2, 2, 5, 4)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(b["input_ids"], feats, pos, attention_mask=b["attention_mask"], labels=labels)
        pooled = [model.lxmert(input_ids=b["input_ids"], attention_mask=b["attention_mask"], visual_feats=feats[:, i],
                               visual_pos=pos[:, i]).pooled_output for i in range(2)]
        ref = model.logit_fc(torch.cat(pooled, dim=1))
    assert out.logits.shape == (2, 2)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(ref, labels), rtol=1e-5, atol=1e-6)
    assert [type(m).__name__ for m in model.logit_fc] == ["Linear", "GELU", "LayerNorm", "Linear"]
    assert model.logit_fc[0].weight.shape == (2 * TINY.hidden_size, 2 * TINY.hidden_size)
    assert model.logit_fc[3].weight.shape == (2, 2 * TINY.hidden_size)


# ---------------------------------------------------------------------------------------------- checkpoint kinds
@pytest.fixture(scope="module")
def hf_pretrained():
    torch.manual_seed(11)
    return transformers.LxmertForPreTraining(hf_config(TINY)).eval()


def _all_ans(path, answers):
    with open(path, "w") as fh:
        json.dump([{"ans": a, "dsets": ["vqa"]} for a in answers], fh)
    return str(path)


def _check_encoder(model, hf_state, prefix="lxmert."):
    ours = model.lxmert.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.visn_fc.visn_fc.weight", "pooler.dense.weight",
                "encoder.x_layers.1.lang_output.dense.weight"):
        assert torch.equal(ours[key], hf_state[prefix + key]), key
    stem = prefix + "encoder.x_layers.0.visual_attention.att."
    qkv = torch.cat([hf_state[stem + p + ".weight"] for p in ("query", "key", "value")])
    assert torch.equal(ours["encoder.x_layers.0.visual_attention.att.qkv.weight"], qkv)


def _load_vqa(path, **kw):
    ckpt = ckpts.read_task_checkpoint(path, config=kw.pop("config", None))
    model = task_heads.build_task_model("vqa", ckpt.config, len(TASK_ANSWERS))
    fresh = {k: v.clone() for k, v in model.answer_head.state_dict().items()}
    answers, where = ckpts.find_head_answers(ckpt, load_answers=kw.pop("load_answers", None), data_root=kw.pop("data_root", None))
    info = ckpts.load_task_weights("vqa", model, ckpt, task_answers=TASK_ANSWERS, head_answers=answers,
                               head_answers_source=where, log=lambda m: None, **kw)
    return ckpt, model, fresh, info


def _check_rows(model, fresh, src_w, src_b, shared):
    head = model.answer_head.state_dict()
    for label in range(len(TASK_ANSWERS)):
        if label in shared:
            assert torch.equal(head["logit_fc.3.weight"][label], src_w[shared[label]]), label
            assert torch.equal(head["logit_fc.3.bias"][label], src_b[shared[label]]), label
        else:  # kept its fresh initialisation
            assert torch.equal(head["logit_fc.3.weight"][label], fresh["logit_fc.3.weight"][label]), label


def test_hf_pretraining_directory_copies_the_rows_of_shared_answers(hf_pretrained, tmp_path):
    path = tmp_path / "lxmert-base-uncased"
    hf_pretrained.save_pretrained(path)
    _all_ans(path / "all_ans.json", PRE_ANSWERS)   # found beside the checkpoint
    ckpt, model, fresh, info = _load_vqa(str(path))
    assert ckpt.kind == "hf" and ckpt.qa_rows == 11
    assert info["copied"] == len(SHARED) and info["total"] == len(TASK_ANSWERS)
    sd = hf_pretrained.state_dict()
    _check_encoder(model, sd)
    _check_rows(model, fresh, sd["answer_head.logit_fc.3.weight"], sd["answer_head.logit_fc.3.bias"], SHARED)
    head = model.answer_head.state_dict()
    for k in ("logit_fc.0.weight", "logit_fc.0.bias", "logit_fc.2.weight", "logit_fc.2.bias"):  # hidden layers: all
        assert torch.equal(head[k], sd["answer_head." + k]), k
    # the original code zeroes the rows it cannot copy
    _, model0, _, _ = _load_vqa(str(path), unmatched="zero")
    assert model0.answer_head.state_dict()["logit_fc.3.weight"][2].abs().sum() == 0


def test_a_table_with_raw_and_normalised_forms_gives_the_normalised_row_as_the_original_code():
    """The pre-training table holds "two" and "2": the task's "two" starts from the row of "2" (the original's
    load_lxmert_qa looks up convert_ans(answer)); an answer whose normalised form is absent, as written."""
    from lxmert_fast.checkpoints.task import copy_answer_head

    table = ["two", "2", "the dog", "kite"]     # "the dog" normalises to "dog", which the table lacks
    model = task_heads.build_task_model("vqa", TINY, 3)
    hid = TINY.hidden_size
    torch.manual_seed(3)
    src = {f"logit_fc.{i}.{p}": torch.randn(*shape) for i, shapes in
           ((0, ((2 * hid, hid), (2 * hid,))), (2, ((2 * hid,), (2 * hid,))), (3, ((4, 2 * hid), (4,))))
           for p, shape in zip(("weight", "bias"), shapes)}
    info = copy_answer_head(model.answer_head, src, table, ["two", "the dog", "Kite"])
    head = model.answer_head.state_dict()
    assert info["copied"] == 3
    assert torch.equal(head["logit_fc.3.weight"][0], src["logit_fc.3.weight"][1])   # "two" -> the row of "2"
    assert torch.equal(head["logit_fc.3.weight"][1], src["logit_fc.3.weight"][2])   # "the dog" as written
    assert torch.equal(head["logit_fc.3.weight"][2], src["logit_fc.3.weight"][3])   # "Kite" -> "kite"


def test_hf_qa_directory_with_the_tasks_own_head_loads_it_whole(tmp_path):
    torch.manual_seed(12)
    qa = transformers.LxmertForQuestionAnswering(hf_config(TINY.replace(num_qa_labels=len(TASK_ANSWERS))))
    qa.save_pretrained(tmp_path / "lxmert-vqa-uncased")
    _, model, _, info = _load_vqa(str(tmp_path / "lxmert-vqa-uncased"))
    assert info["copied"] == len(TASK_ANSWERS) and info["mode"].startswith("whole head")
    sd = qa.state_dict()
    for k, v in model.answer_head.state_dict().items():
        assert torch.equal(v, sd["answer_head." + k]), k
    _check_encoder(model, sd)


@pytest.mark.parametrize("layer_norm_names", ["weight/bias", "gamma/beta"])
def test_original_epoch20_lxrt_pth(hf_pretrained, tmp_path, layer_norm_names):
    original = {}
    for key, value in hf_pretrained.state_dict().items():
        key = "module." + key.replace("lxmert.", "bert.", 1)
        if layer_norm_names == "gamma/beta" and "LayerNorm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        original[key] = value
    torch.save(original, tmp_path / "Epoch20_LXRT.pth")
    all_ans = _all_ans(tmp_path / "answers_9500.json", PRE_ANSWERS)
    # the original scripts' `--load snap/pretrained/Epoch20` (the _LXRT.pth suffix implied)
    ckpt, model, fresh, info = _load_vqa(str(tmp_path / "Epoch20"), load_answers=all_ans)
    assert ckpt.kind == "original" and ckpt.config.hidden_size == TINY.hidden_size
    assert info["copied"] == len(SHARED)
    sd = hf_pretrained.state_dict()
    _check_encoder(model, sd)
    _check_rows(model, fresh, sd["answer_head.logit_fc.3.weight"], sd["answer_head.logit_fc.3.bias"], SHARED)
    # the 9500-answer table of the data root is used when nothing else is given
    data_root = tmp_path / "data"
    os.makedirs(data_root / "lxmert")
    _all_ans(data_root / "lxmert" / "all_ans.json", PRE_ANSWERS)
    _, _, _, info = _load_vqa(str(tmp_path / "Epoch20_LXRT.pth"), data_root=str(data_root))
    assert info["copied"] == len(SHARED)


def test_original_finetuned_best_pth_for_vqa_and_nlvr2(tmp_path):
    torch.manual_seed(13)
    qa = transformers.LxmertForQuestionAnswering(hf_config(TINY.replace(num_qa_labels=len(TASK_ANSWERS))))
    sd = {("lxrt_encoder.model.bert." + k[len("lxmert."):] if k.startswith("lxmert.") else
           k[len("answer_head."):]): v for k, v in qa.state_dict().items()}
    assert "logit_fc.3.weight" in sd
    torch.save(sd, tmp_path / "BEST.pth")
    _, model, _, info = _load_vqa(str(tmp_path / "BEST.pth"))
    assert info["copied"] == len(TASK_ANSWERS)
    _check_encoder(model, qa.state_dict())
    nlvr = task_heads.LxmertForNLVR2(TINY)
    sd = {("lxrt_encoder.model.bert." + k[len("lxmert."):]
           if k.startswith("lxmert.") else k): v for k, v in hf_state_dict(nlvr).items()}
    torch.save(sd, tmp_path / "NLVR2_BEST.pth")
    ckpt = ckpts.read_task_checkpoint(str(tmp_path / "NLVR2_BEST.pth"))
    fresh = task_heads.LxmertForNLVR2(ckpt.config)
    ckpts.load_task_weights("nlvr2", fresh, ckpt, task_answers=None, log=lambda m: None)
    for (k, a), b in zip(nlvr.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_our_save_pretrained_and_bad_checkpoints(tmp_path):
    torch.manual_seed(14)
    ours = LxmertForPreTraining(TINY)
    ours.save_pretrained(tmp_path / "ours")
    ckpt = ckpts.read_task_checkpoint(str(tmp_path / "ours"))
    model = task_heads.build_task_model("nlvr2", ckpt.config)
    ckpts.load_task_weights("nlvr2", model, ckpt, task_answers=None, log=lambda m: None)
    for k, v in ours.lxmert.state_dict().items():
        assert torch.equal(model.lxmert.state_dict()[k], v), k
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        ckpts.read_task_checkpoint(str(tmp_path / "junk.pth"))
    with pytest.raises(CheckpointError, match="no such file"):
        ckpts.read_task_checkpoint(str(tmp_path / "missing"))
    wrong = _all_ans(tmp_path / "wrong.json", PRE_ANSWERS[:5])
    with pytest.raises(CheckpointError, match="5 answers.*11 rows"):
        ckpts.find_head_answers(ckpt, load_answers=wrong)
    small_vocab = TINY.vocab_size - 1
    ckpts.check_config_fits(ckpt.config, vocab_size=small_vocab, feat_dim=TINY.visual_feat_dim, source="x")
    with pytest.raises(CheckpointError, match="visual_feat_dim"):
        ckpts.check_config_fits(ckpt.config, vocab_size=small_vocab, feat_dim=2048, source="x")


@pytest.mark.slow
def test_our_pretraining_output_export_and_deepspeed_checkpoints_load_the_same_weights():
    out = demo_pretraining()
    # no ZeRO, fp32: DeepSpeed computes no gradient norm; the job measures it on logging steps
    with open(os.path.join(out, "result.json")) as fh:
        history = json.load(fh)["log"]
    assert history and all(r["grad_norm"] is not None and 0 < r["grad_norm"] < 1e4 for r in history), history
    export = ckpts.read_task_checkpoint(out)                     # the output dir -> its hf export
    assert export.kind == "hf" and export.path.endswith("hf")
    ds_dir = ckpts.read_task_checkpoint(os.path.join(out, "checkpoints"))   # `latest`
    with open(os.path.join(out, "checkpoints", "latest")) as fh:
        tag = fh.read().strip()
    ds_tag = ckpts.read_task_checkpoint(os.path.join(out, "checkpoints", tag))
    for ck in (ds_dir, ds_tag):
        assert ck.kind == "deepspeed" and ck.path.endswith("mp_rank_00_model_states.pt")
        assert ck.config.hidden_size == export.config.hidden_size and ck.qa_rows == export.qa_rows
        assert set(ck.encoder) == set(export.encoder)
        for k, v in export.encoder.items():
            assert torch.equal(ck.encoder[k], v), k
    answers, where = ckpts.find_head_answers(export, data_root=demo_world())
    assert where == os.path.join(out, "hf", "answers.json") and len(answers) == export.qa_rows  # written by the export


# ---------------------------------------------------------------------------------------------- the CLI
def _score(result, split="minival"):
    return result["final"][split]["score"]


@pytest.mark.slow
def test_demo_finetune_from_pretraining_beats_majority_and_random_init(tmp_path):
    world, pre = demo_world(), demo_pretraining()
    common = ["--task", "vqa", "--data_root", world, "--log_every", "1000", "--seed", "5"]
    from_pre = finetune_run(common + ["--load", pre, "--output_dir", str(tmp_path / "pre")])
    from_random = finetune_run(common + ["--model_config", os.path.join(pre, "hf", "config.json"),
                                         "--output_dir", str(tmp_path / "random")])
    majority = from_pre["majority"]["score"]
    s_pre, s_rand = _score(from_pre), _score(from_random)
    print(f"demo VQA minival: majority {majority:.3f}, from pre-training {s_pre:.3f}, from random {s_rand:.3f}; "
          f"{from_pre['train_samples_per_s']:.1f} samples/s")
    assert s_pre >= majority + 0.08, (s_pre, majority)
    assert s_pre >= s_rand + 0.08, (s_pre, s_rand)
    # the paper's recipe, read back from the engine
    st = from_pre["settings"]
    assert (st["train_batch_size"], st["lr"], st["gradient_clipping"]) == (32, 5e-5, 5.0)
    assert len(from_pre["history"]) == 4 and from_pre["train_samples_per_s"] > 0
    assert "copied" in from_pre["load_info"] and from_pre["load_info"]["copied"] > 0
    # evaluated at each epoch; the best kept; predictions in the official format
    best = from_pre["best"]
    assert best["score"] == max(r["valid"]["score"] for r in from_pre["history"]) == pytest.approx(s_pre)
    assert sorted(os.listdir(tmp_path / "pre" / "best")) == ["answers.json", "config.json", "finetune.json",
                                                             "model.safetensors"]
    pred_file = from_pre["predictions"]["minival"]
    rows = json.load(open(pred_file))
    minival = json.load(open(os.path.join(world, "vqa", "minival.json")))
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in minival]
    assert set(rows[0]) == {"question_id", "answer"}
    # --test with the best model: no training, the same predictions, scored on the labelled split
    again = finetune_run(["--task", "vqa", "--data_root", world, "--load", str(tmp_path / "pre" / "best"),
                          "--test", "minival", "--output_dir", str(tmp_path / "test")])
    assert "history" not in again
    assert json.load(open(again["predictions"]["minival"])) == rows
    assert again["final"]["minival"]["score"] == pytest.approx(s_pre)


def test_gqa_and_nlvr2_fine_tune_end_to_end(tmp_path):
    world, pre = demo_world(), demo_pretraining()
    gqa = finetune_run(["--task", "gqa", "--data_root", world, "--load", os.path.join(pre, "hf"), "--epochs", "1",
                        "--output_dir", str(tmp_path / "gqa"), "--test", "testdev", "--train", "train,valid"])
    assert gqa["settings"]["lr"] == 1e-5 and gqa["load_info"]["copied"] > 0
    assert set(gqa["final"]["testdev"]) == {"accuracy", "count"}
    rows = json.load(open(gqa["predictions"]["testdev"]))
    assert set(rows[0]) == {"questionId", "prediction"} and isinstance(rows[0]["questionId"], str)
    nlvr = finetune_run(["--task", "nlvr2", "--data_root", world, "--load", os.path.join(pre, "checkpoints"),
                         "--epochs", "2", "--batch_size", "16", "--output_dir", str(tmp_path / "nlvr2")])
    assert nlvr["settings"]["train_batch_size"] == 16 and len(nlvr["history"]) == 2
    res = nlvr["final"]["valid"]
    assert set(res) == {"accuracy", "consistency", "count", "groups"}
    lines = open(nlvr["predictions"]["valid"]).read().splitlines()
    valid = json.load(open(os.path.join(world, "nlvr2", "valid.json")))
    assert [ln.split(",")[0] for ln in lines] == [r["identifier"] for r in valid]
    assert {ln.split(",")[1] for ln in lines} <= {"True", "False"}
    # an unlabelled test split (the real NLVR2 test has labels withheld): predictions, no scores
    root = tmp_path / "data"
    os.makedirs(root / "nlvr2")
    os.makedirs(root / "nlvr2_imgfeat")
    os.symlink(os.path.join(world, "nlvr2_imgfeat", "valid_obj36.tsv"), root / "nlvr2_imgfeat" / "test_obj36.tsv")
    os.symlink(os.path.join(world, "vocab.txt"), root / "vocab.txt")
    test = [{k: v for k, v in r.items() if k != "label"} for r in valid]
    (root / "nlvr2" / "test.json").write_text(json.dumps(test))
    pred = finetune_run(["--task", "nlvr2", "--data_root", str(root), "--load", str(tmp_path / "nlvr2" / "best"),
                         "--test", "test", "--output_dir", str(tmp_path / "nlvr2_test")])
    assert pred["final"] == {"test": {}} and pred["predictions"]["test"].endswith("test_predict.csv")
    assert open(pred["predictions"]["test"]).read() == "\n".join(lines) + "\n"  # the same model, the same answers


def test_cli_errors_are_clear(tmp_path, capsys):
    from lxmert_fast import finetune

    with pytest.raises(SystemExit):
        finetune.build_parser().parse_args(["--task", "okvqa"])
    assert "invalid choice: 'okvqa'" in capsys.readouterr().err
    # a data root whose VQA folder lacks the answer table
    world = demo_world()
    root = tmp_path / "data"
    os.makedirs(root / "vqa")
    for name in ("train.json", "minival.json", "nominival.json"):
        os.symlink(os.path.join(world, "vqa", name), root / "vqa" / name)
    os.symlink(os.path.join(world, "vocab.txt"), root / "vocab.txt")
    assert finetune.main(["--task", "vqa", "--data_root", str(root), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "answer table missing" in err and "trainval_ans2label.json" in err
    # a flag that contradicts a value the DeepSpeed config fixes (cpu.json fixes nothing of those: a config that does)
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_batch_size": 32, "gradient_clipping": 1.0,
                                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}))
    assert finetune.main(["--task", "vqa", "--lr", "5e-5", "--deepspeed_config", str(fixed), "--data_root", world,
                          "--output_dir", str(tmp_path / "o2")]) == 2
    assert "--lr 5e-05 contradicts the DeepSpeed config's optimizer.params.lr = 0.0001" in capsys.readouterr().err


def test_demo_objects_does_not_apply_with_a_data_root(tmp_path):
    from lxmert_fast.finetune import UsageError

    with pytest.raises(UsageError, match="--demo_objects shapes the demo world"):
        finetune_run(["--task", "vqa", "--data_root", str(tmp_path), "--demo_objects", "1"])
