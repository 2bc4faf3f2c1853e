"""The demo world: a synthetic LXMERT data set in the original file formats.

``python -m lxmert_fast.data.demo --out DIR [--images N] [--seed S]`` writes, under ``DIR``, the
layout of airsplay/lxmert's ``data/`` folder (same file names, same formats)::

    lxmert/mscoco_train.json  mscoco_nominival.json  mscoco_minival.json  vgnococo.json
    lxmert/all_ans.json                               # QA answer table with dsets
    mscoco_imgfeat/train2014_obj36.tsv  val2014_obj36.tsv
    vg_gqa_imgfeat/vg_gqa_obj36.tsv  gqa_testdev_obj36.tsv
    vqa/train.json  nominival.json  minival.json  trainval_ans2label.json  trainval_label2ans.json
    gqa/train.json  valid.json  testdev.json  trainval_ans2label.json  trainval_label2ans.json
    nlvr2/train.json  valid.json
    nlvr2_imgfeat/train_obj36.tsv  valid_obj36.tsv
    vocab.txt                                          # WordPiece vocab trained on the world
    demo.json                                          # parameters, counts, label maps

The world: each image holds 36 detected objects, 2-5 of them "salient" (one of 20 classes, one
of 8 colours, a box), the rest background clutter. A 2048-d object feature is
``relu(E_obj[label] + E_attr[attr] + pos(box) + noise)`` with fixed random embeddings
(deterministic per seed); the detector ids / confidences are written as Faster R-CNN's would be
(object ids < 1600, attribute ids < 400). Captions ("a red dog left of a blue car"), questions
("what color is the dog?" -> "red", "how many cars are there?" -> "2", "is there a cat?" -> "no")
and NLVR2 statements about image pairs are generated from the objects, so their object words and
answers can only be known from the image: a model has something cross-modal to learn.

:func:`ensure_demo_data` generates once (atomically, in a temporary directory renamed into place)
and reuses after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np

from .formats import write_tsv_row

CLASSES = ["dog", "cat", "car", "bus", "horse", "bird", "tree", "chair", "table", "cup",
           "ball", "boat", "bike", "clock", "lamp", "book", "phone", "shoe", "hat", "kite"]
PLURALS = {c: (c + "es" if c.endswith("s") else c + "s") for c in CLASSES}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "purple"]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
NUM_BG_CLASSES = 30      # background detector labels ("thing", clutter)
NUM_BG_ATTRS = 12
NUM_OBJECTS = 36
FEAT_DIM = 2048
DEMO_VERSION = 1


def plural(cls: str, n: int) -> str:
    return cls if n == 1 else PLURALS[cls]


class World:
    """Objects of every image of the demo world plus the fixed random feature model."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        r = np.random.default_rng(seed + 7919)  # feature model: independent of the image count
        n_lab, n_att = len(CLASSES) + NUM_BG_CLASSES, len(COLORS) + NUM_BG_ATTRS
        self.obj_id_of_label = r.choice(1600, n_lab, replace=False).astype(np.int64)
        self.attr_id_of_attr = r.choice(400, n_att, replace=False).astype(np.int64)
        self.e_obj = r.standard_normal((n_lab, FEAT_DIM), dtype=np.float32)
        self.e_attr = (0.8 * r.standard_normal((n_att, FEAT_DIM), dtype=np.float32))
        self.e_pos = (0.5 * r.standard_normal((8, FEAT_DIM), dtype=np.float32))
        self.noise_bank = (0.4 * r.standard_normal((1024, FEAT_DIM), dtype=np.float32))

    def make_images(self, ids: list[str]) -> dict:
        """Sample the objects of images ``ids``; arrays are (N, 36, ...)."""
        rng, n, k = self.rng, len(ids), NUM_OBJECTS
        h = rng.integers(300, 481, n)
        w = rng.integers(400, 641, n)
        n_sal = rng.integers(2, 6, n)
        salient = np.arange(k)[None, :] < n_sal[:, None]                      # (N, 36)
        label = np.where(salient, rng.integers(0, len(CLASSES), (n, k)),
                         len(CLASSES) + rng.integers(0, NUM_BG_CLASSES, (n, k)))
        attr = np.where(salient, rng.integers(0, len(COLORS), (n, k)),
                        len(COLORS) + rng.integers(0, NUM_BG_ATTRS, (n, k)))
        # boxes: salient ones large, clutter small; in fractions first
        size = np.where(salient[..., None], rng.uniform(0.15, 0.45, (n, k, 2)),
                        rng.uniform(0.03, 0.15, (n, k, 2)))
        centre = rng.uniform(0.1, 0.9, (n, k, 2))
        lo = np.clip(centre - size / 2, 0, 1)
        hi = np.clip(centre + size / 2, 0, 1)
        frac = np.concatenate([lo, hi], -1)                                   # x1 y1 x2 y2
        scale = np.stack([w, h, w, h], -1)[:, None, :].astype(np.float64)
        boxes = (frac * scale).astype(np.float32)
        obj_conf = np.where(salient, rng.uniform(0.6, 0.99, (n, k)),
                            rng.uniform(0.05, 0.5, (n, k))).astype(np.float32)
        attr_conf = np.where(salient, rng.uniform(0.5, 0.95, (n, k)),
                             rng.uniform(0.05, 0.4, (n, k))).astype(np.float32)
        # shuffle object order within each image (detections are not sorted by salience)
        perm = np.argsort(rng.random((n, k)), axis=1)
        take = lambda a: np.take_along_axis(a, perm.reshape(perm.shape + (1,) * (a.ndim - 2)), 1)
        return {"ids": list(ids), "h": h, "w": w, "salient": take(salient), "label": take(label),
                "attr": take(attr), "boxes": take(boxes), "frac": take(frac.astype(np.float32)),
                "obj_conf": take(obj_conf), "attr_conf": take(attr_conf),
                "noise_idx": rng.integers(0, len(self.noise_bank), (n, k)),
                "noise_sign": rng.choice(np.array([-1.0, 1.0], np.float32), (n, k))}

    def features(self, imgs: dict, sl: slice, out: np.ndarray | None = None,
                 tmp: np.ndarray | None = None) -> np.ndarray:
        """(n, 36, 2048) float32 features of images ``sl`` (reusing ``out`` / ``tmp`` buffers:
        fresh large allocations page-fault, which dominates the cost otherwise)."""
        frac = imgs["frac"][sl]
        n = frac.shape[0]
        shape = (n, NUM_OBJECTS, FEAT_DIM)
        out = np.empty(shape, np.float32) if out is None else out[:n]
        tmp = np.empty(shape, np.float32) if tmp is None else tmp[:n]
        cx, cy = (frac[..., 0] + frac[..., 2]) / 2, (frac[..., 1] + frac[..., 3]) / 2
        bw, bh = frac[..., 2] - frac[..., 0], frac[..., 3] - frac[..., 1]
        pos = np.stack([cx, cy, bw, bh, np.sin(np.pi * cx), np.cos(np.pi * cx),
                        np.sin(np.pi * cy), np.cos(np.pi * cy)], -1).astype(np.float32)
        np.matmul(pos.reshape(-1, 8), self.e_pos, out=out.reshape(-1, FEAT_DIM))  # 2-D: BLAS
        np.take(self.e_obj, imgs["label"][sl], axis=0, out=tmp, mode="clip")
        out += tmp
        np.take(self.e_attr, imgs["attr"][sl], axis=0, out=tmp, mode="clip")
        out += tmp
        np.take(self.noise_bank, imgs["noise_idx"][sl], axis=0, out=tmp, mode="clip")
        tmp *= imgs["noise_sign"][sl][..., None]
        out += tmp
        np.maximum(out, 0, out=out)
        return out


def _write_tsv_job(seed: int, imgs: dict, path: str) -> None:
    write_tsv(World(seed), imgs, path)


def _write_all_tsv(world: World, seed: int, jobs: list[tuple[dict, str]], workers: int) -> None:
    """Write the TSV files, in parallel processes when there is enough work."""
    n_img = sum(len(imgs["ids"]) for imgs, _ in jobs)
    workers = min(workers, len(jobs))
    if workers <= 1 or n_img < 400:
        for imgs, path in jobs:
            write_tsv(world, imgs, path)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    jobs = sorted(jobs, key=lambda j: -len(j[0]["ids"]))
    # fork: the children only run numpy code and need not re-import the package (spawn would)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        for f in [ex.submit(_write_tsv_job, seed, imgs, path) for imgs, path in jobs]:
            f.result()


def write_tsv(world: World, imgs: dict, path: str, chunk: int = 32) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        out = np.empty((chunk, NUM_OBJECTS, FEAT_DIM), np.float32)
        tmp = np.empty_like(out)
        for s in range(0, len(imgs["ids"]), chunk):
            sl = slice(s, s + chunk)
            feats = world.features(imgs, sl, out, tmp)
            for j in range(feats.shape[0]):
                i = s + j
                write_tsv_row(f, imgs["ids"][i], imgs["h"][i], imgs["w"][i],
                              world.obj_id_of_label[imgs["label"][i]], imgs["obj_conf"][i],
                              world.attr_id_of_attr[imgs["attr"][i]], imgs["attr_conf"][i],
                              imgs["boxes"][i], feats[j])


# ---------------------------------------------------------------------------------------------
# language
# ---------------------------------------------------------------------------------------------

def _objects(imgs: dict, i: int) -> list[tuple[str, str, float, float]]:
    """Salient objects of image i: (class, colour, cx, cy)."""
    out = []
    for j in np.flatnonzero(imgs["salient"][i]).tolist():
        fr = imgs["frac"][i, j]
        out.append((CLASSES[imgs["label"][i, j]], COLORS[imgs["attr"][i, j]],
                    float(fr[0] + fr[2]) / 2, float(fr[1] + fr[3]) / 2))
    return out


def _relation(a, b) -> str:
    dx, dy = a[2] - b[2], a[3] - b[3]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def captions(rng, objs, n: int) -> list[str]:
    counts = Counter(o[0] for o in objs)
    out = []
    for _ in range(n):
        t = rng.integers(0, 4)
        a, b = (objs[i] for i in rng.choice(len(objs), 2, replace=False))
        if t == 0:
            out.append(f"a {a[1]} {a[0]} {_relation(a, b)} a {b[1]} {b[0]}")
        elif t == 1:
            out.append(f"a photo of a {a[1]} {a[0]} and a {b[1]} {b[0]}")
        elif t == 2:
            c = a[0]
            out.append(f"there {'is' if counts[c] == 1 else 'are'} {NUM_WORDS[counts[c]]} "
                       f"{plural(c, counts[c])} in the picture")
        else:
            out.append(f"the {a[0]} is {a[1]}")
    return out


def questions(rng, objs, n: int, style: str) -> list[tuple[str, dict, str, str]]:
    """[(question, {answer: score}, answer_type, question_type)], answers from the image only."""
    counts = Counter(o[0] for o in objs)
    colours = Counter(o[1] for o in objs)
    present = sorted(counts)
    absent = [c for c in CLASSES if c not in counts]
    out = []
    for _ in range(n):
        t = rng.integers(0, 5)
        a = objs[rng.integers(0, len(objs))]
        if t == 0 and counts[a[0]] == 1:
            q, ans, at, qt = f"what color is the {a[0]}?", a[1], "other", "what color is the"
        elif t == 1:
            c = present[rng.integers(0, len(present))]
            q, ans, at, qt = f"how many {PLURALS[c]} are there?", str(counts[c]), "number", "how many"
        elif t == 2:
            c = a[0] if rng.random() < 0.5 or not absent else absent[rng.integers(0, len(absent))]
            q, ans, at, qt = f"is there a {c}?", "yes" if c in counts else "no", "yes/no", "is there a"
        elif t == 3 and colours[a[1]] == 1:
            q, ans, at, qt = f"what is the {a[1]} object?", a[0], "other", "what is the"
        elif style == "gqa" and len(objs) > 1:
            b = objs[rng.integers(0, len(objs))]
            if b is a:
                continue
            q = f"what is {_relation(b, a)} the {a[1]} {a[0]}?"
            ans, at, qt = b[0], "other", "what is"
        else:
            c = COLORS[rng.integers(0, len(COLORS))]
            q, ans, at, qt = (f"is the {a[0]} {c}?", "yes" if (a[0], c) in
                              {(o[0], o[1]) for o in objs} else "no", "yes/no", "is the")
        label = {ans: 1.0}
        if style == "vqa" and rng.random() < 0.25:  # soft scores: annotator disagreement
            alt = (COLORS[rng.integers(0, len(COLORS))] if at == "other" else
                   str(int(rng.integers(0, 6))) if at == "number" else ("no" if ans == "yes" else "yes"))
            if alt != ans:
                label = {ans: 0.9, alt: 0.3}
        out.append((q, label, at, qt))
    return out


def nlvr2_statement(rng, objs0, objs1) -> tuple[str, int]:
    c0, c1 = Counter(o[0] for o in objs0), Counter(o[0] for o in objs1)
    cc0 = {(o[1], o[0]) for o in objs0}
    t = rng.integers(0, 3)
    if t == 0:
        pool = sorted(cc0)
        col, cls = ((COLORS[rng.integers(0, len(COLORS))], CLASSES[rng.integers(0, len(CLASSES))])
                    if rng.random() < 0.5 else pool[rng.integers(0, len(pool))])
        return f"the left image contains a {col} {cls}", int((col, cls) in cc0)
    if t == 1:
        pool = sorted(set(c0) | set(c1))
        cls = pool[rng.integers(0, len(pool))]
        return f"both images contain a {cls}", int(cls in c0 and cls in c1)
    pool = sorted(set(c0) | set(c1))
    cls = pool[rng.integers(0, len(pool))]
    return (f"there are more {PLURALS[cls]} in the left image than in the right image",
            int(c0[cls] > c1[cls]))


# ---------------------------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------------------------

def _dump(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _split_sizes(images: int) -> dict:
    n_val = max(4, images // 4)
    n_vg = max(4, images // 4)
    n_train = max(4, images - n_val - n_vg)
    n_minival = max(2, int(n_val * 0.4))
    return {"train2014": n_train, "val2014": n_val, "minival": n_minival,
            "nominival": n_val - n_minival, "vg": n_vg,
            "gqa_testdev": max(2, images // 20), "nlvr2_pairs": max(4, images // 10)}


def train_vocab(sentences: list[str], path: str, vocab_size: int = 1000) -> int:
    """Train a lower-case BERT WordPiece vocab with ``tokenizers``; returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=1,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The trainer breaks ties between equally frequent merges in hash order, so the
    # intermediate pieces it keeps vary from run to run. Keep what is deterministic: the
    # whole words of the corpus and the single characters (with their ## forms), sorted.
    words = {w for s in sentences
             for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(s))}
    rest = sorted(t for t in tok.get_vocab()
                  if t not in specials and (t in words or len(t.removeprefix("##")) == 1))
    vocab = specials + rest
    with open(path, "w", encoding="utf-8") as f:
        for t in vocab:
            f.write(t + "\n")
    return len(vocab)


def generate(out: str, images: int = 2000, seed: int = 0, log=print,
             workers: int | None = None) -> dict:
    """Write the demo world under ``out`` (must not exist or be empty); returns demo.json."""
    t0 = time.time()
    workers = workers or min(4, os.cpu_count() or 1)
    os.makedirs(out, exist_ok=True)
    world = World(seed)
    rng = world.rng
    sz = _split_sizes(images)
    J = lambda *p: os.path.join(out, *p)

    ids = {
        "train2014": [f"COCO_train2014_{i:012d}" for i in range(1, sz["train2014"] + 1)],
        "val2014": [f"COCO_val2014_{i:012d}" for i in range(1, sz["val2014"] + 1)],
        "vg": [str(2300000 + i) for i in range(sz["vg"])],
        "gqa_testdev": [f"n{100000 + i}" for i in range(sz["gqa_testdev"])],
    }
    n_pairs = sz["nlvr2_pairs"]
    n_pairs_valid = max(2, n_pairs // 5)
    nlvr_split = {"train": n_pairs - n_pairs_valid, "valid": n_pairs_valid}
    for sp, n in nlvr_split.items():
        ids[f"nlvr2_{sp}"] = [f"{'dev' if sp == 'valid' else sp}-{p}-0-img{k}"
                              for p in range(n) for k in (0, 1)]
    imgs = {name: world.make_images(v) for name, v in ids.items()}

    sentences = []
    pre = {"mscoco_train": [], "mscoco_nominival": [], "mscoco_minival": [], "vgnococo": []}
    vqa = {"train": [], "nominival": [], "minival": []}
    gqa = {"train": [], "valid": [], "testdev": []}
    ans_dsets: dict[str, set] = {}
    ans_count: Counter = Counter()
    qid = 0

    def qa_items(name, i, style, n):
        nonlocal qid
        objs = _objects(imgs[name], i)
        res = []
        for q, label, at, qt in questions(rng, objs, n, style):
            qid += 1
            res.append((qid, q, label, at, qt))
            for a in label:
                ans_dsets.setdefault(a, set()).add(style)
                ans_count[a] += 1
        return objs, res

    for name, style, cap_src in (("train2014", "vqa", "mscoco"), ("val2014", "vqa", "mscoco"),
                                 ("vg", "gqa", "vg")):
        n_img = len(ids[name])
        for i, img_id in enumerate(ids[name]):
            objs, qas = qa_items(name, i, style, int(rng.integers(2, 6)))
            caps = captions(rng, objs, 5 if cap_src == "mscoco" else 4)
            if name == "train2014":
                split, task_split = "mscoco_train", "train"
            elif name == "val2014":
                split, task_split = (("mscoco_minival", "minival") if i < sz["minival"]
                                     else ("mscoco_nominival", "nominival"))
            else:
                split, task_split = "vgnococo", ("valid" if i >= n_img - max(2, n_img // 5)
                                                 else "train")
            rec = {"img_id": img_id, "sentf": {cap_src: caps}, "labelf": {}}
            if qas and rng.random() < 0.85:  # some images have captions only
                rec["sentf"][style] = [q for _, q, *_ in qas]
                rec["labelf"][style] = [lab for _, _, lab, *_ in qas]
            pre[split].append(rec)
            sentences += caps + [q for _, q, *_ in qas]
            for q_id, q, lab, at, qt in qas:
                if style == "vqa":
                    vqa[task_split].append({"answer_type": at, "img_id": img_id, "label": lab,
                                            "question_id": q_id, "question_type": qt, "sent": q})
                else:
                    gqa[task_split].append({"img_id": img_id, "label": lab,
                                            "question_id": str(q_id), "sent": q})
    for i, img_id in enumerate(ids["gqa_testdev"]):
        _, qas = qa_items("gqa_testdev", i, "gqa", 3)
        for q_id, q, lab, *_ in qas:
            gqa["testdev"].append({"img_id": img_id, "label": lab, "question_id": str(q_id),
                                   "sent": q})
            sentences.append(q)

    nlvr = {}
    for sp, n in nlvr_split.items():
        recs, name = [], f"nlvr2_{sp}"
        tag = "dev" if sp == "valid" else sp
        for p in range(n):
            o0, o1 = _objects(imgs[name], 2 * p), _objects(imgs[name], 2 * p + 1)
            for k in range(2):
                sent, label = nlvr2_statement(rng, o0, o1)
                recs.append({"identifier": f"{tag}-{p}-0-{k}", "img0": ids[name][2 * p],
                             "img1": ids[name][2 * p + 1], "label": label, "sent": sent,
                             "uid": f"nlvr2_{tag}_{len(recs)}"})
                sentences.append(sent)
        nlvr[sp] = recs

    # answer tables: all_ans (pre-training, by frequency) and per task
    all_ans = [{"ans": a, "dsets": sorted(ans_dsets[a])}
               for a, _ in sorted(ans_count.items(), key=lambda kv: (-kv[1], kv[0]))]
    _dump(J("lxmert", "all_ans.json"), all_ans)
    for split, recs in pre.items():
        _dump(J("lxmert", f"{split}.json"), recs)
    for task, splits in (("vqa", vqa), ("gqa", gqa)):
        answers = sorted({a for recs in splits.values() for r in recs for a in r["label"]})
        _dump(J(task, "trainval_ans2label.json"), {a: i for i, a in enumerate(answers)})
        _dump(J(task, "trainval_label2ans.json"), answers)
        for sp, recs in splits.items():
            _dump(J(task, f"{sp}.json"), recs)
    for sp, recs in nlvr.items():
        _dump(J("nlvr2", f"{sp}.json"), recs)

    tsvs = {"train2014": J("mscoco_imgfeat", "train2014_obj36.tsv"),
            "val2014": J("mscoco_imgfeat", "val2014_obj36.tsv"),
            "vg": J("vg_gqa_imgfeat", "vg_gqa_obj36.tsv"),
            "gqa_testdev": J("vg_gqa_imgfeat", "gqa_testdev_obj36.tsv"),
            "nlvr2_train": J("nlvr2_imgfeat", "train_obj36.tsv"),
            "nlvr2_valid": J("nlvr2_imgfeat", "valid_obj36.tsv")}
    _write_all_tsv(world, seed, [(imgs[name], path) for name, path in tsvs.items()], workers)
    vocab_size = train_vocab(sentences + [a for a in ans_count], J("vocab.txt"))  # after forking

    meta = {
        "demo_version": DEMO_VERSION, "images": images, "seed": seed,
        "split_sizes": sz, "classes": CLASSES, "colors": COLORS,
        "obj_id_of_class": world.obj_id_of_label[:len(CLASSES)].tolist(),
        "attr_id_of_color": world.attr_id_of_attr[:len(COLORS)].tolist(),
        "vocab": "vocab.txt", "vocab_size": vocab_size, "num_answers": len(all_ans),
        "pretrain_splits": {k: len(v) for k, v in pre.items()},
        "sentences": len(sentences),
        "tsv": {k: os.path.relpath(v, out) for k, v in tsvs.items()},
        "feature_stores_hint": "python -m lxmert_fast.data.convert "
                               "mscoco_imgfeat/*_obj36.tsv vg_gqa_imgfeat/vg_gqa_obj36.tsv "
                               "--out store",
        "seconds": round(time.time() - t0, 2),
    }
    _dump(J("demo.json"), meta)
    if log:
        log(f"demo world: {images} pre-training images, {len(sentences)} sentences, "
            f"{len(all_ans)} answers, vocab {vocab_size} -> {out} ({meta['seconds']} s)")
    return meta


def ensure_demo_data(cache_dir: str, images: int = 2000, seed: int = 0, log=None) -> str:
    """Path of a demo world with these parameters under ``cache_dir``; generated on first use.

    Generation happens in a temporary sibling directory renamed into place, so concurrent
    callers and crashes never see a half-written world.
    """
    path = os.path.join(os.path.abspath(cache_dir), f"demo-v{DEMO_VERSION}-n{images}-s{seed}")
    if os.path.exists(os.path.join(path, "demo.json")):
        return path
    from .convert import remove_stale_partials
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_partials(path, log)
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, images=images, seed=seed, log=log)
        try:
            os.rename(tmp, path)
        except OSError:  # someone else finished first
            if not os.path.exists(os.path.join(path, "demo.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.data.demo",
        description="Write the synthetic demo world (features TSV, pre-training JSON, "
                    "VQA/GQA/NLVR2 JSON, answer tables, WordPiece vocab) in the original "
                    "LXMERT data/ layout.")
    p.add_argument("--out", required=True, help="output data root (created)")
    p.add_argument("--images", type=int, default=2000,
                   help="pre-training images (default 2000; task images are extra)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    if a.images < 8:
        p.error("--images must be at least 8")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        p.error(f"{a.out} exists and is not empty")
    tmp = f"{out}.partial-{os.getpid()}"  # written aside, renamed into place when complete
    try:
        generate(tmp, images=a.images, seed=a.seed)
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
