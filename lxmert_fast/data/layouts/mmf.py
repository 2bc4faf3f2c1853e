"""MMF / ViLBERT per-image ``.npy`` features and MMF's LMDB of them.

Per image (MMF ``tools/scripts/features/extract_features_vmb.py``): ``<name>.npy``, the features
(N, 2048) float32, and ``<name>_info.npy``, a dict pickled inside a 0-d object array: ``bbox``
(N, 4) x1 y1 x2 y2 in pixels, ``num_boxes``, ``objects`` (N,), ``cls_prob`` (N, C),
``image_width``, ``image_height``; no attributes. ViLBERT's ``script/extract_features.py`` saves the
same dict with the features inside it (``features``, ``image_id``) as one ``<name>.npy``.
LMDB (``tools/scripts/features/lmdb_conversion.py``): one pickled dict per key (the same entries,
``features`` included, and ``feature_path``) and a ``keys`` entry, the pickled list of keys.
Every pickle is read with the restricted unpickler (no code runs).

``num_boxes`` counts the boxes the detector kept with a non-zero score; the arrays may hold more
rows (``--num_features``): the first ``num_boxes`` rows are the image's boxes. Labels: with
``cls_prob`` of C = 1600 columns, ``objects`` are 0-based VG classes (MMF's default) and the
confidence is ``cls_prob[i, objects[i]]``; with C = 1601 (MMF's ``--background``, ViLBERT) column
0 is the background and ``objects`` are 1-based: the id is ``objects - 1``, and a box whose argmax
is the background keeps id 0 with confidence 0 (no weight in the object loss). Without ``cls_prob``
there is no confidence: the store carries no object labels.

Image ids: the file name without ``.npy`` (the image file's name without its extension); in the
LMDB the key's last path component (its relative path in the features folder, without ``.npy``).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..formats import DataFormatError
from ..store import list_files, source_fingerprint
from .base import LayoutError, LayoutReader, RawRecord, require, scalar_int
from .safe_pickle import read_npy, safe_loads


class _MmfRecords(LayoutReader):
    field_names = {"boxes": "bbox", "img_h": "image_height", "img_w": "image_width",
                   "objects_id": "objects", "objects_conf": "cls_prob"}

    def _record(self, key: str, feats, info) -> RawRecord:
        if not isinstance(info, dict):
            raise self.error(key, "info", f"expected a dict, got {type(info).__name__}")
        for name in ("bbox", "image_width", "image_height"):
            if info.get(name) is None:
                raise self.error(key, name, "missing")
        feats = np.asarray(feats)
        boxes = np.asarray(info["bbox"])
        if feats.ndim != 2 or boxes.ndim != 2 or len(boxes) != len(feats):
            raise self.error(key, "bbox", f"{tuple(boxes.shape)} boxes for features of shape {tuple(feats.shape)}: "
                                          f"expected one box per feature row")
        n = len(feats)
        if info.get("num_boxes") is not None:
            nb = scalar_int(info["num_boxes"], lambda m: self.error(key, "num_boxes", m))
            if not 0 < nb <= n:
                raise self.error(key, "num_boxes", f"{nb}, expected 1 .. {n} (the rows of the features)")
            n = nb
        ids = conf = None
        objects, prob = info.get("objects"), info.get("cls_prob")
        if objects is not None and prob is not None:  # else no labels (see LayoutReader.labels)
            objects, prob = np.asarray(objects), np.asarray(prob)
            if objects.shape != (len(feats),) or not np.issubdtype(objects.dtype, np.integer):
                raise self.error(key, "objects", f"expected integers of shape ({len(feats)},), got "
                                                 f"{objects.dtype} {tuple(objects.shape)}")
            k = self.num_obj_classes
            if prob.ndim != 2 or len(prob) != len(feats) or prob.shape[1] not in (k, k + 1):
                raise self.error(key, "cls_prob", f"expected ({len(feats)}, {k}) or ({len(feats)}, {k + 1}) (with the "
                                                  f"background column), got {tuple(prob.shape)}")
            objects, prob = objects[:n].astype(np.int64), prob[:n]
            if objects.min() < 0 or objects.max() >= prob.shape[1]:
                i = int(np.argmax((objects < 0) | (objects >= prob.shape[1])))
                raise self.error(key, "objects", f"object {i}: id {int(objects[i])} outside [0, {prob.shape[1]})")
            conf = prob[np.arange(n), objects].astype(np.float32)
            if prob.shape[1] == k + 1:  # column 0 is the background
                background = objects == 0
                ids = np.where(background, 0, objects - 1)
                conf = np.where(background, np.float32(0), conf)
            else:
                ids = objects
        return RawRecord(key, scalar_int(info["image_height"], lambda m: self.error(key, "image_height", m)),
                         scalar_int(info["image_width"], lambda m: self.error(key, "image_width", m)),
                         feats[:n], boxes[:n], ids, conf)


class MmfNpyReader(_MmfRecords):
    name = "mmf_npy"
    title = "MMF / ViLBERT per-image .npy (+ _info.npy)"
    id_rule = "the file name without .npy"

    def __init__(self, path, features_map=None, **kw):
        super().__init__(path, features_map, **kw)
        if not os.path.isdir(self.path):
            raise LayoutError(self.path, f"{self.title}: expected the folder of .npy files")
        files = [f for f in list_files(self.path) if f.endswith(".npy")]
        infos = {f for f in files if f.endswith("_info.npy")}
        # a <name>_info.npy is the info of <name>.npy; without <name>.npy it is a feature file of its own
        self._files = [f for f in files if not (f in infos and f[: -len("_info.npy")] + ".npy" in files)]
        if not self._files:
            raise LayoutError(self.path, f"{self.title}: no .npy file in the folder")
        self._keys = [os.path.basename(f)[: -len(".npy")] for f in self._files]
        self._file_of = dict(zip(self._keys, self._files))

    def keys(self):
        return self._keys

    def file_of(self, key):
        return os.path.join(self.path, self._file_of.get(key, key + ".npy"))

    def _npy(self, fp: str, key: str, field: str) -> np.ndarray:
        try:
            with open(fp, "rb") as fh:
                return read_npy(fh, fp, field, key)
        except OSError as e:
            raise DataFormatError(fp, None, field, f"cannot read: {e}", key) from None

    def _load(self, index: int, key: str) -> tuple[np.ndarray, dict]:
        fp = os.path.join(self.path, self._files[index])
        arr = self._npy(fp, key, "features")
        if arr.dtype.hasobject:  # ViLBERT: one dict, the features inside
            info = arr.item() if arr.shape == () else None
            if not isinstance(info, dict) or info.get("features") is None:
                raise DataFormatError(fp, None, "features", "a pickled object that is not a dict with 'features'", key)
            return np.asarray(info["features"]), info
        info_fp = fp[: -len(".npy")] + "_info.npy"
        if not os.path.isfile(info_fp):
            raise DataFormatError(fp, None, "_info.npy", f"{os.path.basename(info_fp)} (bbox, image size) is missing",
                                  key)
        info = self._npy(info_fp, key, "info")
        if info.shape != () or not isinstance(info.item(), dict):
            raise DataFormatError(info_fp, None, "info", f"expected a pickled dict, got {info.dtype} {info.shape}", key)
        return arr, info.item()

    def read(self, index, key):
        feats, info = self._load(index, key)
        return self._record(key, feats, info)


class MmfLmdbReader(_MmfRecords):
    name = "mmf_lmdb"
    title = "MMF LMDB (lmdb_conversion.py)"
    id_rule = "the key's last path component"

    def __init__(self, path, features_map=None, **kw):
        super().__init__(path, features_map, **kw)
        lmdb = require("lmdb", self.title, self.path)
        try:
            self._env = lmdb.open(self.path, subdir=os.path.isdir(self.path), readonly=True, lock=False,
                                  readahead=False, meminit=False, max_readers=1)
        except lmdb.Error as e:
            raise LayoutError(self.path, f"not a readable LMDB: {e}", "(file)") from None
        self._txn = self._env.begin(write=False, buffers=False)
        raw = self._txn.get(b"keys")
        if raw is not None:
            keys = safe_loads(raw, self.path, "keys", "keys")
            if not isinstance(keys, (list, tuple)) or not all(isinstance(k, (bytes, str)) for k in keys):
                raise DataFormatError(self.path, None, "keys", "expected a pickled list of keys", "keys")
            self._raw_keys = [k if isinstance(k, bytes) else k.encode() for k in keys]
        else:  # no index entry: every key of the database
            self._raw_keys = [k for k, _ in self._txn.cursor()]
        if not self._raw_keys:
            raise LayoutError(self.path, f"{self.title}: no record")
        self._keys = [k.decode("utf-8", "replace") for k in self._raw_keys]

    def keys(self):
        return self._keys

    def rule(self, file_id):
        return file_id.rsplit("/", 1)[-1]

    def close(self):
        env = getattr(self, "_env", None)
        if env is not None:
            self._txn.abort()
            env.close()
            self._env = None

    def _item(self, index: int, key: str) -> dict:
        raw = self._txn.get(self._raw_keys[index])
        if raw is None:
            raise DataFormatError(self.path, None, "(record)", "listed in 'keys' but not in the database", key)
        item = safe_loads(raw, self.path, "(record)", key)
        if not isinstance(item, dict):
            raise DataFormatError(self.path, None, "(record)", f"expected a pickled dict, got {type(item).__name__}", key)
        return item

    def read(self, index, key):
        item = self._item(index, key)
        if item.get("features") is None:
            raise self.error(key, "features", "missing")
        return self._record(key, item["features"], item)


def lmdb_data_file(path: str) -> Optional[str]:
    """The data file of an LMDB: ``<dir>/data.mdb``, or the file itself (an LMDB opened without subdir)."""
    if os.path.isdir(path):
        p = os.path.join(path, "data.mdb")
        return p if os.path.isfile(p) else None
    return path


def lmdb_fingerprint(path: str) -> str:
    """The LMDB's data file (its lock file changes with every reader, so it is left out)."""
    data = lmdb_data_file(path)
    if data is None:
        raise LayoutError(path, "not an LMDB folder (no data.mdb)")
    return source_fingerprint(data)
