"""Pre-training items, negatives, QA targets and the pre-training loader (the samplers: sampler.py and
step_sampler.py; the resumable loader: loader.py).

Data flow::

    data/lxmert/<split>.json  --build_pretrain_index-->  PretrainIndex (tokens.npy, img_row.npy,
    one store per feature file (store_root.py),           qa_ptr/qa_ans/qa_score.npy, index.json)
      read as one StoreSet (store_set.py)
        --ShardedResumableSampler--> BatchRequest --PretrainDataset.__getitems__--> raw batch
        --(optionally on the GPU) masking.mask_pretrain_batch--> model batch

An *item* is one (image, sentence) pair, flattened from ``sentf`` exactly as the released code
does (every sentence of every source). A QA sentence (``labelf`` present for its source) carries
its answers (normalised, pruned to the answer table, ``{answer: score}``).

Batches are built by whole-batch numpy ops (one ``__getitems__`` call per batch): matching
negatives (p 0.5: the sentence is replaced by one of another image, never the same image),
one QA answer sampled in proportion to its score (none for negatives: -100), features read
from the stores of the splits' feature files (a :class:`StoreSet`: a global row = store offset +
row identifies an image across the files). All randomness of a batch derives from
``(seed, epoch, rank, position)``, so a resumed run reproduces the remaining batches exactly,
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Mapping, Optional

import numpy as np
import torch

from .answers import AnswerTable, convert_ans
from .formats import BadRowLog, DataFormatError, file_fingerprint, read_pretrain_json
from .loader import ResumableLoader, collate_identity, make_batch_sampler
from .masking import IGNORE_INDEX, MaskingConfig, mask_pretrain_batch
from .sampler import BatchRequest
from .store import FeatureStore, StoreError, sha256_file
from .store_root import SENTENCES_DIR, ensure_store
from .store_set import StoreSet
from .tokenization import MAX_LEN, load_tokenizer, special_ids, tokenize_sentences
from .tsv_convert import remove_stale_partials

INDEX_VERSION = 2  # 2: img_row is a row of the StoreSet of the splits' feature files
DEFAULT_SPLITS = "mscoco_train,mscoco_nominival,vgnococo"
# feature file of each pre-training split, relative to the data root (as in the release)
SPLIT_FEATURE_FILES = {
    "mscoco_train": "mscoco_imgfeat/train2014_obj36.tsv",
    "mscoco_minival": "mscoco_imgfeat/val2014_obj36.tsv",
    "mscoco_nominival": "mscoco_imgfeat/val2014_obj36.tsv",
    "vgnococo": "vg_gqa_imgfeat/vg_gqa_obj36.tsv",
}
SOURCES = ("mscoco", "vg", "vqa", "gqa", "visual7w")


def split_names(splits) -> list[str]:
    names = splits.split(",") if isinstance(splits, str) else list(splits)
    return [s.strip() for s in names if s.strip()]


# ---------------------------------------------------------------------------------------------
# the sentence index
# ---------------------------------------------------------------------------------------------

class PretrainIndex:
    """Pre-tokenised items, memory-mapped (lazy, picklable). ``S`` items, ``M`` QA answers.

    Arrays: ``tokens`` (S, L) int32, ``lengths`` (S,) int16, ``img_row`` (S,) int32 global row
    of the image in the :class:`StoreSet` the index was built on (``meta["stores"]``, key
    ``meta["store_key"]``),
    ``source`` (S,) int8 index into ``SOURCES``, ``qa_ptr`` (S + 1,) int64 CSR offsets into
    ``qa_ans`` (M,) int32 / ``qa_score`` (M,) float32.
    """

    ARRAYS = ("tokens", "lengths", "img_row", "source", "qa_ptr", "qa_ans", "qa_score")

    def __init__(self, path: str, meta: dict):
        self.path = os.path.abspath(path)
        self.meta = meta
        self._maps: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str) -> "PretrainIndex":
        mp = os.path.join(path, "index.json")
        if not os.path.exists(mp):
            raise StoreError(f"{path}: no complete sentence index (index.json missing)")
        with open(mp, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != INDEX_VERSION:
            raise StoreError(f"{mp}: index version {meta.get('version')} != {INDEX_VERSION}")
        return cls(path, meta)

    def __getstate__(self):
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, s):
        self.__init__(s["path"], s["meta"])

    def array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        a = self._maps.get(name)
        if a is None:
            a = self._maps[name] = np.load(os.path.join(self.path, f"{name}.npy"), mmap_mode="r")
        return a

    def __getattr__(self, name):
        if name in PretrainIndex.ARRAYS:
            return self.array(name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return self.meta["num_items"]

    @property
    def answers(self) -> list[str]:
        return self.meta["answers"]

    @property
    def num_answers(self) -> int:
        return len(self.meta["answers"])

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def masking_config(self, word_prob: float = 0.15, obj_prob: float = 0.15) -> MaskingConfig:
        sp = self.meta["special_ids"]
        return MaskingConfig(vocab_size=self.meta["vocab_size"], mask_id=sp["mask"],
                             never_mask=(sp["cls"], sp["sep"], sp["pad"]),
                             word_prob=word_prob, obj_prob=obj_prob)


def _index_key(json_paths, stores: StoreSet, vocab_path, all_ans_path, qa_sets, max_len,
               skip_bad) -> str:
    vocab_file = os.path.join(vocab_path, "vocab.txt") if os.path.isdir(vocab_path) else vocab_path
    key = {
        "version": INDEX_VERSION, "json": [file_fingerprint(p) for p in json_paths],
        "stores": stores.key,
        "vocab": sha256_file(vocab_file) if os.path.exists(vocab_file) else vocab_path,
        "all_ans": file_fingerprint(all_ans_path), "qa_sets": sorted(qa_sets) if qa_sets else None,
        "max_len": max_len, "skip_bad": skip_bad,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _index_inputs(data_root: str, splits, all_ans: str | None, qa_sets) -> tuple[list[str], list[str], str, list | None]:
    """(split names, their JSON files (each must exist), the answer table's file, the QA sets or None)."""
    names = split_names(splits)
    json_paths = [os.path.join(data_root, "lxmert", f"{s}.json") for s in names]
    for p in json_paths:
        if not os.path.exists(p):
            raise FileNotFoundError(p)
    all_ans = all_ans or os.path.join(data_root, "lxmert", "all_ans.json")
    qa_sets = None if qa_sets is None else (
        [s for s in qa_sets.split(",") if s] if isinstance(qa_sets, str) else list(qa_sets))
    return names, json_paths, all_ans, qa_sets


class _Items:
    """The items as they are read, one per sentence: its image row, source and QA answers (CSR:
    ``qa_ptr`` delimits each item's entries of ``qa_ans`` / ``qa_score``)."""

    def __init__(self, table: AnswerTable):
        self.table = table
        self.sents, self.img_row, self.source, self.qa_ptr, self.qa_ans, self.qa_score = [], [], [], [0], [], []
        self.pruned = self.kept = 0
        self.images: dict[str, str] = {}  # img_id -> the JSON file it came from

    def add(self, sent: str, ridx: int, src: str, label: dict | None) -> None:
        self.sents.append(sent)
        self.img_row.append(ridx)
        self.source.append(SOURCES.index(src))
        if label is not None:
            lab: dict[int, float] = {}
            for ans, score in label.items():
                aid = self.table.ans2id.get(convert_ans(ans))
                if aid is None:
                    self.pruned += 1
                    continue
                lab[aid] = float(score)  # as released: a later duplicate overwrites
                self.kept += 1
            self.qa_ans.extend(lab.keys())
            self.qa_score.extend(lab.values())
        self.qa_ptr.append(len(self.qa_ans))

    def arrays(self, tokens: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The index's arrays (``PretrainIndex.ARRAYS``)."""
        return {"tokens": tokens, "lengths": lengths,
                "img_row": np.asarray(self.img_row, np.int32), "source": np.asarray(self.source, np.int8),
                "qa_ptr": np.asarray(self.qa_ptr, np.int64), "qa_ans": np.asarray(self.qa_ans, np.int32),
                "qa_score": np.asarray(self.qa_score, np.float32)}


def _read_items(json_paths: list[str], rows: dict, store: StoreSet, table: AnswerTable,
                bad: BadRowLog) -> _Items:
    """Flatten every sentence of every source of every record, in file order; a record whose image has
    no features (``rows``: img_id -> global row), repeats an image or names an unknown source goes to ``bad``."""
    items = _Items(table)
    for path in json_paths:
        for line, rec in read_pretrain_json(path, bad):
            img_id = rec["img_id"]
            ridx = rows.get(img_id)
            if ridx is None:
                bad.handle(DataFormatError(path, line, "img_id",
                                           f"img_id {img_id!r} has no features in the stores "
                                           f"{', '.join(store.paths)}"))
                continue
            if img_id in items.images:
                bad.handle(DataFormatError(path, line, "img_id",
                                           f"img_id {img_id!r} also in {items.images[img_id]}"))
                continue
            items.images[img_id] = path
            for src, src_sents in rec["sentf"].items():
                if src not in SOURCES:
                    bad.handle(DataFormatError(path, line, f"sentf.{src}",
                                               f"unknown source {src!r} (known: {SOURCES})"))
                    continue
                labels = rec.get("labelf", {}).get(src)
                for j, sent in enumerate(src_sents):
                    items.add(sent, ridx, src, None if labels is None else labels[j])
    return items


def _write_index(out_dir: str, arrays: dict, meta: dict, bad: BadRowLog, log) -> None:
    """Write the index atomically: the arrays, ``skipped_records.tsv`` and ``index.json`` into a
    partial directory renamed into place (replacing a stale index; one another process built first is kept)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(out_dir, log)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, a in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), a)
        if len(bad):
            bad.write_tsv(os.path.join(tmp, "skipped_records.tsv"))
        with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(out_dir):  # a stale or rebuilt index
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "index.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built it concurrently
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_pretrain_index(data_root: str, splits, store: StoreSet | FeatureStore, vocab: str, *,
                         out_dir: str | None = None, all_ans: str | None = None, qa_sets=None,
                         max_len: int = MAX_LEN, skip_bad: bool = False, rebuild: bool = False,
                         log=print) -> PretrainIndex:
    """Tokenise every sentence of ``splits`` once; cached by content under ``out_dir``.

    ``store``: the :class:`StoreSet` of the splits' feature files (a single store is read as a set
    of one). ``out_dir`` defaults to ``<store root>/sentences/<key>``, the key hashing the inputs
    (JSON files, the stores' content, vocab, answer table, options), so one store root holds the
    indexes of every split combination. A sentence whose image has no features in the stores
    (or any malformed record, or an img_id with features in two stores) raises
    :class:`DataFormatError` naming the file, the line and the field, unless ``skip_bad``: then
    it is skipped (a duplicated image keeps the features of the first store), counted and reported.
    """
    store = StoreSet.of(store)
    names, json_paths, all_ans, qa_sets = _index_inputs(data_root, splits, all_ans, qa_sets)
    key = _index_key(json_paths, store, vocab, all_ans, qa_sets, max_len, skip_bad)
    if out_dir is None:
        if store.root is None:
            raise ValueError(f"the stores {store.paths} have no common store root: give out_dir for the "
                             f"sentence index")
        out_dir = os.path.join(store.root, SENTENCES_DIR, key)
    if not rebuild and os.path.exists(os.path.join(out_dir, "index.json")):
        idx = PretrainIndex.open(out_dir)
        if idx.meta.get("key") == key:
            return idx

    table = AnswerTable(all_ans, qa_sets)
    tok = load_tokenizer(vocab)
    sp = special_ids(tok)
    bad = BadRowLog(skip_bad)
    rows = store.index(skip_bad=skip_bad)
    bad.extend(store.duplicates())
    items = _read_items(json_paths, rows, store, table, bad)
    if not items.sents:
        raise DataFormatError(json_paths[0], None, "(file)", "no sentences with features")

    tokens, lengths = tokenize_sentences(tok, items.sents, max_len)
    arrays = items.arrays(tokens, lengths)
    n_qa = int((np.diff(arrays["qa_ptr"]) > 0).sum())
    meta = {
        "version": INDEX_VERSION, "key": key, "splits": names,
        "json": [os.path.abspath(p) for p in json_paths], "stores": store.paths,
        "store_key": store.key,
        "num_items": len(items.sents), "num_images": len(items.images), "max_len": max_len,
        "vocab": os.path.abspath(vocab), "vocab_size": len(tok),
        "special_ids": {"pad": sp.pad, "unk": sp.unk, "cls": sp.cls, "sep": sp.sep,
                        "mask": sp.mask},
        "answers": table.answers, "qa_sets": table.qa_sets, "qa_items": n_qa,
        "answers_kept": items.kept, "answers_pruned": items.pruned, "skipped": len(bad),
        "truncated": int((lengths >= max_len).sum()),
        "sources": {s: int((arrays["source"] == i).sum()) for i, s in enumerate(SOURCES)},
    }
    _write_index(out_dir, arrays, meta, bad, log)
    if log:
        log(f"sentence index: {len(items.sents)} items of {len(items.images)} images from {names}, "
            f"{n_qa} with QA ({len(table)} answers; {items.pruned} answer entries outside the table "
            f"pruned) -> {out_dir}")
        if len(bad):
            log(bad.summary())
    return PretrainIndex.open(out_dir)


# ---------------------------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------------------------

def sample_negatives(rng: np.random.Generator, img_row_s: np.ndarray, img_b: np.ndarray,
                     neg_b: np.ndarray, max_tries: int = 1000) -> np.ndarray:
    """For rows with ``neg_b``, a random item index whose image differs from ``img_b``."""
    s = len(img_row_s)
    j_b = rng.integers(0, s, len(img_b))
    bad = neg_b & (np.asarray(img_row_s[j_b]) == img_b)
    for _ in range(max_tries):
        if not bad.any():
            return j_b
        j_b[bad] = rng.integers(0, s, int(bad.sum()))
        bad = neg_b & (np.asarray(img_row_s[j_b]) == img_b)
    raise RuntimeError("could not find a sentence of another image (does one image own almost "
                       "every sentence?)")


def sample_answers(rng: np.random.Generator, qa_ptr: np.ndarray, qa_ans: np.ndarray,
                   qa_score: np.ndarray, items_b: np.ndarray, use_b: np.ndarray) -> np.ndarray:
    """One answer per item (``use_b`` rows with answers), drawn in proportion to its score.

    Returns (B,) int64 with -100 where there is no answer. A label whose scores sum to 0 is
    drawn uniformly. Vectorised: one cumulative sum + ``searchsorted`` for the whole batch.
    """
    out = np.full(len(items_b), IGNORE_INDEX, np.int64)
    start = np.asarray(qa_ptr[items_b])
    count = np.asarray(qa_ptr[items_b + 1]) - start
    has = use_b & (count > 0)
    if not has.any():
        return out
    st, ct = start[has], count[has]
    seg_off = np.concatenate([[0], np.cumsum(ct)[:-1]])
    seg = np.repeat(np.arange(len(ct)), ct)
    pos = st[seg] + (np.arange(int(ct.sum())) - seg_off[seg])
    score = np.asarray(qa_score[pos], np.float64)
    total = np.add.reduceat(score, seg_off)
    score = np.where(total[seg] > 0, score, 1.0)
    total = np.where(total > 0, total, ct.astype(np.float64))
    cs = np.cumsum(score)
    before = cs[seg_off] - score[seg_off]
    u = before + rng.random(len(ct)) * total
    pick = np.searchsorted(cs, u, side="right")
    pick = np.clip(pick, seg_off, seg_off + ct - 1)
    out[has] = np.asarray(qa_ans[pos[pick]], np.int64)
    return out


class PretrainDataset(torch.utils.data.Dataset):
    """(image, sentence) items of a :class:`PretrainIndex` with features from its stores
    (``store``: the :class:`StoreSet` the index was built on, or its single store).

    Use with :class:`ShardedResumableSampler` as ``batch_sampler`` (see
    :func:`make_pretrain_loader`): ``__getitems__`` builds a whole batch at once.

    ``masking=None`` (default) returns the *raw* batch (``visual_feats`` in the store dtype,
    unmasked ids; mask later, e.g. on the GPU, with :func:`mask_pretrain_batch`); a
    :class:`MaskingConfig` masks in the worker and returns the model batch.
    """

    def __init__(self, store: StoreSet | FeatureStore, index: PretrainIndex, *, task_matched: bool = True,
                 neg_prob: float = 0.5, task_qa: bool = True, seed: int = 0,
                 masking: MaskingConfig | None = None):
        store = StoreSet.of(store)
        if index.meta.get("store_key") != store.key:
            raise ValueError(f"index {index.path} was built for the stores {index.meta.get('stores')}, "
                             f"not {store.paths} (other content)")
        self.store, self.index = store, index
        self.task_matched, self.neg_prob, self.task_qa = task_matched, neg_prob, task_qa
        self.seed, self.masking = seed, masking

    def __len__(self) -> int:
        return len(self.index)

    @property
    def masking_config(self) -> MaskingConfig:
        return self.index.masking_config()

    def __getitem__(self, i: int) -> dict:
        b = self.__getitems__([int(i)])
        return _squeeze(b)

    def __getitems__(self, request) -> dict:
        if isinstance(request, BatchRequest):
            items, seed = np.asarray(request.indices, np.int64), request.seed
        else:  # a plain list of indices (e.g. a stock sampler): seed from the indices
            items = np.asarray(list(request), np.int64)
            seed = int.from_bytes(hashlib.blake2b(items.tobytes(), digest_size=8).digest(),
                                  "little") >> 1
        rng = np.random.default_rng([self.seed, seed])
        return self.make_batch(items, rng, seed)

    def sample_text(self, items_b: np.ndarray, rng: np.random.Generator) -> dict:
        """The language side of a batch, as numpy arrays (no features read).

        ``img_b`` the global store-set row of each item's image; ``matched_b`` 1 / 0; ``sent_b``
        the sentence used (another image's for negatives); ``tokens_bl`` / ``lengths_b`` its ids;
        ``ans_b`` the sampled answer or -100.
        """
        ix = self.index
        b = len(items_b)
        if b and (items_b.min() < 0 or items_b.max() >= len(ix)):
            raise IndexError(f"item index out of range [0, {len(ix)})")
        img_row_s = ix.array("img_row")
        img_b = np.asarray(img_row_s[items_b], np.int64)
        neg_b = (rng.random(b) < self.neg_prob) if self.task_matched else np.zeros(b, bool)
        sent_b = items_b.copy()
        if neg_b.any():
            other = sample_negatives(rng, img_row_s, img_b, neg_b)
            sent_b[neg_b] = other[neg_b]
        ans_b = (sample_answers(rng, ix.array("qa_ptr"), ix.array("qa_ans"), ix.array("qa_score"),
                                items_b, ~neg_b) if self.task_qa
                 else np.full(b, IGNORE_INDEX, np.int64))
        return {"img_b": img_b, "matched_b": (~neg_b).astype(np.int64), "sent_b": sent_b,
                "tokens_bl": np.asarray(ix.array("tokens")[sent_b], np.int64),
                "lengths_b": np.asarray(ix.array("lengths")[sent_b], np.int64), "ans_b": ans_b}

    def make_batch(self, items_b: np.ndarray, rng: np.random.Generator, seed: int = 0) -> dict:
        """Raw batch (or masked, with ``self.masking``) for item indices ``items_b``.

        All tensors of the raw batch are views of one storage, allocated in shared memory when
        running in a loader worker: handing the batch to the main process then passes one
        file descriptor, with no copy (per-tensor shared-memory segments cost more than
        reading the features).
        """
        txt = self.sample_text(items_b, rng)
        img_b, tokens_bl = txt["img_b"], txt["tokens_bl"]
        b, L = tokens_bl.shape
        st = self.store
        n = st.num_boxes
        f32, i64 = torch.float32, torch.long
        raw = _alloc_views({
            "visual_feats": ((b, n, st.feat_dim), getattr(torch, st.feat_dtype)),
            "visual_pos": ((b, n, 4), f32),
            "obj_ids": ((b, n), i64), "obj_conf": ((b, n), f32),
            "attr_ids": ((b, n), i64), "attr_conf": ((b, n), f32),
            "input_ids": ((b, L), i64), "attention_mask": ((b, L), i64),
            "token_type_ids": ((b, L), i64),
            "matched_label": ((b,), i64), "ans": ((b,), i64),
            "img_index": ((b,), i64), "item_index": ((b,), i64),
        }, shared=torch.utils.data.get_worker_info() is not None)
        np_ = {k: v.numpy() for k, v in raw.items()}
        st.gather_into(img_b, {"features": np_["visual_feats"], "boxes": np_["visual_pos"],
                               "obj_ids": np_["obj_ids"], "obj_conf": np_["obj_conf"],
                               "attr_ids": np_["attr_ids"], "attr_conf": np_["attr_conf"]})
        np_["input_ids"][...] = tokens_bl
        np_["attention_mask"][...] = np.arange(L)[None, :] < txt["lengths_b"][:, None]
        np_["token_type_ids"][...] = 0
        np_["matched_label"][...] = txt["matched_b"]
        np_["ans"][...] = txt["ans_b"]
        np_["img_index"][...] = img_b
        np_["item_index"][...] = items_b
        if self.masking is not None:
            gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
            return mask_pretrain_batch(raw, self.masking, gen)
        return raw


def _alloc_views(specs: dict, shared: bool) -> dict[str, torch.Tensor]:
    """``{name: uninitialised tensor}`` of the given ``(shape, dtype)``, all views of one
    storage (64-byte aligned), in shared memory if ``shared``."""
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        item = torch.empty(0, dtype=dtype).element_size()
        offsets[name] = total
        total += -(-int(np.prod(shape)) * item // 64) * 64
    storage = (torch.UntypedStorage._new_shared(total) if shared
               else torch.UntypedStorage(total))
    out = {}
    for name, (shape, dtype) in specs.items():
        t = torch.empty(0, dtype=dtype)
        item = t.element_size()
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        out[name] = t.set_(storage, offsets[name] // item, shape, stride)
    return out


def _squeeze(batch):
    if isinstance(batch, dict):
        return {k: _squeeze(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_squeeze(v) for v in batch)
    return batch[0]


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------

def make_pretrain_loader(dataset: PretrainDataset, batch_size: int, *, rank: int = 0,
                         world_size: int = 1, seed: int = 0, shuffle: bool = True,
                         drop_last: bool = True, num_workers: int = 2,
                         pin_memory: bool | None = None, prefetch_factor: int = 4,
                         persistent_workers: bool | None = None,
                         multiprocessing_context=None, accumulation: int | None = None) -> ResumableLoader:
    """The pre-training loader: sharded, resumable, pinned when CUDA is available.

    ``accumulation`` (training): micro-batches of ``batch_size`` dealt from global optimizer steps of
    ``batch_size x accumulation x world_size`` (:class:`~lxmert_fast.data.step_sampler.StepSampler`: the same
    steps and random numbers on any world size; whole steps only). None: the plain sharded sampler
    (evaluation)."""
    sampler = make_batch_sampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                 shuffle=shuffle, drop_last=drop_last, accumulation=accumulation)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kw = {}
    if num_workers > 0:
        kw = {"prefetch_factor": prefetch_factor,
              "persistent_workers": bool(persistent_workers) if persistent_workers is not None
              else True}
        if multiprocessing_context is not None:
            kw["multiprocessing_context"] = multiprocessing_context
    dl = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                     collate_fn=collate_identity, pin_memory=pin_memory, **kw)
    return ResumableLoader(dataset, sampler, dl)


# ---------------------------------------------------------------------------------------------
# one call from a data root to a dataset
# ---------------------------------------------------------------------------------------------

def feature_files_for(data_root: str, splits, overrides: Optional[Mapping[str, str]] = None) -> list[str]:
    """The feature files (or sources of another layout) holding the images of ``splits``
    (deduplicated, in order); ``overrides``: {split: path} in place of the release's file names
    (a relative path is under ``data_root``)."""
    out = []
    for s in split_names(splits):
        if overrides and s in overrides:
            rel = overrides[s]
        elif s in SPLIT_FEATURE_FILES:
            rel = SPLIT_FEATURE_FILES[s]
        else:
            raise ValueError(f"unknown pre-training split {s!r}; known: {sorted(SPLIT_FEATURE_FILES)}")
        p = rel if os.path.isabs(rel) else os.path.join(data_root, rel)
        if p not in out:
            out.append(p)
    return out


def build_pretrain_dataset(data_root: str, splits=DEFAULT_SPLITS, *, store_dir: str | None = None,
                           vocab: str | None = None, skip_bad: bool = False, qa_sets=None,
                           task_matched: bool = True, task_qa: bool = True, seed: int = 0,
                           fp32: bool = False, convert_workers: int | None = None,
                           masking: MaskingConfig | None = None, features: Optional[Mapping[str, str]] = None,
                           features_format: str = "auto", features_map: Optional[str] = None,
                           log=print) -> PretrainDataset:
    """Data root (original layout) -> :class:`PretrainDataset`, converting and tokenising once.

    ``store_dir`` is the store root (default ``<data_root>/lxmert_fast``, as fine-tuning's
    ``--store_dir``): each feature file of ``splits`` gets its own store there, found again by its
    source fingerprint or converted on first use (:func:`~lxmert_fast.data.store_root.ensure_store`),
    shared with the other splits and with the fine-tuning tasks; the stores are read as one
    :class:`StoreSet`, and the sentence index goes to ``<store_dir>/sentences/<key>``. ``vocab``
    defaults to ``<data_root>/vocab.txt`` (the demo world writes one; for the real data give
    bert-base-uncased's vocab.txt). Every cache is built atomically and reused. ``features``:
    {split: feature source} in place of the release's TSV files, of any layout
    (``features_format``, ``features_map``: see :mod:`lxmert_fast.data.layouts`).
    """
    tsvs = feature_files_for(data_root, splits, features)
    root = os.path.abspath(store_dir or os.path.join(data_root, "lxmert_fast"))
    stores = StoreSet([ensure_store(t, root, fp32=fp32, skip_bad=skip_bad, workers=convert_workers, log=log,
                                    features_format=features_format, features_map=features_map)
                       for t in tsvs], root=root)
    vocab = vocab or os.path.join(data_root, "vocab.txt")
    index = build_pretrain_index(data_root, splits, stores, vocab, qa_sets=qa_sets,
                                 skip_bad=skip_bad, log=log)
    return PretrainDataset(stores, index, task_matched=task_matched, task_qa=task_qa, seed=seed,
                           masking=masking)
