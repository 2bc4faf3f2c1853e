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

The world: each image holds 2-4 distinct objects (``--objects``; one of 20 classes, one of 8 colours, a box),
each reported several times as a detector does (20-28 of the 36 boxes, jittered around the
object), the other boxes small background clutter. A 2048-d object feature is
``E_obj[label] + E_attr[attr] + pos(box) + noise`` with fixed random embeddings centred over the
labels (deterministic per seed; unlike ReLU RoI features they have no common offset, which would
hide the class signal from a fresh model and make grounding emerge too slowly for a CPU demo).
The detector ids / confidences are written as Faster R-CNN's would be (object ids < 1600,
attribute ids < 400). Captions ("a red dog left of a blue car"), questions ("what color is the
dog?" -> "red", "how many cars are there?" -> "2", "is there a cat?" -> "no") and NLVR2
statements are generated from the objects, so their object words and answers can only be known
from the image: a model has something cross-modal to learn. NLVR2 comes in sets, as the real
data: each sentence is judged on 4 image pairs whose images share 3 classes and 3 colours
(identifiers ``split-set-pair-sentence``; consistency groups the pairs of a sentence).

``--objects 1`` writes a one-object world: each image shows a single object and its captions are
"a photo of a red kite" / "the kite is red". Reading a word off the image is then a first-order
task, and cross-modality matching, which in the default world stays at chance for longer than a
CPU run affords, leaves chance after about 1000 steps of a small model trained without dropout
(bench/RESULTS.md).

:func:`ensure_demo_data` generates once (atomically, in a temporary directory renamed into place)
and reuses after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from .formats import write_tsv_row
from .tsv_convert import remove_stale_partials

CLASSES = ["dog", "cat", "car", "bus", "horse", "bird", "tree", "chair", "table", "cup",
           "ball", "boat", "bike", "clock", "lamp", "book", "phone", "shoe", "hat", "kite"]
PLURALS = {c: (c + "es" if c.endswith("s") else c + "s") for c in CLASSES}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "purple"]
NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
NUM_BG_CLASSES = 30      # background detector labels ("thing", clutter)
NUM_BG_ATTRS = 12
NUM_OBJECTS = 36
FEAT_DIM = 2048
DEFAULT_OBJECTS = (2, 4)             # distinct ("primary") objects per image: min, max
JOBS_OBJECTS = (1, 1)                # the world of the jobs (pre-training, fine-tuning) without --demo_objects
MAX_OBJECTS = 6                      # most distinct objects an image may have
SALIENT_DETECTIONS = (20, 28)        # of the 36 detections, how many report a primary object
NLVR2_PAIRS = 4                      # image pairs per NLVR2 set (each sentence is judged on all)
NLVR2_SENTENCES = 4                  # sentences per set
NLVR2_POOL = 2                       # classes / colours a set's images draw from
DEMO_VERSION = 3


def plural(cls: str, n: int) -> str:
    return cls if n == 1 else PLURALS[cls]


def _objects_error(given) -> ValueError:
    return ValueError(f"objects per image {given!r}: expected N or MIN-MAX with 1 <= MIN <= MAX <= "
                      f"{MAX_OBJECTS} (the default world is {DEFAULT_OBJECTS[0]}-{DEFAULT_OBJECTS[1]})")


def check_objects(objects: tuple[int, int]) -> tuple[int, int]:
    """(min, max) distinct objects per image, validated; ValueError naming the rule."""
    lo, hi = (int(v) for v in objects)
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise _objects_error(f"{lo}-{hi}")
    return lo, hi


def parse_objects(text: str) -> tuple[int, int]:
    """``"2-4"`` or ``"1"`` -> (min, max) distinct objects per image; ValueError naming the rule."""
    parts = str(text).split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise _objects_error(text)
    lo, hi = int(parts[0]), int(parts[-1])
    if not 1 <= lo <= hi <= MAX_OBJECTS:
        raise _objects_error(text)
    return lo, hi


def objects_arg(text: str) -> tuple[int, int]:
    """argparse ``type=`` for ``--demo_objects`` / ``--objects``."""
    try:
        return parse_objects(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_demo_objects_argument(group) -> None:
    """``--demo_objects`` for the jobs that generate the demo world (pre-training, fine-tuning);
    ``None`` when not given, so that a job can refuse it with ``--data_root``."""
    group.add_argument("--demo_objects", type=objects_arg, default=None, metavar="N|MIN-MAX",
                       help="distinct objects per image of the demo world (default 1: the one-object world, where "
                            "matching is learned within a short CPU run; 2-4: the multi-object world)")


def jobs_demo_objects(demo_objects, data_root):
    """The jobs' ``--demo_objects``: as given, else the one-object world on the demo (``JOBS_OBJECTS``: the quick
    start reads the image within minutes there; a fine-tuning finds the world its pre-training used); None with
    ``--data_root`` (where the flag is refused)."""
    if demo_objects is None and data_root is None:
        return JOBS_OBJECTS
    return demo_objects


class World:
    """Objects of every image of the demo world plus the fixed random feature model.

    ``objects``: (min, max) distinct objects per image (the default world: 2-4).
    """

    def __init__(self, seed: int, objects: tuple[int, int] = DEFAULT_OBJECTS):
        self.objects = check_objects(objects)
        self.rng = np.random.default_rng(seed)
        r = np.random.default_rng(seed + 7919)  # feature model: independent of the image count
        n_lab, n_att = len(CLASSES) + NUM_BG_CLASSES, len(COLORS) + NUM_BG_ATTRS
        self.obj_id_of_label = r.choice(1600, n_lab, replace=False).astype(np.int64)
        self.attr_id_of_attr = r.choice(400, n_att, replace=False).astype(np.int64)
        # Embeddings centred over labels, so features have no common component: a shared offset
        # (as ReLU features have) hides the class signal from a freshly initialised model, and
        # grounding then takes far longer to emerge than a CPU demo can afford.
        e_obj = r.standard_normal((n_lab, FEAT_DIM), dtype=np.float32)
        self.e_obj = e_obj - e_obj.mean(0, keepdims=True)
        e_attr = 0.8 * r.standard_normal((n_att, FEAT_DIM), dtype=np.float32)
        self.e_attr = e_attr - e_attr.mean(0, keepdims=True)
        self.e_pos = (0.5 * r.standard_normal((8, FEAT_DIM), dtype=np.float32))
        self.noise_bank = (0.4 * r.standard_normal((1024, FEAT_DIM), dtype=np.float32))

    def make_images(self, ids: list[str], class_pool: np.ndarray | None = None,
                    color_pool: np.ndarray | None = None) -> dict:
        """Sample the objects of images ``ids``; arrays are (N, 36, ...).

        Each image has ``self.objects`` (2-4 by default) distinct "primary" objects (one of 20
        classes, one of 8 colours).
        As a real detector does, it reports each of them several times (boxes jittered around
        the object, fresh feature noise): ``salient`` marks every detection of a primary object,
        ``primary`` its first detection; the remaining slots are small background clutter.
        ``class_pool`` / ``color_pool`` (N, m): draw image i's primary objects from these only
        (NLVR2 sets: the pairs of one sentence share a few classes and colours).
        """
        rng, n, k = self.rng, len(ids), NUM_OBJECTS
        h = rng.integers(300, 481, n)
        w = rng.integers(400, 641, n)
        n_prim = rng.integers(self.objects[0], self.objects[1] + 1, n)
        n_sal = rng.integers(SALIENT_DETECTIONS[0], SALIENT_DETECTIONS[1] + 1, n)
        slot = np.arange(k)[None, :]
        primary = slot < n_prim[:, None]                                      # (N, 36)
        salient = slot < n_sal[:, None]
        # detection slot -> the primary object it reports (itself for primaries)
        owner = np.where(primary, slot, (rng.random((n, k)) * n_prim[:, None]).astype(np.int64))
        p_label = rng.integers(0, len(CLASSES), (n, k))
        p_attr = rng.integers(0, len(COLORS), (n, k))
        if class_pool is not None:
            p_label = np.take_along_axis(class_pool, rng.integers(0, class_pool.shape[1], (n, k)), 1)
        if color_pool is not None:
            p_attr = np.take_along_axis(color_pool, rng.integers(0, color_pool.shape[1], (n, k)), 1)
        p_size = rng.uniform(0.15, 0.45, (n, k, 2))
        p_centre = rng.uniform(0.15, 0.85, (n, k, 2))
        own = lambda a: np.take_along_axis(a, owner.reshape(owner.shape + (1,) * (a.ndim - 2)), 1)
        label = np.where(salient, own(p_label), len(CLASSES) + rng.integers(0, NUM_BG_CLASSES, (n, k)))
        attr = np.where(salient, own(p_attr), len(COLORS) + rng.integers(0, NUM_BG_ATTRS, (n, k)))
        jitter = np.where(primary[..., None], 1.0, rng.uniform(0.7, 1.3, (n, k, 2)))
        size = np.where(salient[..., None], own(p_size) * jitter, rng.uniform(0.03, 0.12, (n, k, 2)))
        shift = np.where(primary[..., None], 0.0, rng.uniform(-0.06, 0.06, (n, k, 2)))
        centre = np.where(salient[..., None], own(p_centre) + shift, rng.uniform(0.1, 0.9, (n, k, 2)))
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
        return {"ids": list(ids), "h": h, "w": w, "salient": take(salient), "primary": take(primary),
                "label": take(label), "attr": take(attr), "boxes": take(boxes),
                "frac": take(frac.astype(np.float32)),
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
        pos = np.stack([cx - 0.5, cy - 0.5, bw - 0.2, bh - 0.2, np.sin(np.pi * cx) - 0.6,
                        np.cos(np.pi * cx), np.sin(np.pi * cy) - 0.6, np.cos(np.pi * cy)],
                       -1).astype(np.float32)                                  # about zero-mean
        np.matmul(pos.reshape(-1, 8), self.e_pos, out=out.reshape(-1, FEAT_DIM))  # 2-D: BLAS
        np.take(self.e_obj, imgs["label"][sl], axis=0, out=tmp, mode="clip")
        out += tmp
        np.take(self.e_attr, imgs["attr"][sl], axis=0, out=tmp, mode="clip")
        out += tmp
        np.take(self.noise_bank, imgs["noise_idx"][sl], axis=0, out=tmp, mode="clip")
        tmp *= imgs["noise_sign"][sl][..., None]
        out += tmp
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
    """Distinct (primary) objects of image i: (class, colour, cx, cy)."""
    out = []
    for j in np.flatnonzero(imgs["primary"][i]).tolist():
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
    """``n`` captions of an image: two-object templates, counts and colours; an image of one
    object gets "a photo of a red kite" / "the kite is red"."""
    counts = Counter(o[0] for o in objs)
    out = []
    for _ in range(n):
        if len(objs) == 1:
            a = objs[0]
            out.append(f"the {a[0]} is {a[1]}" if rng.random() < 0.5 else f"a photo of a {a[1]} {a[0]}")
            continue
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


def nlvr2_statements(classes) -> list[tuple[str, object]]:
    """Every statement about an image pair that a set's class pool allows: ``[(sentence, truth)]``,
    ``truth(objs_left, objs_right) -> 0/1``. They name classes only: what a short fine-tuning of the demo model
    learns to check in both images (a statement of class and colour stayed near the majority answer)."""
    counts = lambda objs: Counter(o[0] for o in objs)  # noqa: E731
    out = []
    for cls in (CLASSES[c] for c in classes):
        out += [(f"the left image contains a {cls}", lambda o0, o1, a=cls: int(a in counts(o0))),
                (f"the right image contains a {cls}", lambda o0, o1, a=cls: int(a in counts(o1))),
                (f"both images contain a {cls}", lambda o0, o1, a=cls: int(a in counts(o0) and a in counts(o1))),
                (f"there are more {PLURALS[cls]} in the left image than in the right image",
                 lambda o0, o1, a=cls: int(counts(o0)[a] > counts(o1)[a]))]
    return out


def nlvr2_statement(rng, classes, pairs, exclude=()) -> tuple[str, list[int]]:
    """A sentence for an NLVR2 set and its labels on the set's image ``pairs`` (``[(objs_left, objs_right)]``; as
    in NLVR2, one sentence is judged on several pairs): drawn among the statements the set's pools allow (not in
    ``exclude``) that are true of as near half of the pairs as any, so that the sentence alone does not tell the
    label (the majority answer scores about 0.5) and a model must read both images."""
    cands = [c for c in nlvr2_statements(classes) if c[0] not in exclude]
    labels = [[truth(o0, o1) for o0, o1 in pairs] for _, truth in cands]
    gap = [abs(2 * sum(lab) - len(pairs)) for lab in labels]
    best = [i for i, g in enumerate(gap) if g == min(gap)]
    i = best[int(rng.integers(0, len(best)))]
    return cands[i][0], labels[i]


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
            "gqa_testdev": max(2, images // 20), "nlvr2_pairs": max(8, images // 5)}


def train_vocab(sentences: list[str], path: str, vocab_size: int = 1000) -> int:
    """Train a lower-case BERT WordPiece vocab with ``tokenizers``; returns its size."""
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


def _image_ids(sz: dict) -> tuple[dict, dict]:
    """Image ids of every split (the original data's id formats) and the NLVR2 sets per split.

    NLVR2: sets of NLVR2_PAIRS image pairs; each sentence of a set is judged on every pair
    (identifier split-set-pair-sentence, as the real data: consistency groups by sentence).
    """
    ids = {
        "train2014": [f"COCO_train2014_{i:012d}" for i in range(1, sz["train2014"] + 1)],
        "val2014": [f"COCO_val2014_{i:012d}" for i in range(1, sz["val2014"] + 1)],
        "vg": [str(2300000 + i) for i in range(sz["vg"])],
        "gqa_testdev": [f"n{100000 + i}" for i in range(sz["gqa_testdev"])],
    }
    n_sets = max(2, sz["nlvr2_pairs"] // NLVR2_PAIRS)
    n_sets_valid = max(1, n_sets // 5)
    nlvr_split = {"train": n_sets - n_sets_valid, "valid": n_sets_valid}
    for sp, n in nlvr_split.items():
        ids[f"nlvr2_{sp}"] = [f"{'dev' if sp == 'valid' else sp}-{s}-{p}-img{k}"
                              for s in range(n) for p in range(NLVR2_PAIRS) for k in (0, 1)]
    return ids, nlvr_split


def _make_all_images(world: World, ids: dict, nlvr_split: dict) -> tuple[dict, dict]:
    """The objects of every image, and per NLVR2 split the (class, colour) pools of its sets.

    The draws from ``world.rng`` come in a fixed order (the world's bytes depend on it): the
    non-NLVR2 splits first, then per NLVR2 split its class pools, colour pools and images.
    """
    rng = world.rng
    imgs = {name: world.make_images(v) for name, v in ids.items() if not name.startswith("nlvr2_")}
    nlvr_pools = {}
    for sp, n in nlvr_split.items():
        per_img = 2 * NLVR2_PAIRS
        cls_pool = np.stack([rng.choice(len(CLASSES), NLVR2_POOL, replace=False) for _ in range(n)])
        col_pool = np.stack([rng.choice(len(COLORS), NLVR2_POOL, replace=False) for _ in range(n)])
        nlvr_pools[sp] = (cls_pool, col_pool)
        imgs[f"nlvr2_{sp}"] = world.make_images(ids[f"nlvr2_{sp}"], np.repeat(cls_pool, per_img, 0),
                                                np.repeat(col_pool, per_img, 0))
    return imgs, nlvr_pools


class _Questions:
    """Asks the questions of the world: one question id sequence over every task, and the
    answers' data sets and frequencies (for ``all_ans.json``)."""

    def __init__(self, rng):
        self.rng = rng
        self.qid = 0
        self.ans_dsets: dict[str, set] = {}
        self.ans_count: Counter = Counter()

    def ask(self, imgs: dict, i: int, style: str, n: int):
        """Image i's objects and ``n`` questions about it: [(qid, question, label, type, qtype)]."""
        objs = _objects(imgs, i)
        res = []
        for q, label, at, qt in questions(self.rng, objs, n, style):
            self.qid += 1
            res.append((self.qid, q, label, at, qt))
            for a in label:
                self.ans_dsets.setdefault(a, set()).add(style)
                self.ans_count[a] += 1
        return objs, res

    def all_ans(self) -> list[dict]:
        """The pre-training answer table, by frequency."""
        return [{"ans": a, "dsets": sorted(self.ans_dsets[a])}
                for a, _ in sorted(self.ans_count.items(), key=lambda kv: (-kv[1], kv[0]))]


def _image_split(name: str, i: int, n_img: int, sz: dict) -> tuple[str, str]:
    """(pre-training split, task split) of image i of ``name`` (train2014 / val2014 / vg)."""
    if name == "train2014":
        return "mscoco_train", "train"
    if name == "val2014":
        return (("mscoco_minival", "minival") if i < sz["minival"]
                else ("mscoco_nominival", "nominival"))
    return "vgnococo", ("valid" if i >= n_img - max(2, n_img // 5) else "train")


def _pretrain_and_qa_records(rng, ids: dict, imgs: dict, sz: dict, asker: _Questions,
                             sentences: list[str]) -> tuple[dict, dict, dict]:
    """The pre-training records (captions and questions) with the VQA / GQA records of the same
    questions, then GQA testdev; appends every sentence to ``sentences``."""
    pre = {"mscoco_train": [], "mscoco_nominival": [], "mscoco_minival": [], "vgnococo": []}
    vqa = {"train": [], "nominival": [], "minival": []}
    gqa = {"train": [], "valid": [], "testdev": []}
    for name, style, cap_src in (("train2014", "vqa", "mscoco"), ("val2014", "vqa", "mscoco"),
                                 ("vg", "gqa", "vg")):
        n_img = len(ids[name])
        for i, img_id in enumerate(ids[name]):
            objs, qas = asker.ask(imgs[name], i, style, int(rng.integers(2, 6)))
            caps = captions(rng, objs, 5 if cap_src == "mscoco" else 4)
            split, task_split = _image_split(name, i, n_img, sz)
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
        _, qas = asker.ask(imgs["gqa_testdev"], i, "gqa", 3)
        for q_id, q, lab, *_ in qas:
            gqa["testdev"].append({"img_id": img_id, "label": lab, "question_id": str(q_id),
                                   "sent": q})
            sentences.append(q)
    return pre, vqa, gqa


def _nlvr2_records(rng, ids: dict, imgs: dict, nlvr_split: dict, nlvr_pools: dict,
                   sentences: list[str]) -> dict:
    """NLVR2 records per split: NLVR2_SENTENCES statements per set, each judged on every pair of
    the set; appends the statements to ``sentences``."""
    nlvr = {}
    for sp, n in nlvr_split.items():
        recs, name = [], f"nlvr2_{sp}"
        tag = "dev" if sp == "valid" else sp
        cls_pool, _ = nlvr_pools[sp]
        for st in range(n):
            first = 2 * st * NLVR2_PAIRS
            pairs = [(_objects(imgs[name], i), _objects(imgs[name], i + 1))
                     for i in range(first, first + 2 * NLVR2_PAIRS, 2)]
            said: list[str] = []
            for k in range(NLVR2_SENTENCES):
                sent, labels = nlvr2_statement(rng, cls_pool[st], pairs, exclude=said)
                said.append(sent)
                sentences.append(sent)
                for p, label in enumerate(labels):
                    i = first + 2 * p
                    recs.append({"identifier": f"{tag}-{st}-{p}-{k}", "img0": ids[name][i],
                                 "img1": ids[name][i + 1], "label": label, "sent": sent,
                                 "uid": f"nlvr2_{tag}_{len(recs)}"})
        nlvr[sp] = recs
    return nlvr


def _write_json_files(out: str, all_ans: list, pre: dict, vqa: dict, gqa: dict, nlvr: dict) -> None:
    """The answer tables (all_ans for pre-training, per task) and every split's records."""
    J = lambda *p: os.path.join(out, *p)
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


def _tsv_paths(out: str) -> dict:
    """Image split -> its features TSV under ``out`` (the original data's file names)."""
    J = lambda *p: os.path.join(out, *p)
    return {"train2014": J("mscoco_imgfeat", "train2014_obj36.tsv"),
            "val2014": J("mscoco_imgfeat", "val2014_obj36.tsv"),
            "vg": J("vg_gqa_imgfeat", "vg_gqa_obj36.tsv"),
            "gqa_testdev": J("vg_gqa_imgfeat", "gqa_testdev_obj36.tsv"),
            "nlvr2_train": J("nlvr2_imgfeat", "train_obj36.tsv"),
            "nlvr2_valid": J("nlvr2_imgfeat", "valid_obj36.tsv")}


def generate(out: str, images: int = 2000, seed: int = 0, log=print,
             workers: int | None = None, objects: tuple[int, int] = DEFAULT_OBJECTS) -> dict:
    """Write the demo world under ``out`` (must not exist or be empty); returns demo.json.

    ``objects``: (min, max) distinct objects per image (default 2-4).
    """
    t0 = time.time()
    workers = workers or min(4, os.cpu_count() or 1)
    os.makedirs(out, exist_ok=True)
    world = World(seed, objects)
    rng = world.rng
    sz = _split_sizes(images)
    ids, nlvr_split = _image_ids(sz)
    imgs, nlvr_pools = _make_all_images(world, ids, nlvr_split)

    sentences: list[str] = []
    asker = _Questions(rng)
    pre, vqa, gqa = _pretrain_and_qa_records(rng, ids, imgs, sz, asker, sentences)
    nlvr = _nlvr2_records(rng, ids, imgs, nlvr_split, nlvr_pools, sentences)
    all_ans = asker.all_ans()
    _write_json_files(out, all_ans, pre, vqa, gqa, nlvr)

    tsvs = _tsv_paths(out)
    _write_all_tsv(world, seed, [(imgs[name], path) for name, path in tsvs.items()], workers)
    vocab_size = train_vocab(sentences + [a for a in asker.ans_count],
                             os.path.join(out, "vocab.txt"))  # after forking

    meta = {
        "demo_version": DEMO_VERSION, "images": images, "seed": seed,
        "objects_per_image": list(world.objects),
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
    _dump(os.path.join(out, "demo.json"), meta)
    if log:
        log(f"demo world: {images} pre-training images, {len(sentences)} sentences, "
            f"{len(all_ans)} answers, vocab {vocab_size} -> {out} ({meta['seconds']} s)")
    return meta


def demo_dir_name(images: int, seed: int, objects: tuple[int, int] = DEFAULT_OBJECTS) -> str:
    """Cache folder name of a world (the default world keeps its name of before the option)."""
    lo, hi = check_objects(objects)
    suffix = "" if (lo, hi) == DEFAULT_OBJECTS else f"-o{lo}-{hi}"
    return f"demo-v{DEMO_VERSION}-n{images}-s{seed}{suffix}"


def ensure_demo_data(cache_dir: str, images: int = 2000, seed: int = 0, log=None,
                     objects: tuple[int, int] = DEFAULT_OBJECTS) -> str:
    """Path of a demo world with these parameters under ``cache_dir``; generated on first use.

    Generation happens in a temporary sibling directory renamed into place, so concurrent
    callers and crashes never see a half-written world.
    """
    path = os.path.join(os.path.abspath(cache_dir), demo_dir_name(images, seed, objects))
    if os.path.exists(os.path.join(path, "demo.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_partials(path, log)
    tmp = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, images=images, seed=seed, log=log, objects=objects)
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
    p.add_argument("--objects", type=objects_arg, default=DEFAULT_OBJECTS,
                   help="distinct objects per image, N or MIN-MAX (default 2-4; 1 gives one object "
                        "per image, a world where matching is learned within a CPU run)")
    a = p.parse_args(argv)
    if a.images < 8:
        p.error("--images must be at least 8")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        p.error(f"{a.out} exists and is not empty")
    tmp = f"{out}.partial-{os.getpid()}"  # written aside, renamed into place when complete
    try:
        generate(tmp, images=a.images, seed=a.seed, objects=a.objects)
        if os.path.exists(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
