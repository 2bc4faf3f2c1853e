"""Strict readers: every kind of bad input names its file, line and field; --skip-bad counts."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from lxmert_fast.data.convert import main as convert_main
from lxmert_fast.data.formats import (BadRowLog, DataFormatError, iter_json_records, iter_tsv,
                                      parse_tsv_line, read_all_ans, read_ans2label,
                                      read_label2ans, read_pretrain_json, read_task_json)
from lxmert_fast.data.pretrain_data import build_pretrain_index
from lxmert_fast.data.store import FeatureStore
from lxmert_fast.data.tsv_convert import convert_tsvs

from .conftest import tsv_lines, write_lines

FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
          "num_boxes", "boxes", "features"]


def b64(a, dtype) -> bytes:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes())


def decode(line: bytes) -> dict:
    parts = line.rstrip(b"\n").split(b"\t")
    return dict(zip(FIELDS, parts))


def encode(d: dict) -> bytes:
    return b"\t".join(d[f] for f in FIELDS if f in d) + b"\n"


def feats_of(d) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["features"]), np.float32).reshape(36, -1).copy()


def boxes_of(d) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["boxes"]), np.float32).reshape(36, 4).copy()


def _nan_feat(d):
    f = feats_of(d); f[3, 17] = np.nan; d["features"] = b64(f, "<f4")


def _inf_feat(d):
    f = feats_of(d); f[0, 0] = np.inf; d["features"] = b64(f, "<f4")


def _box_outside(d):
    b = boxes_of(d); b[5, 2] = int(d["img_w"]) + 10; d["boxes"] = b64(b, "<f4")


def _box_flipped(d):
    b = boxes_of(d); b[2] = [50, 10, 40, 20]; d["boxes"] = b64(b, "<f4")


def _huge_feat(d):
    f = feats_of(d); f[1, 1] = 1e6; d["features"] = b64(f, "<f4")


# name -> (mutation of the field dict, expected field, expected words in the message)
BAD_ROWS = {
    "field_count": (lambda d: d.pop("attrs_conf") and None, "(row)", "expected 10"),
    "bad_base64_char": (lambda d: d.__setitem__("features", b"!" + d["features"][1:]),
                        "features", "bad base64"),
    "bad_base64_len": (lambda d: d.__setitem__("boxes", d["boxes"][:-1]), "boxes", "bad base64"),
    "feature_dims": (lambda d: d.__setitem__("features", b64(np.ones((36, 2047)), "<f4")),
                     "features", "num_boxes x 2048"),
    "boxes_count": (lambda d: d.__setitem__("boxes", b64(np.ones((35, 4)), "<f4")),
                    "boxes", "num_boxes x 4"),
    "objects_id_count": (lambda d: d.__setitem__("objects_id", b64(np.ones(37), "<i8")),
                         "objects_id", "num_boxes"),
    "num_boxes_not_int": (lambda d: d.__setitem__("num_boxes", b"3x6"), "num_boxes", "integer"),
    "img_h_zero": (lambda d: d.__setitem__("img_h", b"0"), "img_h", "positive"),
    "box_outside": (_box_outside, "boxes", "outside"),
    "box_flipped": (_box_flipped, "boxes", "x2 < x1"),
    "nan_feature": (_nan_feat, "features", "non-finite"),
    "inf_feature": (_inf_feat, "features", "non-finite"),
    "obj_id_range": (lambda d: d.__setitem__("objects_id", b64(np.full(36, 1600), "<i8")),
                     "objects_id", "outside [0, 1600)"),
    "conf_nan": (lambda d: d.__setitem__("attrs_conf", b64(np.full(36, np.nan), "<f4")),
                 "attrs_conf", "confidence"),
    "fp16_overflow": (_huge_feat, "features", "--fp32"),
}


@pytest.fixture(scope="module")
def good_lines(pretrain_tsvs):
    return tsv_lines(pretrain_tsvs[1])[:6]


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_line_field(case, good_lines, tmp_path):
    mutate, field, words = BAD_ROWS[case]
    d = decode(good_lines[2])
    mutate(d)
    lines = list(good_lines)
    lines[2] = encode(d)
    path = write_lines(str(tmp_path / "bad_obj36.tsv"), lines)
    with pytest.raises(DataFormatError) as ei:
        for _ in iter_tsv(path, check_fp16=True):
            pass
    e = ei.value
    assert (e.path, e.line, e.field) == (path, 3, field)
    msg = str(e)
    assert f"{path}:3:" in msg and f"'{field}'" in msg and words in msg, msg
    # the same row through the converter: the error propagates (no store written)
    out = str(tmp_path / "store")
    with pytest.raises(DataFormatError) as ei2:
        convert_tsvs([path], out, workers=1, progress=False, log=None, num_boxes=36)
    assert (ei2.value.line, ei2.value.field) == (3, field)
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_skip_bad_counts_and_reports(good_lines, tmp_path, capsys):
    lines = list(good_lines)
    bad_at = {2: "features", 4: "(row)", 6: "boxes"}  # 1-based line numbers
    for ln, field in bad_at.items():
        d = decode(lines[ln - 1])
        if field == "features":
            _nan_feat(d)
        elif field == "boxes":
            _box_outside(d)
        else:
            d.pop("img_w")
        lines[ln - 1] = encode(d)
    path = write_lines(str(tmp_path / "mixed_obj36.tsv"), lines)
    # strict: the first bad row stops everything
    with pytest.raises(DataFormatError, match=r"mixed_obj36.tsv:2: field 'features'"):
        convert_tsvs([path], str(tmp_path / "strict"), workers=1, progress=False, log=None)
    # --skip-bad: counted, reported at the end, listed, and the store holds the good rows only
    out = str(tmp_path / "store")
    logged = []
    man = convert_tsvs([path], out, workers=2, seg_lines=2, skip_bad=True, progress=False,
                       log=logged.append)
    assert man["skipped_rows"] == 3 and man["num_images"] == 3
    assert any("skipped 3 bad row(s)" in m for m in logged)
    with open(os.path.join(out, "skipped_rows.tsv")) as f:
        rows = [r.split("\t") for r in f.read().splitlines()[1:]]
    assert {(int(r[1]), r[2]) for r in rows} == set(bad_at.items())
    st = FeatureStore.open(out, verify=True)
    good = [parse_tsv_line(lines[i], path, i + 1) for i in (0, 2, 4)]
    assert list(st.img_ids) == [g.img_id for g in good]
    np.testing.assert_array_equal(st.src_line, [1, 3, 5])
    for r, g in enumerate(good):
        np.testing.assert_array_equal(st.read_features([r])[0], g.feats_nd.astype(np.float16))
    # iter_tsv with a skip log yields None for bad rows and records them
    log = BadRowLog(skip_bad=True)
    got = [row is None for _, row in iter_tsv(path, skip=log)]
    assert got == [False, True, False, True, False, True] and len(log) == 3
    assert "skipped 3" in log.summary()


def test_duplicate_img_id_across_files(pretrain_tsvs, tmp_path):
    a = tsv_lines(pretrain_tsvs[0])[:3]
    b = tsv_lines(pretrain_tsvs[1])[:3]
    d = decode(b[1])
    d["img_id"] = decode(a[2])["img_id"]
    b[1] = encode(d)
    pa = write_lines(str(tmp_path / "a_obj36.tsv"), a)
    pb = write_lines(str(tmp_path / "b_obj36.tsv"), b)
    with pytest.raises(DataFormatError) as ei:
        convert_tsvs([pa, pb], str(tmp_path / "s"), workers=2, progress=False, log=None)
    e = ei.value
    assert (e.path, e.line, e.field) == (pb, 2, "img_id")
    assert f"{pa}:3" in e.message
    man = convert_tsvs([pa, pb], str(tmp_path / "s2"), skip_bad=True, workers=1,
                       progress=False, log=None)
    assert man["num_images"] == 5 and man["skipped_rows"] == 1


def test_mixed_box_counts(pretrain_tsvs, tmp_path):
    lines = tsv_lines(pretrain_tsvs[0])[:4]
    d = decode(lines[3])
    keep = 30
    for f, dt, shape in (("objects_id", np.int64, (36,)), ("objects_conf", np.float32, (36,)),
                         ("attrs_id", np.int64, (36,)), ("attrs_conf", np.float32, (36,)),
                         ("boxes", np.float32, (36, 4)), ("features", np.float32, (36, 2048))):
        a = np.frombuffer(base64.b64decode(d[f]), dt).reshape(shape)[:keep]
        d[f] = b64(a, dt)
    d["num_boxes"] = str(keep).encode()
    lines[3] = encode(d)
    path = write_lines(str(tmp_path / "m_obj36.tsv"), lines)
    with pytest.raises(DataFormatError) as ei:
        convert_tsvs([path], str(tmp_path / "s"), workers=1, progress=False, log=None)
    assert (ei.value.line, ei.value.field) == (4, "num_boxes")
    assert "--num-boxes" in str(ei.value)
    convert_tsvs([path], str(tmp_path / "p"), workers=1, num_boxes=36, progress=False, log=None)
    st = FeatureStore.open(str(tmp_path / "p"))
    assert st.array("num_boxes")[3] == keep and st.array("num_boxes")[0] == 36 == st.num_boxes
    assert not st.read_features([3])[0, keep:].any() and not st.obj_conf[3, keep:].any()


def test_cli_exit_code_and_message(good_lines, tmp_path, capsys):
    d = decode(good_lines[1])
    _nan_feat(d)
    path = write_lines(str(tmp_path / "c_obj36.tsv"), [good_lines[0], encode(d)])
    rc = convert_main([path, "--out", str(tmp_path / "s"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{path}:2: field 'features'" in err and "--skip-bad" in err
    rc = convert_main([path, "--out", str(tmp_path / "s"), "--skip-bad", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped 1 bad row(s)" in out
    with pytest.raises(SystemExit) as ei:
        convert_main(["--help"])
    assert ei.value.code == 0
    assert "--skip-bad" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

def _write_json(path, obj, indent=None) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)
    return str(path)


GOOD_REC = {"img_id": "x1", "sentf": {"mscoco": ["a dog"], "vqa": ["what?", "why?"]},
            "labelf": {"vqa": [{"red": 1.0}, {"2": 0.3, "3": 0.9}]}}


@pytest.mark.parametrize("bad,field,words", [
    ({"sentf": None}, "[1].sentf", "expected"),
    ({"img_id": ""}, "[1].img_id", "non-empty"),
    ({"labelf": {"vqa": [{"red": 1.0}]}}, "[1].labelf.vqa", "aligned"),
    ({"labelf": {"vqa": [{"red": -1}, {"a": 1}]}}, "[1].labelf.vqa[0]['red']", "score"),
    ({"labelf": {"gqa": []}}, "[1].labelf.gqa", "no sentences"),
    ({"sentf": {"mscoco": ["ok", 3]}}, "[1].sentf.mscoco[1]", "string"),
])
@pytest.mark.parametrize("indent", [None, 1])
def test_pretrain_json_errors(tmp_path, bad, field, words, indent):
    rec = {**GOOD_REC, "img_id": "x2", **bad}
    path = _write_json(tmp_path / "split.json", [GOOD_REC, rec], indent)
    with pytest.raises(DataFormatError) as ei:
        read_pretrain_json(path)
    e = ei.value
    expect_line = 1 if indent is None else 1 + 1 + sum(
        1 for _ in json.dumps(GOOD_REC, indent=indent).splitlines())
    assert (e.path, e.line, e.field) == (path, expect_line, field)
    assert words in str(e) and f"{path}:{expect_line}:" in str(e)
    log = BadRowLog(skip_bad=True)
    assert len(read_pretrain_json(path, log)) == 1 and len(log) == 1


def test_json_syntax_and_duplicates(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n {"img_id": "a", "sentf": {}},\n {"img_id": "b", "sentf": {}\n]\n')
    with pytest.raises(DataFormatError) as ei:
        read_pretrain_json(str(p))
    assert ei.value.line == 4 and "invalid JSON" in str(ei.value)
    dup = _write_json(tmp_path / "dup.json", [GOOD_REC, GOOD_REC])
    with pytest.raises(DataFormatError, match="duplicate img_id"):
        read_pretrain_json(dup)
    assert [i for i, _, _ in iter_json_records(_write_json(tmp_path / "e.json", []))] == []


@pytest.mark.parametrize("task,rec,field", [
    ("vqa", {"question_id": 1, "sent": "q", "label": {}}, "[0].img_id"),
    ("vqa", {"question_id": 1, "img_id": "a", "sent": "q", "label": {"x": "1"}}, "[0].label['x']"),
    ("gqa", {"question_id": "1", "img_id": "a", "sent": ""}, "[0].sent"),
    ("nlvr2", {"identifier": "i", "img0": "a", "img1": "b", "sent": "s", "label": 2}, "[0].label"),
])
def test_task_json_errors(tmp_path, task, rec, field):
    path = _write_json(tmp_path / f"{task}.json", [rec])
    with pytest.raises(DataFormatError) as ei:
        read_task_json(path, task)
    assert (ei.value.line, ei.value.field) == (1, field)


def test_task_json_duplicate_and_required_label(tmp_path):
    r = {"question_id": 7, "img_id": "a", "sent": "q"}
    path = _write_json(tmp_path / "v.json", [r, r])
    with pytest.raises(DataFormatError, match="duplicate question_id"):
        read_task_json(path, "vqa")
    with pytest.raises(DataFormatError, match=r"\[0\]\.label.*missing"):
        read_task_json(_write_json(tmp_path / "w.json", [r]), "vqa", require_label=True)


def test_answer_table_errors(tmp_path):
    with pytest.raises(DataFormatError, match="0..K-1"):
        read_ans2label(_write_json(tmp_path / "a2l.json", {"a": 0, "b": 2}))
    with pytest.raises(DataFormatError, match="duplicate answer"):
        read_label2ans(_write_json(tmp_path / "l2a.json", ["a", "b", "a"]))
    with pytest.raises(DataFormatError, match=r"\[1\]\.ans.*duplicate"):
        read_all_ans(_write_json(tmp_path / "all.json", [{"ans": "a", "dsets": []},
                                                         {"ans": "a", "dsets": []}]))


def test_sentence_without_features(demo_root, pretrain_tsvs, tmp_path):
    """A sentence whose img_id has no features: an error naming the JSON file, line and field."""
    out = str(tmp_path / "coco_only")
    convert_tsvs(pretrain_tsvs[:1], out, workers=1, progress=False, log=None)  # train2014 only
    st = FeatureStore.open(out)
    vocab = os.path.join(demo_root, "vocab.txt")
    with pytest.raises(DataFormatError) as ei:
        build_pretrain_index(demo_root, "mscoco_train,vgnococo", st, vocab, log=None)
    e = ei.value
    assert e.path.endswith(os.path.join("lxmert", "vgnococo.json"))
    assert (e.line, e.field) == (1, "img_id") and "has no features" in str(e)
    logged = []
    idx = build_pretrain_index(demo_root, "mscoco_train,vgnococo", st, vocab, skip_bad=True,
                               log=logged.append)
    n_vg = len(read_pretrain_json(os.path.join(demo_root, "lxmert", "vgnococo.json")))
    assert idx.meta["skipped"] == n_vg and any(f"skipped {n_vg} bad row(s)" in m for m in logged)
    assert os.path.exists(os.path.join(idx.path, "skipped_records.tsv"))
