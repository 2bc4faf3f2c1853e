"""The demo world: original formats that parse strictly, determinism, cross-modal structure."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from lxmert_fast.data.demo import (COLORS, CLASSES, demo_dir_name, ensure_demo_data, generate, jobs_demo_objects,
                                   main as demo_main, parse_objects)
from lxmert_fast.data.formats import (iter_tsv, read_all_ans, read_ans2label, read_label2ans,
                                      read_pretrain_json, read_task_json)


def _tsv_ids(path):
    return [row.img_id for _, row in iter_tsv(path)]  # strict: raises on any bad row


def test_demo_files_parse_strictly(demo_root):
    meta = json.load(open(os.path.join(demo_root, "demo.json")))
    j = lambda *p: os.path.join(demo_root, *p)
    ids = {name: _tsv_ids(j(rel)) for name, rel in meta["tsv"].items()}
    sz = meta["split_sizes"]
    assert len(ids["train2014"]) == sz["train2014"] and len(ids["vg"]) == sz["vg"]
    for v in ids.values():
        assert len(v) == len(set(v))
    coco = set(ids["train2014"]) | set(ids["val2014"])
    pre = {}
    for split in ("mscoco_train", "mscoco_nominival", "mscoco_minival", "vgnococo"):
        recs = [r for _, r in read_pretrain_json(j("lxmert", f"{split}.json"))]
        assert recs and len(recs) == meta["pretrain_splits"][split]
        pre[split] = recs
    assert {r["img_id"] for r in pre["mscoco_train"]} == set(ids["train2014"])
    assert {r["img_id"] for r in pre["vgnococo"]} == set(ids["vg"])
    val = {r["img_id"] for s in ("mscoco_minival", "mscoco_nominival") for r in pre[s]}
    assert val == set(ids["val2014"])
    assert any("vqa" in r["labelf"] for r in pre["mscoco_train"])
    assert any("gqa" in r["labelf"] for r in pre["vgnococo"])
    all_ans = {a["ans"] for a in read_all_ans(j("lxmert", "all_ans.json"))}
    for task, splits, pool in (("vqa", ("train", "nominival", "minival"), coco),
                               ("gqa", ("train", "valid", "testdev"),
                                set(ids["vg"]) | set(ids["gqa_testdev"]))):
        a2l = read_ans2label(j(task, "trainval_ans2label.json"))
        l2a = read_label2ans(j(task, "trainval_label2ans.json"))
        assert all(l2a[i] == a for a, i in a2l.items())
        for sp in splits:
            recs = read_task_json(j(task, f"{sp}.json"), task, require_label=True)
            assert recs and all(r["img_id"] in pool for r in recs)
            assert all(a in a2l and a in all_ans for r in recs for a in r["label"])
    for sp in ("train", "valid"):
        recs = read_task_json(j("nlvr2", f"{sp}.json"), "nlvr2", require_label=True)
        pool = set(ids[f"nlvr2_{sp}"])
        assert all(r["img0"] in pool and r["img1"] in pool for r in recs)
        frac_true = np.mean([r["label"] for r in recs])
        assert 0.15 < frac_true < 0.85
    vocab = open(j("vocab.txt")).read().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(CLASSES + COLORS) <= set(vocab)


def test_demo_deterministic_and_cached(tmp_path):
    def digest(root):
        h = {}
        for dp, _, fs in os.walk(root):
            for f in fs:
                if f != "demo.json":
                    p = os.path.join(dp, f)
                    h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
        return h
    generate(str(tmp_path / "a"), images=16, seed=4, log=None)
    assert demo_main(["--out", str(tmp_path / "b"), "--images", "16", "--seed", "4"]) == 0
    generate(str(tmp_path / "c"), images=16, seed=5, log=None)
    da, db, dc = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert da == db and da.keys() == dc.keys() and da != dc
    p = ensure_demo_data(str(tmp_path / "cache"), images=16, seed=4)
    stamp = os.path.getmtime(os.path.join(p, "demo.json"))
    assert ensure_demo_data(str(tmp_path / "cache"), images=16, seed=4) == p
    assert os.path.getmtime(os.path.join(p, "demo.json")) == stamp
    assert digest(p) == da
    assert os.listdir(tmp_path / "cache") == [os.path.basename(p)]  # no partial dirs left


def test_demo_has_cross_modal_structure(demo_root, demo_store):
    """Features encode the detected class; answers are facts about the image's objects."""
    meta = json.load(open(os.path.join(demo_root, "demo.json")))
    cls_of_id = {oid: c for c, oid in zip(CLASSES, meta["obj_id_of_class"])}
    col_of_id = {aid: c for c, aid in zip(COLORS, meta["attr_id_of_color"])}
    st = demo_store
    n = st.num_images
    feats = st.read_features(np.arange(n)).astype(np.float32)      # (N, 36, D)
    obj = np.asarray(st.obj_ids)
    salient = np.isin(obj, list(cls_of_id))
    x, y = feats[salient], obj[salient]
    # nearest class centroid (centroids from half the images, tested on the other half)
    half = np.repeat(np.arange(n) < n // 2, 36).reshape(n, 36)[salient]
    labels = sorted(set(y.tolist()))
    cent = np.stack([x[half & (y == c)].mean(0) for c in labels])
    d = ((x[~half][:, None, :] - cent[None]) ** 2).sum(-1)
    acc = (np.asarray(labels)[d.argmin(1)] == y[~half]).mean()
    assert acc > 0.95, acc
    # "what color is the <class>?" is answered by the attribute of that object in the image
    checked = 0
    for split in ("mscoco_train",):
        for _, rec in read_pretrain_json(os.path.join(demo_root, "lxmert", f"{split}.json")):
            row = st.row_of(rec["img_id"])
            objs = {(cls_of_id.get(int(o)), col_of_id.get(int(a)))
                    for o, a in zip(st.obj_ids[row], st.attr_ids[row]) if int(o) in cls_of_id}
            for q, lab in zip(rec["sentf"].get("vqa", []), rec["labelf"].get("vqa", [])):
                if q.startswith("what color is the "):
                    c = q[len("what color is the "):-1]
                    best = max(lab, key=lab.get)
                    assert (c, best) in objs
                    checked += 1
                elif q.startswith("is there a "):
                    c = q[len("is there a "):-1]
                    assert (max(lab, key=lab.get) == "yes") == any(o == c for o, _ in objs)
                    checked += 1
    assert checked > 20


def test_demo_features_have_no_common_offset(demo_store):
    """Features are centred: a shared offset (as ReLU features have) hides the class signal from a
    fresh model and grounding then emerges far too slowly for a CPU demo."""
    feats = demo_store.read_features(np.arange(min(64, demo_store.num_images))).astype(np.float32)
    per_dim_mean = feats.reshape(-1, feats.shape[-1]).mean(0)
    assert np.abs(per_dim_mean).mean() < 0.25 * feats.std(), (np.abs(per_dim_mean).mean(), feats.std())


def test_demo_nlvr2_sentences_are_judged_on_several_pairs(demo_root):
    """As in NLVR2, a sentence is paired with several image pairs (identifier split-set-pair-sentence),
    so consistency groups hold several examples; each sentence is true of about half of its pairs, so
    the sentence alone does not tell the label (the majority answer scores about 0.5)."""
    from lxmert_fast.data.demo import NLVR2_PAIRS, NLVR2_SENTENCES
    from lxmert_fast.data.tasks import nlvr2_group

    recs = read_task_json(os.path.join(demo_root, "nlvr2", "train.json"), "nlvr2", require_label=True)
    groups: dict = {}
    for r in recs:
        groups.setdefault(nlvr2_group(r["identifier"]), []).append(r)
    assert all(len(g) == NLVR2_PAIRS and len({r["sent"] for r in g}) == 1 for g in groups.values())
    assert all(len({(r["img0"], r["img1"]) for r in g}) == NLVR2_PAIRS for g in groups.values())
    sets: dict = {}
    for r in recs:
        sets.setdefault(r["identifier"].rsplit("-", 2)[0], set()).add(r["sent"])
    assert all(len(sents) == NLVR2_SENTENCES for sents in sets.values())  # distinct sentences per set
    mixed = sum(len({r["label"] for r in g}) == 2 for g in groups.values())
    assert mixed >= 0.8 * len(groups), (mixed, len(groups))
    assert 0.35 < np.mean([r["label"] for r in recs]) < 0.65


def test_demo_nlvr2_statements_are_checked_against_both_images():
    """Each statement's label is what the pair's objects make of it."""
    from lxmert_fast.data.demo import nlvr2_statement, nlvr2_statements

    dog, cat = CLASSES.index("dog"), CLASSES.index("cat")
    truths = dict(nlvr2_statements([dog]))
    one = lambda cls: [(cls, "red", 0.5, 0.5)]  # noqa: E731
    two_dogs = [("dog", "red", 0.3, 0.5), ("dog", "blue", 0.7, 0.5)]
    assert truths["the left image contains a dog"](one("dog"), one("cat")) == 1
    assert truths["the right image contains a dog"](one("dog"), one("cat")) == 0
    assert truths["both images contain a dog"](one("dog"), two_dogs) == 1
    assert truths["both images contain a dog"](one("dog"), one("cat")) == 0
    assert truths["there are more dogs in the left image than in the right image"](two_dogs, one("dog")) == 1
    assert truths["there are more dogs in the left image than in the right image"](one("dog"), two_dogs) == 0
    pairs = [(one("dog"), one("cat")), (one("cat"), one("dog")), (one("dog"), one("dog")), (one("cat"), one("cat"))]
    sent, labels = nlvr2_statement(np.random.default_rng(0), [dog, cat], pairs)
    assert sum(labels) == 2, (sent, labels)  # true of half of the pairs when a statement is
    assert labels == [dict(nlvr2_statements([dog, cat]))[sent](*p) for p in pairs]


def test_demo_objects_per_image(tmp_path, capsys):
    """``--objects``: a one-object world whose captions name that object (the jobs' default world); the
    generator's default world (2-4) keeps a folder name without a suffix; a bad value is refused naming the rule."""
    assert demo_dir_name(16, 4) == "demo-v3-n16-s4" and demo_dir_name(16, 4, (1, 1)) == "demo-v3-n16-s4-o1-1"
    assert parse_objects("1") == (1, 1) and parse_objects("2-4") == (2, 4)
    assert jobs_demo_objects(None, None) == (1, 1)        # pre-training and fine-tuning on the demo world
    assert jobs_demo_objects((2, 4), None) == (2, 4) and jobs_demo_objects(None, "data") is None
    for bad in ("0", "3-2", "7", "x", "1-2-3"):
        with pytest.raises(ValueError, match="1 <= MIN <= MAX <= 6"):
            parse_objects(bad)
    with pytest.raises(SystemExit):
        demo_main(["--out", str(tmp_path / "bad"), "--objects", "0"])
    assert "--objects" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad")

    root = ensure_demo_data(str(tmp_path / "cache"), images=24, seed=1, objects=(1, 1))
    assert os.path.basename(root) == "demo-v3-n24-s1-o1-1"
    meta = json.load(open(os.path.join(root, "demo.json")))
    assert meta["objects_per_image"] == [1, 1]
    cls_of_id = {oid: c for c, oid in zip(CLASSES, meta["obj_id_of_class"])}
    col_of_id = {aid: c for c, aid in zip(COLORS, meta["attr_id_of_color"])}
    objects_of = {}
    for _, row in iter_tsv(os.path.join(root, meta["tsv"]["train2014"])):
        objects_of[row.img_id] = {(cls_of_id[int(o)], col_of_id[int(a)])
                                  for o, a in zip(row.obj_ids_n, row.attr_ids_n) if int(o) in cls_of_id}
    captions = 0
    for _, rec in read_pretrain_json(os.path.join(root, "lxmert", "mscoco_train.json")):
        (cls, col), = objects_of[rec["img_id"]]  # every salient detection reports the one object
        for cap in rec["sentf"]["mscoco"]:
            assert cap in (f"a photo of a {col} {cls}", f"the {cls} is {col}"), cap
            captions += 1
    assert captions == 5 * len(objects_of) > 0
    # the generator's default world (2-4 objects) keeps its name without a suffix
    default = ensure_demo_data(str(tmp_path / "cache"), images=24, seed=1)
    assert os.path.basename(default) == "demo-v3-n24-s1"
    assert json.load(open(os.path.join(default, "demo.json")))["objects_per_image"] == [2, 4]
