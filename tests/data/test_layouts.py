"""Region features in the layouts other tools write: each converts into the same store as the TSV of
the same records (field by field, features to the bit); bad records are errors naming the file, the
key and the field; pickles never run code; the store root finds a layout's store again.

Every file here is written the way the named tool writes it (lxmert_fast/data/layouts/writers.py), from the
demo world's TSV records.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from lxmert_fast.data.tsv_convert import convert_tsvs
from lxmert_fast.data.formats import BadRowLog, DataFormatError, ObjRow, read_tsv, write_tsv_row
from lxmert_fast.data.layouts import FeaturesMap, LayoutError, detect_layout, open_reader
from lxmert_fast.data.layouts.convert import convert_source
from lxmert_fast.data.layouts.safe_pickle import safe_loads
from lxmert_fast.data.store import FeatureStore, StoreError
from lxmert_fast.data.store_root import ensure_store

from lxmert_fast.data.layouts import writers as W

ROW_FIELDS = ("features", "boxes", "img_h", "img_w", "num_boxes")
LABEL_FIELDS = {"objects": ("obj_ids", "obj_conf"), "attributes": ("attr_ids", "attr_conf")}
ALL_LABELS = {"objects": True, "attributes": True}
OBJECTS_ONLY = {"objects": True, "attributes": False}
NO_LABELS = {"objects": False, "attributes": False}


@pytest.fixture(scope="module")
def records(demo_root) -> list[ObjRow]:
    rows = read_tsv(os.path.join(demo_root, "mscoco_imgfeat", "train2014_obj36.tsv"))
    return rows[:24]


def _tsv(path: str, rows) -> str:
    with open(path, "wb") as f:
        for r in rows:
            write_tsv_row(f, r.img_id, r.img_h, r.img_w, r.obj_ids_n, r.obj_conf_n, r.attr_ids_n, r.attr_conf_n,
                          r.boxes_n4, r.feats_nd)
    return path


def _tsv_store(tmp_path, rows, **kw) -> FeatureStore:
    out = str(tmp_path / "tsv_store")
    convert_tsvs([_tsv(str(tmp_path / "same_obj36.tsv"), rows)], out, workers=1, progress=False, log=None, **kw)
    return FeatureStore.open(out, verify=True)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype.kind == "f" else a


def assert_same_store(got: FeatureStore, ref: FeatureStore, labels: dict) -> None:
    """Every image of ``ref`` in ``got`` with the same features (bit for bit), boxes, sizes, box count
    and the labels ``got`` carries; the labels it does not carry are zeros."""
    assert sorted(got.img_ids.tolist()) == sorted(ref.img_ids.tolist())
    assert (got.num_boxes, got.feat_dim, got.feat_dtype) == (ref.num_boxes, ref.feat_dim, ref.feat_dtype)
    assert got.labels == labels
    rows = np.array([got.row_of(i) for i in ref.img_ids.tolist()])
    for name in ROW_FIELDS:
        np.testing.assert_array_equal(_bits(np.asarray(got.array(name))[rows]), _bits(np.asarray(ref.array(name))),
                                      err_msg=name)
    for kind, names in LABEL_FIELDS.items():
        for name in names:
            g = np.asarray(got.array(name))[rows]
            if labels[kind]:
                np.testing.assert_array_equal(_bits(g), _bits(np.asarray(ref.array(name))), err_msg=name)
            else:
                assert not g.any(), name


# ---------------------------------------------------------------------------------------------- equal stores
LAYOUT_CASES = {
    # case: (layout detected, writer, labels the store carries)
    "bua_npz": ("bua_npz", lambda d, rows: W.write_bua_npz(d + "/feats", rows), ALL_LABELS),
    "bua_npz_objects_only": ("bua_npz", lambda d, rows: W.write_bua_npz(d + "/feats", rows, attributes=False),
                             OBJECTS_ONLY),
    "bua_npz_mcan_transposed_no_info": (
        "bua_npz", lambda d, rows: W.write_bua_npz(d + "/feats", rows, info=False, transpose=True), NO_LABELS),
    "vlt5_h5": ("vlt5_h5", lambda d, rows: W.write_vlt5_h5(d + "/train2014_obj36.h5", rows), ALL_LABELS),
    "butd_h5": ("butd_h5", lambda d, rows: W.write_butd_h5(d + "/train36.hdf5", rows), NO_LABELS),
    "butd_h5_adaptive": ("butd_h5", lambda d, rows: W.write_butd_h5(d + "/train.hdf5", rows, adaptive=True,
                                                                    pickle_protocol=4), NO_LABELS),
    "mmf_npy": ("mmf_npy", lambda d, rows: W.write_mmf_npy(d + "/feats", rows), OBJECTS_ONLY),
    "mmf_npy_background_extra_rows": (
        "mmf_npy", lambda d, rows: W.write_mmf_npy(d + "/feats", rows, background=True, extra_rows=5), OBJECTS_ONLY),
    "vilbert_npy": ("mmf_npy", lambda d, rows: W.write_mmf_npy(d + "/feats", rows, vilbert=True), OBJECTS_ONLY),
    "mmf_lmdb": ("mmf_lmdb", lambda d, rows: W.write_mmf_lmdb(d + "/feats.lmdb", rows, subfolder="train2014"),
                 OBJECTS_ONLY),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_each_layout_converts_to_the_store_of_the_same_records_as_tsv(case, records, tmp_path):
    layout, write, labels = LAYOUT_CASES[case]
    ref = _tsv_store(tmp_path, records)
    src = write(str(tmp_path), records)
    assert detect_layout(src) == layout
    man = convert_source(src, str(tmp_path / "store"), progress=False, log=None)
    got = FeatureStore.open(str(tmp_path / "store"), verify=True)
    assert man["layout"] == got.layout == layout and man["sources"][0]["records"] == len(records)
    assert_same_store(got, ref, labels)


def test_variable_box_counts_pad_as_the_tsv_does(records, tmp_path):
    """Adaptive layouts (10-100 boxes an image): with --num-boxes K both the TSV and the layout pad to K,
    and the stores agree (num_boxes per image included); without it a count other than the first
    record's is an error naming the record."""
    rows = [r._replace(num_boxes=10 + i, obj_ids_n=r.obj_ids_n[:10 + i], obj_conf_n=r.obj_conf_n[:10 + i],
                       attr_ids_n=r.attr_ids_n[:10 + i], attr_conf_n=r.attr_conf_n[:10 + i],
                       boxes_n4=r.boxes_n4[:10 + i], feats_nd=r.feats_nd[:10 + i]) for i, r in enumerate(records[:8])]
    ref = _tsv_store(tmp_path, rows, num_boxes=36)
    for name, src, labels in (("ban", W.write_butd_h5(str(tmp_path / "train.hdf5"), rows, adaptive=True), NO_LABELS),
                              ("npz", W.write_bua_npz(str(tmp_path / "npz"), rows), ALL_LABELS)):
        convert_source(src, str(tmp_path / f"store_{name}"), num_boxes=36, progress=False, log=None)
        got = FeatureStore.open(str(tmp_path / f"store_{name}"))
        assert_same_store(got, ref, labels)
        assert sorted(np.asarray(got.array("num_boxes")).tolist()) == list(range(10, 18))
        with pytest.raises(DataFormatError, match=r"field 'num_boxes': 1\d boxes, but the store holds 1\d"):
            convert_source(src, str(tmp_path / f"strict_{name}"), progress=False, log=None)


def test_butd_image_ids_follow_the_file_name_or_the_features_map(records, tmp_path):
    rows = records[:4]
    src = W.write_butd_h5(str(tmp_path / "val36.hdf5"), rows)
    convert_source(src, str(tmp_path / "rule"), progress=False, log=None)
    ids = [W.coco_int_id(r.img_id) for r in rows]
    assert sorted(FeatureStore.open(str(tmp_path / "rule")).img_ids.tolist()) == \
        sorted(f"COCO_val2014_{i:012d}" for i in ids)  # the split from the file name, not the records'
    fmap = tmp_path / "map.json"
    fmap.write_text(json.dumps({"format": "%d", "ids": {str(ids[0]): "first-image"}}))
    convert_source(src, str(tmp_path / "mapped"), features_map=FeaturesMap.load(str(fmap)), progress=False, log=None)
    got = FeatureStore.open(str(tmp_path / "mapped"))
    assert sorted(got.img_ids.tolist()) == sorted(["first-image"] + [str(i) for i in ids[1:]])
    assert got.manifest["features_map"]["path"] == str(fmap)


def test_butd_without_spatial_features_needs_the_image_sizes(records, tmp_path):
    rows = records[:3]
    src = W.write_butd_h5(str(tmp_path / "train36.hdf5"), rows, spatial=False)
    with pytest.raises(DataFormatError) as e:
        convert_source(src, str(tmp_path / "s"), progress=False, log=None)
    assert (e.value.path, e.value.field) == (src, "spatial_features") and e.value.key == str(W.coco_int_id(rows[1].img_id))
    assert "image_sizes" in str(e.value) and not os.path.exists(tmp_path / "s")
    fmap = tmp_path / "sizes.json"
    fmap.write_text(json.dumps({"image_sizes": {str(W.coco_int_id(r.img_id)): [r.img_h, r.img_w] for r in rows}}))
    convert_source(src, str(tmp_path / "s"), features_map=FeaturesMap.load(str(fmap)), progress=False, log=None)
    st = FeatureStore.open(str(tmp_path / "s"))
    by_id = {r.img_id: (r.img_h, r.img_w) for r in rows}
    assert [(int(st.img_h[i]), int(st.img_w[i])) for i in range(3)] == [by_id[x] for x in st.img_ids.tolist()]


def test_a_features_map_is_checked(tmp_path):
    bad = tmp_path / "bad.json"
    for text, field in (('{"format": "COCO_%d_%d"}', "format"), ('{"ids": {"1": 2}}', "ids"),
                        ('{"image_sizes": {"1": [0, 5]}}', "image_sizes['1']"), ('{"idz": {}}', "idz")):
        bad.write_text(text)
        with pytest.raises(DataFormatError) as e:
            FeaturesMap.load(str(bad))
        assert (e.value.path, e.value.field) == (str(bad), field)


# ---------------------------------------------------------------------------------------------- bad records
class _RunsCode:
    """Unpickling this calls os.system (touching a marker file): the pickle that must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_npz(path, **arrays):
    """An .npz member by member (np.savez would refuse nothing: it pickles objects too)."""
    np.savez_compressed(path, **arrays)


def test_malformed_records_name_file_key_and_field(records, tmp_path):
    r = records[0]
    cases = []
    # npz: a missing entry, a wrong shape, a box outside the image
    d = str(tmp_path / "npz_missing")
    W.write_bua_npz(d, records[:2])
    _zip_npz(os.path.join(d, r.img_id + ".npz"), x=r.feats_nd, num_bbox=r.num_boxes, image_h=r.img_h, image_w=r.img_w)
    cases.append((d, os.path.join(d, r.img_id + ".npz"), r.img_id, "bbox", "missing"))
    d = str(tmp_path / "npz_shape")
    W.write_bua_npz(d, records[:2])
    _zip_npz(os.path.join(d, r.img_id + ".npz"), x=r.feats_nd[:, :100], bbox=r.boxes_n4, num_bbox=r.num_boxes,
             image_h=r.img_h, image_w=r.img_w)
    cases.append((d, os.path.join(d, r.img_id + ".npz"), r.img_id, "x", r"expected \(36, 2048\) or \(2048, 36\)"))
    # VL-T5: a box outside the image
    outside = records[1]._replace(boxes_n4=records[1].boxes_n4 + np.float32([0, 0, 5000, 0]))
    p = W.write_vlt5_h5(str(tmp_path / "v.h5"), [records[0], outside])
    cases.append((p, p, outside.img_id, "boxes", r"object 0: box .* outside the \d+x\d+ \(w x h\) image"))
    # VL-T5: a label out of the detector's range
    bad_id = records[1]._replace(attr_ids_n=np.full(36, 400, np.int64))
    p = W.write_vlt5_h5(str(tmp_path / "v2.h5"), [records[0], bad_id])
    cases.append((p, p, bad_id.img_id, "attr_id", r"id 400 outside \[0, 400\)"))
    # bottom-up-attention-vqa: boxes that no image size fits
    p = W.write_butd_h5(str(tmp_path / "train36.hdf5"), records[:2], shuffle=False)
    import h5py
    with h5py.File(p, "r+") as f:
        f["spatial_features"][1, 3, 2] += 0.01
    cases.append((p, p, str(W.coco_int_id(records[1].img_id)), "spatial_features",
                  "object 3: the boxes and the normalised spatial features disagree"))
    # MMF: a missing info entry
    d = str(tmp_path / "mmf")
    W.write_mmf_npy(d, records[:2])
    info = W.mmf_info(records[1])
    del info["image_height"]
    np.save(os.path.join(d, records[1].img_id + "_info.npy"), info)
    cases.append((d, os.path.join(d, records[1].img_id + ".npy"), records[1].img_id, "image_height", "missing"))
    for src, path, key, field, msg in cases:
        with pytest.raises(DataFormatError, match=msg) as e:
            convert_source(src, str(tmp_path / "out"), progress=False, log=None)
        assert (e.value.path, e.value.key, e.value.field) == (path, key, field), str(e.value)
        assert str(e.value).startswith(f"{path}: key {key!r}: field '{field}'")
        assert not os.path.exists(tmp_path / "out")
    # --skip-bad: the other records are converted, the bad one is listed with its key
    man = convert_source(cases[0][0], str(tmp_path / "skipped"), skip_bad=True, progress=False, log=None)
    assert man["num_images"] == 1 and man["skipped_rows"] == 1
    assert man["labels"] == ALL_LABELS  # read off the first good record, not the bad first one
    with open(tmp_path / "skipped" / "skipped_rows.tsv") as f:
        header, row = f.read().splitlines()
    assert header.split("\t") == ["file", "line", "field", "message", "key"]
    assert row.split("\t")[2] == "bbox" and row.split("\t")[4] == r.img_id


def test_pickles_that_would_run_code_are_refused_and_nothing_runs(records, tmp_path):
    marker = str(tmp_path / "ran")
    evil = _RunsCode(marker)
    r = records[0]
    # bottom-up-attention.pytorch: the info entry
    d = str(tmp_path / "npz")
    W.write_bua_npz(d, records[:2])
    _zip_npz(os.path.join(d, r.img_id + ".npz"), x=r.feats_nd, bbox=r.boxes_n4, num_bbox=r.num_boxes,
             image_h=r.img_h, image_w=r.img_w, info=np.array({"objects_id": evil}, dtype=object))
    # MMF: the _info.npy
    m = str(tmp_path / "mmf")
    W.write_mmf_npy(m, records[:2])
    np.save(os.path.join(m, r.img_id + "_info.npy"), {"bbox": evil})
    # MMF LMDB: a record
    lm = W.write_mmf_lmdb(str(tmp_path / "f.lmdb"), records[:2])
    import lmdb
    env = lmdb.open(lm)
    with env.begin(write=True) as txn:
        txn.put(r.img_id.encode(), pickle.dumps({"features": evil}))
    env.close()
    # bottom-up-attention-vqa: the id map
    b = W.write_butd_h5(str(tmp_path / "val36.hdf5"), records[:2])
    with open(str(tmp_path / "val36_imgid2idx.pkl"), "wb") as fh:
        pickle.dump({1: evil}, fh)
    for src, path, key, field in ((d, os.path.join(d, r.img_id + ".npz"), r.img_id, "info"),
                                  (m, os.path.join(m, r.img_id + "_info.npy"), r.img_id, "info"),
                                  (lm, os.path.abspath(lm), r.img_id, "(record)"),
                                  (b, str(tmp_path / "val36_imgid2idx.pkl"), None, "(id map)")):
        with pytest.raises(DataFormatError, match=r"refused to unpickle: it asks for (posix|os|nt)\.system") as e:
            convert_source(src, str(tmp_path / "out"), progress=False, log=None)
        assert (e.value.path, e.value.key, e.value.field) == (path, key, field), str(e.value)
        assert not os.path.exists(marker), "the pickle ran"
    # the same bytes through pickle itself do run (the test's pickle is a real one)
    pickle.loads(pickle.dumps(evil))
    assert os.path.exists(marker)


def test_restricted_unpickler_reads_numpy_pickles_of_every_protocol_and_numpy_1():
    value = {"objects_id": np.arange(3), "conf": np.float32([0.5, 0.25, 1.0]), "h": np.int64(480), "n": 3,
             "ids": [b"a", "b"], "s": {1, 2}}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        got = safe_loads(pickle.dumps(value, protocol=proto), "f", "info")
        assert got["objects_id"].tolist() == [0, 1, 2] and got["h"] == 480 and got["s"] == {1, 2}
        np.testing.assert_array_equal(got["conf"], value["conf"])
    numpy1 = pickle.dumps(value, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert safe_loads(numpy1, "f", "info")["objects_id"].tolist() == [0, 1, 2]
    with pytest.raises(DataFormatError, match="asks for builtins.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1'\ntR.", "f.pkl", "info")


# ---------------------------------------------------------------------------------------------- detection, store root
def test_detection_and_its_errors(records, tmp_path):
    assert detect_layout(_tsv(str(tmp_path / "x_obj36.tsv"), records[:1])) == "tsv"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match="cannot tell the feature layout of this folder.*--features_format"):
        detect_layout(str(empty))
    import h5py
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(LayoutError, match="an HDF5 file of no known feature layout"):
        detect_layout(str(tmp_path / "other.h5"))


def test_a_missing_optional_package_says_how_to_install_it(records, tmp_path, monkeypatch):
    from lxmert_fast.data.layouts import base

    src = W.write_vlt5_h5(str(tmp_path / "v.h5"), records[:1])
    real = base.importlib.import_module

    def no_h5py(name, *a, **kw):
        if name == "h5py":
            raise ImportError("No module named 'h5py'")
        return real(name, *a, **kw)

    monkeypatch.setattr(base.importlib, "import_module", no_h5py)
    with pytest.raises(LayoutError, match=r"needs the Python package 'h5py'.*pip install \"lxmert-fast\[formats\]\""):
        open_reader(src, "vlt5_h5")


def test_store_root_keeps_one_store_per_source_of_any_layout(records, tmp_path):
    os.makedirs(tmp_path / "data")
    src = W.write_butd_h5(str(tmp_path / "data" / "train36.hdf5"), records[:6])
    root = str(tmp_path / "stores")
    st = ensure_store(src, root, log=None)
    assert os.path.basename(st.path) == "store-train36-butd_h5" and st.labels == NO_LABELS
    written = os.stat(os.path.join(st.path, "manifest.json")).st_mtime_ns
    again = ensure_store(src, root, log=None)  # found again, not converted again
    assert again.path == st.path and os.stat(os.path.join(st.path, "manifest.json")).st_mtime_ns == written
    # another features map: other image ids, so another store's content; the stale one is not read silently
    fmap = tmp_path / "map.json"
    fmap.write_text(json.dumps({"format": "%d"}))
    with pytest.raises(StoreError, match="another features map"):
        ensure_store(src, root, features_map=str(fmap), log=None)
    # a job's map serves its other layouts' sources: its TSV sources keep their store
    tsv = _tsv(str(tmp_path / "x_obj36.tsv"), records[:1])
    assert ensure_store(tsv, root, features_map=str(fmap), log=None).path == ensure_store(tsv, root, log=None).path
    # the converter, given one TSV and a map, says the map does not apply
    with pytest.raises(LayoutError, match="--features_map applies to the other layouts"):
        convert_source(tsv, str(tmp_path / "tsv_with_map"), features_map=FeaturesMap.load(str(fmap)), log=None)


def test_convert_cli_takes_a_folder_of_another_layout(records, tmp_path):
    src = W.write_mmf_npy(str(tmp_path / "mmf"), records[:3])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = str(tmp_path / "store")
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.data.convert", src, "--out", out, "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert FeatureStore.open(out).layout == "mmf_npy"
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.data.convert", src, "--out", out + "2",
                           "--features-format", "bua_npz", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no .npz file in the folder" in proc.stderr


def test_reader_rows_report_every_bad_record_when_skipping(records, tmp_path):
    d = W.write_bua_npz(str(tmp_path / "npz"), records[:3])
    os.remove(os.path.join(d, records[1].img_id + ".npz"))
    with open(os.path.join(d, records[1].img_id + ".npz"), "wb") as fh:
        fh.write(b"not a zip")
    log = BadRowLog(skip_bad=True)
    with open_reader(d, "bua_npz") as reader:
        got = [(key, row is None) for _, key, row in reader.rows(log)]
    assert got == [(r.img_id, r.img_id == records[1].img_id) for r in records[:3]]
    assert log.errors[0].field == "(file)" and "not a readable .npz archive" in log.errors[0].message


def test_an_image_with_features_in_a_tsv_and_in_another_layout_is_named_by_its_id(records, tmp_path):
    from lxmert_fast.data.store_set import StoreSet

    root = str(tmp_path / "stores")
    tsv = ensure_store(_tsv(str(tmp_path / "a_obj36.tsv"), records[:3]), root, log=None)
    src = W.write_butd_h5(str(tmp_path / "train36.hdf5"), records[2:4])
    other = ensure_store(src, root, log=None)
    with pytest.raises(DataFormatError, match="one image, two feature rows") as e:
        StoreSet([tsv, other]).index()
    assert (e.value.path, e.value.line, e.value.key, e.value.field) == (src, None, records[2].img_id, "img_id")


def test_the_label_losses_name_what_the_files_lack(records, tmp_path):
    from lxmert_fast.data.store_set import StoreSet, label_loss_problems

    root = str(tmp_path / "stores")
    mmf = ensure_store(W.write_mmf_npy(str(tmp_path / "mmf"), records[:2]), root, log=None)
    tsv = ensure_store(_tsv(str(tmp_path / "b_obj36.tsv"), records[2:4]), root, log=None)
    both = StoreSet([tsv, mmf])
    assert label_loss_problems(("obj", "feat"), [both]) == ""
    msg = label_loss_problems(("obj", "attr", "feat"), [both])
    assert msg.startswith(f"--visual_losses attr needs the detector's attribute labels, but {mmf.sources[0]['path']} "
                          f"(MMF / ViLBERT per-image .npy (+ _info.npy)) carries no attribute ids or confidences")
    assert msg.endswith("pre-train these features with --visual_losses obj,feat")
