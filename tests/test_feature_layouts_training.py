"""The jobs on features of another layout: VQA fine-tunes, and pre-training runs with
``--visual_losses feat``, on bottom-up-attention-vqa HDF5 files (written from the demo world's
records the way its converter writes them); the object loss on them is refused with the reason.

Short runs (the tiny model, a few steps, one thread), in this process; the demo world is the
fine-tuning tests' (tests/test_finetune_helpers.py).
"""

from __future__ import annotations

import functools
import json
import os

from lxmert_fast.data.formats import read_tsv
from lxmert_fast.data.layouts.writers import write_butd_h5
from tests.test_finetune_helpers import _tmpdir, demo_world, finetune_run, one_thread


@functools.lru_cache(maxsize=None)
def butd_files() -> tuple[str, str]:
    """``train36.hdf5`` / ``val36.hdf5`` (+ id maps) holding the demo world's COCO train2014 / val2014 images."""
    world = demo_world()
    folder = _tmpdir("lxmert-butd-")
    out = []
    for split, name in (("train2014", "train36.hdf5"), ("val2014", "val36.hdf5")):
        rows = read_tsv(os.path.join(world, "mscoco_imgfeat", f"{split}_obj36.tsv"))
        out.append(write_butd_h5(os.path.join(folder, name), rows))
    return out[0], out[1]


def _ds_config(path: str) -> str:
    from lxmert_fast.train.ds_config import packaged_config

    with open(packaged_config("cpu.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg.pop("zero_optimization", None)
    cfg.pop("tensorboard", None)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    return path


def test_vqa_fine_tunes_on_bottom_up_attention_vqa_hdf5(tmp_path):
    world = demo_world()
    train, val = butd_files()
    stores = tmp_path / "stores"
    res = finetune_run(["--task", "vqa", "--data_root", world, "--model", "tiny", "--store_dir", str(stores),
                        "--features", f"train={train},nominival={val},minival={val}", "--epochs", "1",
                        "--max_steps", "3", "--batch_size", "16", "--log_every", "1", "--output_dir", str(tmp_path / "o")])
    # the images came from the HDF5 stores (detected, ids from the file names), no TSV was converted
    assert sorted(os.listdir(stores)) == ["store-train36-butd_h5", "store-val36-butd_h5"]
    final = res["final"]["minival"]
    assert final["count"] > 0 and 0.0 <= final["score"] <= 1.0
    assert len(res["history"]) == 1


def _pretrain(tmp_path, name: str, losses: str):
    from lxmert_fast import pretrain

    world = demo_world()
    train, val = butd_files()
    argv = ["--data_root", world, "--model", "tiny", "--train", "mscoco_train", "--valid", "mscoco_minival",
            "--features", f"mscoco_train={train},mscoco_minival={val}", "--cache_dir", str(tmp_path / "cache"),
            "--store_in_cache", "--visual_losses", losses, "--max_steps", "3", "--micro_batch_size", "8",
            "--log_every", "1", "--eval_every", "0", "--eval_batches", "1", "--save_every", "0", "--no_export",
            "--grounding_eval", "no", "--no_progress", "--num_workers", "0", "--seed", "3",
            "--deepspeed_config", _ds_config(str(tmp_path / "ds.json")), "--output_dir", str(tmp_path / name)]
    with one_thread():
        return pretrain.main(argv)


def test_pretraining_with_the_feature_loss_on_bottom_up_attention_vqa_hdf5(tmp_path):
    assert _pretrain(tmp_path, "feat", "feat") == 0
    with open(tmp_path / "feat" / "model_config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    assert cfg["task_obj_predict"] and cfg["visual_feat_loss"]
    assert not cfg["visual_obj_loss"] and not cfg["visual_attr_loss"]
    stores = os.listdir(os.path.join(tmp_path, "cache", "stores"))
    assert len(stores) == 1
    assert "store-train36-butd_h5" in os.listdir(os.path.join(tmp_path, "cache", "stores", stores[0]))


def test_object_and_attribute_losses_on_features_without_labels_are_refused(tmp_path, capsys):
    assert _pretrain(tmp_path, "obj", "obj,attr,feat") == 2
    err = capsys.readouterr().err
    train, _ = butd_files()
    assert f"--visual_losses obj needs the detector's object labels, but {train}" in err
    assert "bottom-up-attention-vqa HDF5" in err and "carries no object ids or confidences" in err
    assert "--visual_losses attr needs the detector's attribute labels" in err
    assert "pre-train these features with --visual_losses feat" in err
    assert not os.path.exists(tmp_path / "obj" / "model_config.json")
