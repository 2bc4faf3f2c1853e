"""What every feature layout reader shares: the record contract, the features map, the checks.

A reader (:class:`LayoutReader`) lists its records up front (``keys``: the record names as the
files hold them: an HDF5 group, an LMDB key, a file's name, an image id) and decodes one record at
a time into an :class:`~lxmert_fast.data.formats.ObjRow`, the same record the TSV reader gives.
:meth:`LayoutReader.rows` then maps the files' image id to the text files' id (the layout's rule,
or the features map), fills the labels a layout lacks with zeros and runs the TSV reader's checks
(:func:`~lxmert_fast.data.formats.check_obj_row`), naming the layout's own fields in errors.

The features map (``--features_map FILE``): a small JSON object, every entry optional::

    {"format": "COCO_val2014_%012d",          # printf-style rule for every image id of the files
     "ids": {"391895": "COCO_val2014_000000391895"},   # one id of the files -> its text id
     "image_sizes": {"391895": [360, 640]}}   # [height, width] for layouts that do not store it

An id in ``ids`` takes that text id; any other id follows ``format`` when given, else the
layout's rule (see each reader). ``image_sizes`` is keyed by the id as the files hold it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..formats import (DEFAULT_FEAT_DIM, DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES, BadRowLog,
                       DataFormatError, ObjRow, check_obj_row)

NO_LABELS = {"objects": False, "attributes": False}


class LayoutError(DataFormatError):
    """A feature source that cannot be read as asked: an unknown or undetectable layout, a missing
    optional package, a missing companion file. Names the path."""

    def __init__(self, path: str, message: str, field: str = "(layout)"):
        super().__init__(path, None, field, message)


def require(module: str, what: str, path: str):
    """Import an optional package (h5py, lmdb) or raise :class:`LayoutError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LayoutError(path, f"reading {what} needs the Python package '{module}', which is not installed: "
                                f"pip install \"lxmert-fast[formats]\" (or pip install {module})") from None


# ---------------------------------------------------------------------------------------------- features map
@dataclass
class FeaturesMap:
    """The user's id map (and image sizes) for the layouts whose files do not use the text files' ids."""

    path: Optional[str] = None
    format: Optional[str] = None
    ids: dict = field(default_factory=dict)
    image_sizes: dict = field(default_factory=dict)   # file id -> (h, w)
    sha256: Optional[str] = None

    @classmethod
    def load(cls, path: Optional[str]) -> "FeaturesMap":
        """Read and check a features map file (None: the empty map)."""
        if path is None:
            return cls()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"features map {path} not found")
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(path, getattr(e, "lineno", None), "(file)", f"invalid JSON: {e}") from None
        if not isinstance(d, dict):
            raise DataFormatError(path, 1, "(file)", "expected a JSON object with \"format\", \"ids\", \"image_sizes\"")
        unknown = sorted(set(d) - {"format", "ids", "image_sizes"})
        if unknown:
            raise DataFormatError(path, None, unknown[0], "unknown entry; a features map holds \"format\", "
                                                          "\"ids\" and \"image_sizes\"")
        fmt = d.get("format")
        if fmt is not None:
            if not isinstance(fmt, str) or len(re.findall(r"%(?!%)", fmt)) != 1:
                raise DataFormatError(path, None, "format", f"expected a string with one printf field "
                                                            f"(\"COCO_val2014_%012d\", \"%s\"), got {fmt!r}")
        ids = d.get("ids", {})
        if not isinstance(ids, dict) or not all(isinstance(v, str) and v for v in ids.values()):
            raise DataFormatError(path, None, "ids", "expected {id in the files: non-empty text id}")
        sizes = {}
        for k, v in (d.get("image_sizes") or {}).items():
            if (not isinstance(v, list) or len(v) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
                raise DataFormatError(path, None, f"image_sizes[{k!r}]", f"expected [height, width] in pixels, got {v!r}")
            sizes[str(k)] = (v[0], v[1])
        return cls(os.path.abspath(path), fmt, {str(k): v for k, v in ids.items()}, sizes,
                   hashlib.sha256(raw).hexdigest())

    def text_id(self, file_id: str, rule: Callable[[str], str], path: str, key: str) -> str:
        """The text files' id of the image the files call ``file_id``."""
        if file_id in self.ids:
            return self.ids[file_id]
        if self.format is not None:
            try:
                return self.format % (int(file_id) if re.search(r"%[-+ #0-9.]*[dixX]", self.format) else file_id)
            except (ValueError, TypeError) as e:
                raise DataFormatError(path, None, "image id", f"the features map's format {self.format!r} does not "
                                                              f"apply to the id {file_id!r}: {e}", key) from None
        return rule(file_id)

    def describe(self) -> Optional[dict]:
        return None if self.path is None else {"path": self.path, "sha256": self.sha256}


# ---------------------------------------------------------------------------------------------- readers
@dataclass
class RawRecord:
    """One record as a reader decodes it: arrays as the files hold them (labels None when absent)."""

    file_id: str
    img_h: int
    img_w: int
    feats_nd: np.ndarray
    boxes_n4: np.ndarray
    obj_ids_n: Optional[np.ndarray] = None
    obj_conf_n: Optional[np.ndarray] = None
    attr_ids_n: Optional[np.ndarray] = None
    attr_conf_n: Optional[np.ndarray] = None


class LayoutReader:
    """One feature source of one layout. Subclasses set the class attributes and implement
    :meth:`keys` and :meth:`read`; they open their files in ``__init__`` and close them in
    :meth:`close` (a reader is a context manager)."""

    name: str = ""            # the registry name (--features_format)
    title: str = ""           # what people call it
    id_rule: str = ""         # how the files' image ids become the text files' ids (documentation)
    field_names: dict = {}    # the TSV's field names -> this layout's (errors name the layout's)

    def __init__(self, path: str, features_map: Optional[FeaturesMap] = None, *, feat_dim: int = DEFAULT_FEAT_DIM,
                 num_obj_classes: int = DEFAULT_NUM_OBJ_CLASSES, num_attr_classes: int = DEFAULT_NUM_ATTR_CLASSES):
        self.path = os.path.abspath(path)
        self.features_map = features_map or FeaturesMap()
        self.feat_dim = feat_dim
        self.num_obj_classes = num_obj_classes
        self.num_attr_classes = num_attr_classes
        self._labels: Optional[dict] = None

    # -- to implement --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The records' names, in the order they are converted."""
        raise NotImplementedError

    def read(self, index: int, key: str) -> RawRecord:
        """Decode record ``index`` (named ``key``); raise :class:`DataFormatError` for a bad one."""
        raise NotImplementedError

    def file_of(self, key: str) -> str:
        """The file an error about record ``key`` names (the source itself unless one file per image)."""
        return self.path

    def rule(self, file_id: str) -> str:
        """The layout's rule from the files' image id to the text files' id (default: the same)."""
        return file_id

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return len(self.keys())

    # -- shared --------------------------------------------------------------------------------
    @property
    def labels(self) -> dict:
        """Which labels the source carries (``{"objects": bool, "attributes": bool}``): those of its
        first readable record; every record must then carry them."""
        if self._labels is None:
            self._labels = dict(NO_LABELS)
            for i, key in enumerate(self.keys()):
                try:
                    rec = self.read(i, key)
                except DataFormatError:  # reported when the records are converted
                    continue
                self._labels = {"objects": rec.obj_ids_n is not None and rec.obj_conf_n is not None,
                                "attributes": rec.attr_ids_n is not None and rec.attr_conf_n is not None}
                break
        return self._labels

    def error(self, key: str, field_name: str, message: str) -> DataFormatError:
        return DataFormatError(self.file_of(key), None, field_name, message, key)

    def rows(self, skip: BadRowLog, *, check_fp16: bool = False) -> Iterator[tuple[int, str, Optional[ObjRow]]]:
        """``(index, key, row)`` for every record, checked as TSV rows are; a bad record raises
        :class:`DataFormatError` (naming file, key and field) or, with a skipping ``skip``, is recorded
        and yielded with ``row`` None."""
        for i, key in enumerate(self.keys()):
            try:
                row = self.to_row(self.read(i, key), key, check_fp16)
            except DataFormatError as e:
                skip.handle(e)
                row = None
            yield i, key, row

    def to_row(self, rec: RawRecord, key: str, check_fp16: bool = False) -> ObjRow:
        """Shapes, dtypes and labels of a decoded record -> a checked :class:`ObjRow`."""
        nm = {"features": "features", "boxes": "boxes", **self.field_names}
        feats = np.asarray(rec.feats_nd)
        if feats.ndim != 2 or feats.shape[1] != self.feat_dim or not np.issubdtype(feats.dtype, np.floating):
            raise self.error(key, nm["features"], f"expected floats of shape (N, {self.feat_dim}), got "
                                                  f"{feats.dtype} {tuple(feats.shape)}")
        n = feats.shape[0]
        if n == 0:
            raise self.error(key, nm["features"], "no boxes (N = 0)")
        boxes = np.asarray(rec.boxes_n4)
        if boxes.shape != (n, 4) or not np.issubdtype(boxes.dtype, np.number):
            raise self.error(key, nm["boxes"], f"expected numbers of shape ({n}, 4) (one box per feature row), got "
                                               f"{boxes.dtype} {tuple(boxes.shape)}")
        for what, v in (("img_h", rec.img_h), ("img_w", rec.img_w)):
            if not isinstance(v, (int, np.integer)) or int(v) <= 0:
                raise self.error(key, self.field_names.get(what, what), f"expected a positive integer, got {v!r}")
        labels = []
        for kind, ids, conf, id_field, conf_field in (
                ("objects", rec.obj_ids_n, rec.obj_conf_n, "objects_id", "objects_conf"),
                ("attributes", rec.attr_ids_n, rec.attr_conf_n, "attrs_id", "attrs_conf")):
            if not self.labels[kind]:
                labels += [np.zeros(n, np.int64), np.zeros(n, np.float32)]
                continue
            for f, a, integer in ((id_field, ids, True), (conf_field, conf, False)):
                name = self.field_names.get(f, f)
                if a is None:
                    raise self.error(key, name, f"missing (the first record carries {kind} labels; every record must)")
                a = np.asarray(a)
                ok_kind = np.issubdtype(a.dtype, np.integer) if integer else np.issubdtype(a.dtype, np.floating)
                if a.shape != (n,) or not ok_kind:
                    raise self.error(key, name, f"expected {'integers' if integer else 'floats'} of shape ({n},), got "
                                                f"{a.dtype} {tuple(a.shape)}")
            labels += [np.asarray(ids).astype(np.int64, copy=False), np.asarray(conf).astype(np.float32, copy=False)]
        text_id = self.features_map.text_id(rec.file_id, self.rule, self.file_of(key), key)
        row = ObjRow(text_id, int(rec.img_h), int(rec.img_w), n, labels[0], labels[1], labels[2], labels[3],
                     boxes.astype(np.float32, copy=False), feats.astype(np.float32, copy=False))
        check_obj_row(row, self.file_of(key), None, key=key, num_obj_classes=self.num_obj_classes,
                      num_attr_classes=self.num_attr_classes, check_fp16=check_fp16,
                      objects=self.labels["objects"], attributes=self.labels["attributes"], names=self.field_names)
        return row


def scalar_int(value: Any, err: Callable[[str], DataFormatError]) -> int:
    """A 0-d (or one-element) integer-valued array or number as an int; ``err(message)`` otherwise."""
    a = np.asarray(value)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise err(f"expected one integer, got {a.dtype} {tuple(a.shape)}")
    v = a.reshape(()).item()
    if isinstance(v, float):
        if not v.is_integer():
            raise err(f"expected an integer, got {v!r}")
        v = int(v)
    return int(v)
