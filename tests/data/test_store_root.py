"""One store per feature file under a store root, shared by pre-training and the tasks, found again by
its source fingerprint; several stores read as one set."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from lxmert_fast.data import convert as convert_cli
from lxmert_fast.data import tsv_convert
from lxmert_fast.data.formats import DataFormatError
from lxmert_fast.data.pretrain_data import build_pretrain_dataset, build_pretrain_index
from lxmert_fast.data.store import FeatureStore, RowWriter, StoreError, finalize_store
from lxmert_fast.data.store_root import ensure_store, store_dir_for
from lxmert_fast.data.store_set import StoreSet

from .conftest import tsv_lines, write_lines


@pytest.fixture
def conversions(monkeypatch):
    """Every conversion (the files of each call), counted by wrapping the converter."""
    calls: list[list[str]] = []
    real = tsv_convert.convert_tsvs

    def counting(tsvs, out, **kw):
        calls.append([os.path.basename(p) for p in tsvs])
        return real(tsvs, out, **kw)

    monkeypatch.setattr(tsv_convert, "convert_tsvs", counting)
    return calls


def test_pretraining_then_tasks_convert_each_feature_file_once(demo_root, tmp_path, conversions):
    """Pre-training converts each of its files into its own store; its held-out split and VQA
    fine-tuning on the same store root convert nothing; GQA converts only the file it adds."""
    from lxmert_fast.data import tasks
    from lxmert_fast.data.tokenization import load_tokenizer

    root = str(tmp_path / "stores")
    train = build_pretrain_dataset(demo_root, store_dir=root, log=None)
    assert sorted(map(tuple, conversions)) == [("train2014_obj36.tsv",), ("val2014_obj36.tsv",),
                                                 ("vg_gqa_obj36.tsv",)]
    assert train.store.paths == [os.path.join(root, f"store-{n}") for n in ("train2014", "val2014", "vg_gqa")]
    assert train.index.path.startswith(os.path.join(root, "sentences") + os.sep)
    valid = build_pretrain_dataset(demo_root, "mscoco_minival", store_dir=root, log=None)
    assert valid.store.paths == [os.path.join(root, "store-val2014")] and len(conversions) == 3
    tok = load_tokenizer(os.path.join(demo_root, "vocab.txt"))

    def task(name, splits):
        spec = tasks.task_spec(name)
        answers = tasks.TaskAnswers.load(os.path.join(demo_root, name))
        return tasks.build_task_dataset(spec, demo_root, splits, tokenizer=tok, answers=answers, store_root=root,
                                        require_label=True, log=None)

    vqa = task("vqa", "train,nominival,minival")
    assert len(conversions) == 3                       # train2014 and val2014: pre-training's stores
    assert sorted(s.path for s in vqa.stores) == train.store.paths[:2]
    task("gqa", "train,testdev")
    assert conversions[3:] == [["gqa_testdev_obj36.tsv"]]  # vg_gqa reused, the testdev file is new
    assert sorted(os.listdir(root)) == ["sentences", "store-gqa_testdev", "store-train2014", "store-val2014",
                                        "store-vg_gqa"]
    # the same features whichever job reads them
    img_id = vqa.examples.img_ids[0][0]
    row = train.store.row_of(img_id)
    b = vqa.make_batch(np.array([0]))
    np.testing.assert_array_equal(b["visual_feats"][0].numpy(), train.store.read_features([row])[0])


def test_store_found_again_by_its_source_fingerprint(demo_root, tmp_path, conversions):
    """A renamed or moved feature file (or its copy in another data root) finds the store converted
    from its content: no second conversion. Another dtype is another store."""
    tsv = os.path.join(demo_root, "mscoco_imgfeat", "val2014_obj36.tsv")
    root = str(tmp_path / "stores")
    st = ensure_store(tsv, root, log=None)
    assert st.path == store_dir_for(tsv, root) and len(conversions) == 1
    renamed = str(tmp_path / "elsewhere" / "coco_val_renamed_obj36.tsv")
    os.makedirs(os.path.dirname(renamed))
    shutil.copyfile(tsv, renamed)
    logged = []
    again = ensure_store(renamed, root, log=logged.append)
    assert again.path == st.path and len(conversions) == 1
    assert any("same fingerprint" in m for m in logged)
    again.check_sources([renamed])                     # the fingerprint, not the name, matches
    # without converting: found, or an error naming what is missing
    assert ensure_store(renamed, root, convert=False, log=None).path == st.path
    other = os.path.join(demo_root, "mscoco_imgfeat", "train2014_obj36.tsv")
    with pytest.raises(StoreError, match=r"no converted store of .*train2014_obj36.tsv"):
        ensure_store(other, root, convert=False, log=None)
    fp32 = ensure_store(renamed, root, fp32=True, log=None)
    assert fp32.path == os.path.join(root, "store-coco_val_renamed-fp32") and fp32.feat_dtype == "float32"
    assert len(conversions) == 2


def test_same_name_other_content_is_an_error_naming_both_files(demo_root, tmp_path, conversions):
    tsv = os.path.join(demo_root, "mscoco_imgfeat", "val2014_obj36.tsv")
    root = str(tmp_path / "stores")
    ensure_store(tsv, root, log=None)
    regenerated = write_lines(str(tmp_path / "other_root" / "mscoco_imgfeat" / "val2014_obj36.tsv"),
                              tsv_lines(tsv)[:-1])   # one image fewer: other content, same name
    with pytest.raises(StoreError) as ei:
        ensure_store(regenerated, root, log=None)
    msg = str(ei.value)
    assert tsv in msg and regenerated in msg and "delete" in msg
    assert len(conversions) == 1                       # never converted twice, never read


def test_stores_of_earlier_versions_and_of_another_dtype(demo_root, tmp_path, conversions):
    """A single-file store written before fingerprints were recorded is found by its file's path and
    size; a store of the same file in another dtype under the asked-for name is an error, not a read."""
    import json
    tsv = os.path.join(demo_root, "mscoco_imgfeat", "val2014_obj36.tsv")
    root = str(tmp_path / "stores")
    st = ensure_store(tsv, root, log=None)
    mpath = os.path.join(st.path, "manifest.json")
    m = json.load(open(mpath))
    del m["sources"][0]["fingerprint"]
    json.dump(m, open(mpath, "w"))
    assert ensure_store(tsv, root, log=None).path == st.path and len(conversions) == 1
    os.rename(st.path, os.path.join(root, "store-val2014-fp32"))
    with pytest.raises(StoreError, match="store-val2014-fp32: a store of .*val2014_obj36.tsv with float16 features, "
                                         "float32 asked for"):
        ensure_store(tsv, root, fp32=True, log=None)


def test_a_combined_store_of_an_earlier_version_is_not_used(demo_root, pretrain_tsvs, tmp_path, conversions):
    root = str(tmp_path / "stores")
    tsv_convert.convert_tsvs(pretrain_tsvs, os.path.join(root, "store-train2014+val2014+vg_gqa"), workers=1,
                             progress=False, log=None)
    logged = []
    st = ensure_store(pretrain_tsvs[0], root, log=logged.append)
    assert st.path == os.path.join(root, "store-train2014") and len(st.sources) == 1
    assert any("store-train2014+val2014+vg_gqa: a store of several feature files" in m for m in logged)


def test_store_set_reads_as_the_files_converted_together(pretrain_ds, demo_store):
    """The set of per-file stores has the rows of one store converted from the same files in the
    same order: features, per-object arrays and img_ids agree row for row, in any batch order."""
    sset = pretrain_ds.store
    assert len(sset.stores) == 3 and sset.num_images == demo_store.num_images
    assert (sset.num_boxes, sset.feat_dim, sset.feat_dtype) == (36, 2048, "float16")
    np.testing.assert_array_equal(sset.img_ids, demo_store.img_ids)
    assert sset.index() == demo_store.index()
    rng = np.random.default_rng(0)
    cuts = sset.offsets[1:-1]
    for rows in (rng.permutation(sset.num_images)[:50], np.arange(cuts[0] - 5, cuts[1] + 5),  # runs across stores
                 np.concatenate([np.arange(cuts[1], cuts[1] + 4), np.arange(0, 4)])[::-1], np.array([], int)):
        np.testing.assert_array_equal(sset.read_features(rows), demo_store.read_features(rows))
        for name in ("boxes", "obj_ids", "attr_conf", "img_h"):
            np.testing.assert_array_equal(sset.take(name, rows), np.asarray(demo_store.array(name)[rows]))
        out = np.zeros((len(rows), 36), np.int64)
        np.testing.assert_array_equal(sset.take("obj_ids", rows, out=out), demo_store.array("obj_ids")[rows])
    with pytest.raises(IndexError):
        sset.read_features([sset.num_images])
    # a batch of the dataset holds each item's image, identified across stores by its global row
    b = pretrain_ds.make_batch(np.arange(0, len(pretrain_ds), 7), rng)
    img = b["img_index"].numpy()
    assert len({int(sset.locate(img)[0][i]) for i in range(len(img))}) == 3
    np.testing.assert_array_equal(b["visual_feats"].numpy(), demo_store.read_features(img))
    np.testing.assert_array_equal(b["obj_ids"].numpy(), demo_store.array("obj_ids")[img])


def _tiny_store(d: str, ids: list[str], feat_dim: int = 8) -> FeatureStore:
    os.makedirs(d)
    w = RowWriter.create(d, len(ids), 4, feat_dim, "float16")
    bufs = w.buffers(len(ids))
    bufs["src_line"][:] = np.arange(1, len(ids) + 1)
    w.write(0, bufs, len(ids))
    w.close()
    src = [{"path": d + ".tsv", "bytes": 1, "lines": len(ids), "fingerprint": d}]
    finalize_store(d, w, num_images=len(ids), num_boxes=4, feat_dim=feat_dim, feat_dtype="float16",
                   img_ids=ids, extra={"sources": src}, checksum=False)
    return FeatureStore.open(d)


def test_store_set_refuses_stores_that_disagree_and_duplicate_images(tmp_path):
    a = _tiny_store(str(tmp_path / "a"), ["x", "y"])
    b = _tiny_store(str(tmp_path / "b"), ["z", "y"])
    wide = _tiny_store(str(tmp_path / "wide"), ["w"], feat_dim=16)
    with pytest.raises(StoreError, match=r"disagree on feat_dim: .*/a has 8, .*/wide has 16"):
        StoreSet([a, wide])
    sset = StoreSet([a, b])
    assert sset.root == str(tmp_path)
    with pytest.raises(DataFormatError, match=r"b\.tsv:2: field 'img_id': img_id 'y' also has features in .*a\.tsv:2"):
        sset.index()
    assert sset.index(skip_bad=True) == {"x": 0, "y": 1, "z": 2}   # the first store keeps it
    assert len(sset.duplicates()) == 1


def test_store_set_index_key_follows_content_not_place(pretrain_ds, demo_root, tmp_path):
    """The sentence index lives under the store root, keyed by the set's content: a copied store root
    opens the same index key; a dataset refuses an index of other stores."""
    from lxmert_fast.data.pretrain_data import PretrainDataset
    sset = pretrain_ds.store
    copy = str(tmp_path / "copy")
    shutil.copytree(sset.root, copy, ignore=shutil.ignore_patterns("sentences"))
    moved = StoreSet([FeatureStore.open(os.path.join(copy, os.path.basename(p))) for p in sset.paths])
    assert moved.root == copy and moved.key == sset.key
    PretrainDataset(moved, pretrain_ds.index)           # same content: the index fits
    val = StoreSet([moved.stores[1]])
    with pytest.raises(ValueError, match="built for the stores"):
        PretrainDataset(val, pretrain_ds.index)
    idx = build_pretrain_index(demo_root, "mscoco_minival", val, os.path.join(demo_root, "vocab.txt"), log=None)
    assert idx.path.startswith(os.path.join(copy, "sentences") + os.sep) and idx.meta["stores"] == val.paths


def test_convert_cli_store_root(demo_root, tmp_path, conversions, capsys):
    tsvs = [os.path.join(demo_root, "nlvr2_imgfeat", f"{s}_obj36.tsv") for s in ("valid", "train")]
    root = str(tmp_path / "stores")
    assert convert_cli.main([*tsvs, "--store-root", root, "--workers", "1", "--no-progress"]) == 0
    assert convert_cli.main([*tsvs, "--store-root", root, "--no-progress"]) == 0   # found: nothing converted
    assert conversions == [["valid_obj36.tsv"], ["train_obj36.tsv"]]
    assert sorted(os.listdir(root)) == ["store-train", "store-valid"]
    assert "store-valid" in capsys.readouterr().out
