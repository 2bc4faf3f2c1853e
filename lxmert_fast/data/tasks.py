"""VQA / GQA / NLVR2 fine-tuning data, metrics and prediction files (the original formats).

Data root layout (airsplay/lxmert's ``data/``; the demo world writes the same)::

    vqa/<split>.json  vqa/trainval_ans2label.json  vqa/trainval_label2ans.json
    gqa/<split>.json  gqa/trainval_ans2label.json  gqa/trainval_label2ans.json
    nlvr2/<split>.json
    mscoco_imgfeat/{train2014,val2014,test2015}_obj36.tsv        (VQA)
    vg_gqa_imgfeat/vg_gqa_obj36.tsv, gqa_testdev_obj36.tsv        (GQA)
    nlvr2_imgfeat/{train,valid,test}_obj36.tsv                    (NLVR2)

Records: VQA ``{"question_id", "img_id", "sent", "label": {answer: score}, "answer_type",
"question_type"}``, GQA ``{"question_id", "img_id", "sent", "label"}``, NLVR2
``{"identifier", "uid", "img0", "img1", "sent", "label": 0|1}``; test splits may lack labels.

Each feature file is converted once into its own memory-mapped store under the store root
(``<store_root>/store-<name>``, found again by its source fingerprint, shared with pre-training:
see :mod:`lxmert_fast.data.store_root`); a split's examples point at (store, row) pairs and batches
read features with ``preadv``. Sentences are tokenised once, as
the original: ``[CLS] pieces [SEP]``, at most 20 tokens.

Targets, as the original code builds them: VQA a dense soft-score vector over the answer table
(answers outside the table dropped; an example with none left trains towards all zeros); GQA the
label of the highest-scoring answer in the table (-100 when none: ignored by the loss), and the
same dense vector for the optional BCE loss; NLVR2 the 0/1 label.

Metrics (computed on labelled examples only):
- VQA: the mean over questions of the soft score of the predicted answer in the question's label
  dict (0 when absent), overall and per ``answer_type``;
- GQA: accuracy: the prediction equals the question's gold answer (its highest-scoring one);
- NLVR2: accuracy, and consistency as the official ``nlvr2/eval/metrics.py``: examples are grouped
  by their identifier ``split-set-pair-sentence`` with the pair field blanked (one group = one
  sentence across the image pairs it was written for); the share of groups all correct.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from lxmert_fast.utils import atomic_write_text

from .formats import BadRowLog, DataFormatError, iter_json_records, read_ans2label, read_label2ans, read_task_json
from .loader import ResumableLoader, collate_identity, make_batch_sampler
from .store import FeatureStore
from .store_root import ensure_store
from .tokenization import MAX_LEN, tokenize_sentences

IGNORE_INDEX = -100
TASK_NAMES = ("vqa", "gqa", "nlvr2")


class TaskDataError(ValueError):
    """A task's files are missing or do not fit together (the message names the file and field)."""


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # "qa" (one image, an answer table) | "pair" (two images, 0/1)
    train: str                   # default splits, as the original run scripts
    valid: str
    lr: float                    # the paper's fine-tuning learning rate
    split_features: dict         # split -> feature TSV relative to the data root
    default_features: Optional[str]  # for splits not listed above (None: an error)
    id_field: str

    @property
    def num_images(self) -> int:
        return 2 if self.kind == "pair" else 1


TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec(
        "vqa", "qa", train="train,nominival", valid="minival", lr=5e-5,
        split_features={"train": "mscoco_imgfeat/train2014_obj36.tsv",
                        "valid": "mscoco_imgfeat/val2014_obj36.tsv",
                        "minival": "mscoco_imgfeat/val2014_obj36.tsv",
                        "nominival": "mscoco_imgfeat/val2014_obj36.tsv",
                        "test": "mscoco_imgfeat/test2015_obj36.tsv"},
        default_features=None, id_field="question_id"),
    "gqa": TaskSpec(
        "gqa", "qa", train="train,valid", valid="testdev", lr=1e-5,
        split_features={"testdev": "vg_gqa_imgfeat/gqa_testdev_obj36.tsv",
                        "testdev_all": "vg_gqa_imgfeat/gqa_testdev_obj36.tsv"},
        default_features="vg_gqa_imgfeat/vg_gqa_obj36.tsv", id_field="question_id"),
    "nlvr2": TaskSpec(
        "nlvr2", "pair", train="train", valid="valid", lr=5e-5,
        split_features={"train": "nlvr2_imgfeat/train_obj36.tsv",
                        "valid": "nlvr2_imgfeat/valid_obj36.tsv",
                        "test": "nlvr2_imgfeat/test_obj36.tsv"},
        default_features=None, id_field="identifier"),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}")
    return TASKS[name]


def split_list(splits) -> list[str]:
    names = splits.split(",") if isinstance(splits, str) else list(splits or [])
    return [s.strip() for s in names if s.strip()]


def parse_feature_overrides(text: Optional[str]) -> dict[str, str]:
    """``"test=/x/test2015_obj36.tsv,train=..."`` -> {split: path}."""
    out: dict[str, str] = {}
    for part in split_list(text or ""):
        if "=" not in part:
            raise TaskDataError(f"--features {part!r}: expected SPLIT=PATH")
        split, path = part.split("=", 1)
        out[split.strip()] = path.strip()
    return out


def feature_file(spec: TaskSpec, data_root: str, split: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """The TSV holding the images of ``split`` (original file names; ``overrides`` first)."""
    if overrides and split in overrides:
        rel = overrides[split]
    elif split in spec.split_features:
        rel = spec.split_features[split]
    elif spec.default_features is not None:
        rel = spec.default_features
    else:
        raise TaskDataError(
            f"{spec.name}: no feature file is known for split {split!r} (known: {sorted(spec.split_features)}); "
            f"name it with --features {split}=PATH")
    return rel if os.path.isabs(rel) else os.path.join(data_root, rel)


def split_file(spec: TaskSpec, data_root: str, split: str) -> str:
    return os.path.join(data_root, spec.name, f"{split}.json")


# ---------------------------------------------------------------------------------------------- answers
class TaskAnswers:
    """A task's answer table: ``label2ans`` (list) and ``ans2label`` (dict), checked to agree."""

    def __init__(self, label2ans: Sequence[str], source: str = "<list>"):
        self.label2ans = list(label2ans)
        self.ans2label = {a: i for i, a in enumerate(self.label2ans)}
        self.source = source
        if len(self.ans2label) != len(self.label2ans):
            raise TaskDataError(f"{source}: duplicate answers in the answer table")

    def __len__(self) -> int:
        return len(self.label2ans)

    @classmethod
    def load(cls, task_dir: str) -> "TaskAnswers":
        """``trainval_ans2label.json`` (+ ``trainval_label2ans.json`` if present, which must agree)."""
        a2l_path = os.path.join(task_dir, "trainval_ans2label.json")
        l2a_path = os.path.join(task_dir, "trainval_label2ans.json")
        have_a2l, have_l2a = os.path.isfile(a2l_path), os.path.isfile(l2a_path)
        if not have_a2l and not have_l2a:
            raise TaskDataError(
                f"answer table missing: {a2l_path} (and {l2a_path}) not found; the task needs its answer table "
                f"(trainval_ans2label.json: {{answer: label}}, trainval_label2ans.json: [answer, ...])")
        if have_a2l:
            a2l = read_ans2label(a2l_path)
            label2ans = [None] * len(a2l)
            for ans, lab in a2l.items():
                label2ans[lab] = ans
            if have_l2a:
                l2a = read_label2ans(l2a_path)
                if l2a != label2ans:
                    bad = next((i for i in range(max(len(l2a), len(label2ans)))
                                if i >= len(l2a) or i >= len(label2ans) or l2a[i] != label2ans[i]), None)
                    raise DataFormatError(
                        l2a_path, 1, f"[{bad}]",
                        f"does not agree with {os.path.basename(a2l_path)} ({len(l2a)} vs {len(label2ans)} answers; "
                        f"first difference at label {bad})")
            return cls(label2ans, a2l_path)
        return cls(read_label2ans(l2a_path), l2a_path)


# ---------------------------------------------------------------------------------------------- examples
@dataclass
class TaskExamples:
    """The records of one or more splits, flattened (row i = example i)."""

    task: str
    splits: list[str]
    ids: list                                  # question_id (VQA/GQA) / identifier (NLVR2)
    sents: list[str]
    img_ids: list[tuple[str, ...]]             # 1 (VQA/GQA) or 2 (NLVR2) per example
    feature_files: list[tuple[str, ...]]       # the TSV of each image
    labels: list                               # {answer: score} / 0|1 / None (unlabelled)
    answer_types: list[Optional[str]]
    sources: list[tuple[str, int]] = field(default_factory=list)  # (json path, index in file)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> int:
        return sum(lab is not None for lab in self.labels)

    def gold(self) -> dict:
        """{id: label} of the labelled examples."""
        return {i: lab for i, lab in zip(self.ids, self.labels) if lab is not None}


def read_examples(spec: TaskSpec, data_root: str, splits, *, require_label: bool = False,
                  feature_overrides: Optional[Mapping[str, str]] = None,
                  skip: Optional[BadRowLog] = None) -> TaskExamples:
    """Read and validate the JSON of ``splits``; ids must be unique across them."""
    names = split_list(splits)
    if not names:
        raise TaskDataError(f"{spec.name}: no split given")
    ex = TaskExamples(spec.name, names, [], [], [], [], [], [], [])
    seen: dict[Any, str] = {}
    for split in names:
        path = split_file(spec, data_root, split)
        if not os.path.isfile(path):
            raise TaskDataError(f"{spec.name} split {split!r}: {path} not found")
        tsv = feature_file(spec, data_root, split, feature_overrides)
        for idx, rec in enumerate(read_task_json(path, spec.name, require_label=require_label, skip=skip)):
            key = rec[spec.id_field]
            if key in seen:
                raise DataFormatError(path, None, spec.id_field,
                                      f"{spec.id_field} {key!r} appears in {seen[key]} too")
            seen[key] = path
            ex.ids.append(key)
            ex.sents.append(rec["sent"])
            if spec.kind == "pair":
                ex.img_ids.append((rec["img0"], rec["img1"]))
                ex.feature_files.append((tsv, tsv))
            else:
                ex.img_ids.append((rec["img_id"],))
                ex.feature_files.append((tsv,))
            ex.labels.append(rec.get("label"))
            ex.answer_types.append(rec.get("answer_type"))
            ex.sources.append((path, idx))
    return ex


def _line_of(path: str, id_field: str, key) -> Optional[int]:
    """Line of the record with ``id_field == key`` (for error messages only)."""
    try:
        for _, line, rec in iter_json_records(path):
            if isinstance(rec, dict) and rec.get(id_field) == key:
                return line
    except DataFormatError:
        pass
    return None


# ---------------------------------------------------------------------------------------------- dataset
class TaskDataset(torch.utils.data.Dataset):
    """Examples of a task split, tokenised, with their images located in feature stores.

    ``__getitems__`` builds a whole batch (use :func:`make_task_loader`): ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (B, L); ``visual_feats`` (B, N, D) or, for NLVR2,
    (B, 2, N, D) in the store's dtype; ``visual_pos`` likewise with 4; ``index`` (B,) example
    rows; for labelled VQA/GQA ``target`` (B, K) soft scores and ``label`` (B,) the top answer
    (-100: none); for NLVR2 ``label`` (B,) (-100: unlabelled).
    """

    def __init__(self, spec: TaskSpec, examples: TaskExamples, stores: Mapping[str, FeatureStore],
                 tokens_sl: np.ndarray, lengths_s: np.ndarray, answers: Optional[TaskAnswers] = None,
                 skip: Optional[BadRowLog] = None):
        self.spec, self.examples, self.answers = spec, examples, answers
        self.store_paths = sorted(stores)
        self.stores = [stores[p] for p in self.store_paths]
        store_ix = {p: i for i, p in enumerate(self.store_paths)}
        n, p = len(examples), spec.num_images
        loc = np.zeros((n, p, 2), np.int64)
        keep = np.ones(n, bool)
        skip = skip if skip is not None else BadRowLog(False)
        for i, (imgs, files) in enumerate(zip(examples.img_ids, examples.feature_files)):
            for j, (img_id, tsv) in enumerate(zip(imgs, files)):
                si = store_ix[tsv]
                row = self.stores[si].index().get(img_id)
                if row is None:
                    path, _ = examples.sources[i]
                    field_name = "img_id" if p == 1 else f"img{j}"
                    err = DataFormatError(
                        path, _line_of(path, spec.id_field, examples.ids[i]), field_name,
                        f"{field_name} {img_id!r} ({spec.id_field} {examples.ids[i]!r}) has no features in {tsv}")
                    skip.handle(err)
                    keep[i] = False
                    break
                loc[i, j] = (si, row)
        if not keep.all():
            self._subset(np.flatnonzero(keep))
            loc, tokens_sl, lengths_s = loc[keep], tokens_sl[keep], lengths_s[keep]
        self.loc = loc
        self.tokens = np.ascontiguousarray(tokens_sl, dtype=np.int64)
        self.lengths = np.asarray(lengths_s, np.int64)
        self.num_boxes = self.stores[0].num_boxes
        self.feat_dim = self.stores[0].feat_dim
        for s in self.stores[1:]:
            if (s.num_boxes, s.feat_dim) != (self.num_boxes, self.feat_dim):
                raise TaskDataError(f"feature stores disagree: {self.stores[0].path} has {self.num_boxes} x "
                                    f"{self.feat_dim}, {s.path} {s.num_boxes} x {s.feat_dim}")
        self._build_targets()

    def _subset(self, rows: np.ndarray) -> None:
        ex = self.examples
        pick = lambda xs: [xs[i] for i in rows.tolist()]  # noqa: E731
        self.examples = TaskExamples(ex.task, ex.splits, pick(ex.ids), pick(ex.sents), pick(ex.img_ids),
                                     pick(ex.feature_files), pick(ex.labels), pick(ex.answer_types),
                                     pick(ex.sources))

    def _build_targets(self) -> None:
        ex = self.examples
        n = len(ex)
        self.has_label = np.array([lab is not None for lab in ex.labels], bool)
        self.label = np.full(n, IGNORE_INDEX, np.int64)
        if self.spec.kind == "pair":
            for i, lab in enumerate(ex.labels):
                if lab is not None:
                    self.label[i] = int(lab)
            self.target_ptr = None
            return
        if self.answers is None:
            raise TaskDataError(f"{self.spec.name}: the dataset needs the answer table")
        a2l = self.answers.ans2label
        ptr, ans, score = [0], [], []
        for i, lab in enumerate(ex.labels):
            best, best_score = IGNORE_INDEX, -1.0
            if lab:
                for a, s in lab.items():
                    k = a2l.get(a)
                    if k is None:
                        continue
                    ans.append(k)
                    score.append(float(s))
                    if s > best_score or (s == best_score and k < best):
                        best, best_score = k, float(s)
            self.label[i] = best
            ptr.append(len(ans))
        self.target_ptr = np.asarray(ptr, np.int64)
        self.target_ans = np.asarray(ans, np.int64)
        self.target_score = np.asarray(score, np.float32)

    # -- torch Dataset ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        b = self.__getitems__([int(i)])
        return {k: v[0] for k, v in b.items()}

    def __getitems__(self, request) -> dict:
        rows = np.asarray(getattr(request, "indices", request), np.int64)
        return self.make_batch(rows)

    def read_images(self, loc_m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (M, N, D) and boxes (M, N, 4) of (store, row) pairs."""
        m = len(loc_m2)
        s0 = self.stores[0]
        feats = np.empty((m, self.num_boxes, self.feat_dim), s0.feat_dtype)
        boxes = np.empty((m, self.num_boxes, 4), np.float32)
        for si in np.unique(loc_m2[:, 0]).tolist():
            sel = np.flatnonzero(loc_m2[:, 0] == si)
            rows = loc_m2[sel, 1]
            store = self.stores[si]
            if store.feat_dtype == s0.feat_dtype:  # straight into the batch's slots
                store.read_features(rows, feats, out_rows=sel)
            else:
                feats[sel] = store.read_features(rows).astype(feats.dtype)
            boxes[sel] = np.asarray(store.array("boxes")[rows])
        return feats, boxes

    def make_batch(self, rows_b: np.ndarray) -> dict:
        b = len(rows_b)
        if b and (rows_b.min() < 0 or rows_b.max() >= len(self)):
            raise IndexError(f"example index out of range [0, {len(self)})")
        p = self.spec.num_images
        tokens_bl = self.tokens[rows_b]
        L = tokens_bl.shape[1]
        attn_bl = (np.arange(L)[None, :] < self.lengths[rows_b][:, None]).astype(np.int64)
        feats, boxes = self.read_images(self.loc[rows_b].reshape(b * p, 2))
        if p > 1:
            feats = feats.reshape(b, p, self.num_boxes, self.feat_dim)
            boxes = boxes.reshape(b, p, self.num_boxes, 4)
        t = torch.from_numpy
        batch = {
            "input_ids": t(tokens_bl),
            "attention_mask": t(attn_bl),
            "token_type_ids": torch.zeros((b, L), dtype=torch.long),
            "visual_feats": t(feats),
            "visual_pos": t(boxes),
            "index": t(rows_b.astype(np.int64)),
            "label": t(self.label[rows_b]),
        }
        if self.target_ptr is not None:
            target = np.zeros((b, len(self.answers)), np.float32)
            for j, r in enumerate(rows_b.tolist()):
                s, e = self.target_ptr[r], self.target_ptr[r + 1]
                target[j, self.target_ans[s:e]] = self.target_score[s:e]
            batch["target"] = t(target)
        return batch

    # -- answers of predictions --------------------------------------------------------------------
    def predictions_from(self, pred_label_by_row: Mapping[int, int]) -> dict:
        """{example id: answer string (VQA/GQA) or 0/1 (NLVR2)}, in dataset order."""
        out = {}
        for r in range(len(self)):
            if r not in pred_label_by_row:
                raise ValueError(f"no prediction for example {r} ({self.examples.ids[r]!r})")
            k = int(pred_label_by_row[r])
            out[self.examples.ids[r]] = self.answers.label2ans[k] if self.spec.kind == "qa" else k
        return out


def build_task_dataset(spec: TaskSpec, data_root: str, splits, *, tokenizer, answers: Optional[TaskAnswers],
                       store_root: str, require_label: bool = False,
                       feature_overrides: Optional[Mapping[str, str]] = None, skip_bad: bool = False,
                       fp32: bool = False, max_len: int = MAX_LEN, convert: bool = True,
                       features_format: str = "auto", features_map: Optional[str] = None,
                       log: Optional[Callable[[str], None]] = print) -> TaskDataset:
    """Read ``splits``, find (``convert``: or build) the stores of their feature files under
    ``store_root`` (:func:`~lxmert_fast.data.store_root.ensure_store`), tokenise. The feature files
    may be of any layout (``features_format``, ``features_map``: :mod:`lxmert_fast.data.layouts`)."""
    skip = BadRowLog(skip_bad)
    ex = read_examples(spec, data_root, splits, require_label=require_label, feature_overrides=feature_overrides,
                       skip=skip)
    if not len(ex):
        raise TaskDataError(f"{spec.name} {','.join(ex.splits)}: no examples")
    stores = {}
    for tsv in sorted({f for files in ex.feature_files for f in files}):
        if not os.path.exists(tsv):
            raise TaskDataError(f"feature file {tsv} not found")
        stores[tsv] = ensure_store(tsv, store_root, fp32=fp32, skip_bad=skip_bad, convert=convert, log=log,
                                   features_format=features_format, features_map=features_map)
    tokens, lengths = tokenize_sentences(tokenizer, ex.sents, max_len)
    ds = TaskDataset(spec, ex, stores, tokens, lengths, answers, skip=skip)
    if len(skip) and log:
        log(f"{spec.name} {','.join(ex.splits)}: " + skip.summary())
    if not len(ds):
        raise TaskDataError(f"{spec.name} {','.join(ex.splits)}: no examples with features")
    return ds


def make_task_loader(dataset: TaskDataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                     shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                     accumulation: Optional[int] = None):
    """A :class:`~lxmert_fast.data.loader.ResumableLoader`: sharded across ranks, deterministic per
    (seed, epoch), resumable mid-epoch (``set_epoch``, ``state_dict``, ``load_state_dict``); ``accumulation``:
    training's world-size-invariant steps (see ``make_pretrain_loader``)."""
    sampler = make_batch_sampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                 shuffle=shuffle, drop_last=drop_last, accumulation=accumulation)
    kw = {"prefetch_factor": 4, "persistent_workers": False} if num_workers > 0 else {}
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate_identity, pin_memory=torch.cuda.is_available(), **kw)
    return ResumableLoader(dataset, sampler, loader)


# ---------------------------------------------------------------------------------------------- metrics
def _require_predictions(predictions: Mapping, gold: Mapping, what: str) -> None:
    missing = [k for k in gold if k not in predictions]
    if missing:
        raise ValueError(f"{what}: {len(missing)} labelled example(s) have no prediction, e.g. {missing[:3]}")


def vqa_score(answer: str, label: Optional[Mapping[str, float]]) -> float:
    """The soft score of ``answer`` in the label dict (0 when absent)."""
    return float(label.get(answer, 0.0)) if label else 0.0


def vqa_evaluate(predictions: Mapping[Any, str], gold: Mapping[Any, Optional[Mapping[str, float]]],
                 answer_types: Optional[Mapping[Any, Optional[str]]] = None) -> dict:
    """VQA accuracy: mean soft score of the predicted answers; per answer type too.

    ``gold``: {question_id: {answer: score}} (None = unlabelled, skipped).
    Returns {"score", "count", "per_type": {type: score}, "per_type_count": {type: n}}.
    """
    gold = {k: v for k, v in gold.items() if v is not None}
    _require_predictions(predictions, gold, "VQA")
    total, sums, counts = 0.0, defaultdict(float), Counter()
    for qid, label in gold.items():
        s = vqa_score(predictions[qid], label)
        total += s
        t = (answer_types or {}).get(qid)
        if t is not None:
            sums[t] += s
            counts[t] += 1
    n = len(gold)
    return {"score": total / n if n else 0.0, "count": n,
            "per_type": {t: sums[t] / counts[t] for t in sorted(counts)},
            "per_type_count": {t: counts[t] for t in sorted(counts)}}


def gold_answer(label: Optional[Mapping[str, float]]) -> Optional[str]:
    """The highest-scoring answer of a label dict (the first one on ties), None if empty."""
    if not label:
        return None
    best, best_s = None, -1.0
    for a, s in label.items():
        if s > best_s:
            best, best_s = a, s
    return best


def gqa_evaluate(predictions: Mapping[Any, str], gold: Mapping[Any, Optional[Mapping[str, float]]]) -> dict:
    """GQA accuracy: the prediction equals the gold (top) answer. Returns {"accuracy", "count"}."""
    gold = {k: v for k, v in gold.items() if v}
    _require_predictions(predictions, gold, "GQA")
    correct = sum(predictions[q] == gold_answer(lab) for q, lab in gold.items())
    return {"accuracy": correct / len(gold) if gold else 0.0, "count": len(gold)}


def nlvr2_group(identifier: str) -> str:
    """The consistency group of an NLVR2 identifier: ``split-set-pair-sentence`` with the pair blanked."""
    parts = str(identifier).split("-")
    if len(parts) >= 3:
        parts[2] = ""
    return "-".join(parts)


def _as_bool_label(v) -> int:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "1"):
            return 1
        if low in ("false", "0"):
            return 0
        raise ValueError(f"NLVR2 label {v!r}: expected True/False or 0/1")
    return int(bool(v))


def nlvr2_evaluate(predictions: Mapping[str, Any], gold: Mapping[str, Any]) -> dict:
    """NLVR2 accuracy and consistency. Labels/predictions: 0/1, bools or "True"/"False".

    Returns {"accuracy", "consistency", "count", "groups"}.
    """
    gold = {k: v for k, v in gold.items() if v is not None}
    _require_predictions(predictions, gold, "NLVR2")
    correct = 0
    group_ok: dict[str, bool] = {}
    for ident, lab in gold.items():
        ok = _as_bool_label(predictions[ident]) == _as_bool_label(lab)
        correct += ok
        g = nlvr2_group(ident)
        group_ok[g] = group_ok.get(g, True) and ok
    n = len(gold)
    return {"accuracy": correct / n if n else 0.0,
            "consistency": sum(group_ok.values()) / len(group_ok) if group_ok else 0.0,
            "count": n, "groups": len(group_ok)}


MAIN_METRIC = {"vqa": "score", "gqa": "accuracy", "nlvr2": "accuracy"}


def evaluate(task: str, predictions: Mapping, examples: TaskExamples) -> dict:
    """The task's metrics on the labelled examples of ``examples`` ({} when none is labelled)."""
    gold = examples.gold()
    if not gold:
        return {}
    if task == "vqa":
        types = {i: t for i, t in zip(examples.ids, examples.answer_types)}
        return vqa_evaluate(predictions, gold, types)
    if task == "gqa":
        return gqa_evaluate(predictions, gold)
    if task == "nlvr2":
        return nlvr2_evaluate(predictions, gold)
    raise TaskDataError(f"unknown task {task!r}")


def majority_predictions(task: str, train: TaskExamples, examples: TaskExamples) -> dict:
    """Predict the most frequent gold answer (label) of ``train`` for every example."""
    if task == "nlvr2":
        counts = Counter(_as_bool_label(v) for v in train.labels if v is not None)
    else:
        counts = Counter(gold_answer(v) for v in train.labels if v)
    if not counts:
        raise TaskDataError(f"{task}: no labelled training examples for the majority baseline")
    top = max(sorted(counts, key=str), key=lambda a: counts[a])
    return {i: top for i in examples.ids}


# ---------------------------------------------------------------------------------------------- prediction files
def prediction_file_name(task: str, split: str) -> str:
    return f"{split}_predict.csv" if task == "nlvr2" else f"{split}_predict.json"


def format_predictions(task: str, predictions: Mapping) -> str:
    """The official submission format, as text.

    VQA ``[{"question_id", "answer"}]``; GQA ``[{"questionId", "prediction"}]``;
    NLVR2 one ``identifier,True|False`` line per example (no header), as the evaluation script reads.
    """
    if task == "vqa":
        return json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()], indent=1) + "\n"
    if task == "gqa":
        return json.dumps([{"questionId": q, "prediction": a} for q, a in predictions.items()], indent=1) + "\n"
    if task == "nlvr2":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for ident, p in predictions.items():
            w.writerow([ident, "True" if _as_bool_label(p) else "False"])
        return buf.getvalue()
    raise TaskDataError(f"unknown task {task!r}")


def write_predictions(task: str, path: str, predictions: Mapping) -> str:
    """Write the submission file atomically; returns ``path``."""
    atomic_write_text(path, format_predictions(task, predictions))
    return path


def read_predictions(task: str, path: str) -> dict:
    """Read a prediction file written by :func:`write_predictions` (for checks and tests)."""
    if task == "nlvr2":
        with open(path, encoding="utf-8") as fh:
            return {row[0]: row[1] for row in csv.reader(fh) if row}
    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    key, val = ("question_id", "answer") if task == "vqa" else ("questionId", "prediction")
    return {r[key]: r[val] for r in rows}

