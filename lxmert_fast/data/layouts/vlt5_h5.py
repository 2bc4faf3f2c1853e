"""VL-T5 HDF5 files (``feature_extraction/tsv_to_h5.py``): one group per image.

Each top-level group is named by the image id and holds the datasets ``features`` (N, 2048),
``boxes`` (N, 4) x1 y1 x2 y2 in pixels, ``obj_id``, ``obj_conf``, ``attr_id``, ``attr_conf`` (N,)
(0-based ids, as the TSV's) and the scalars ``img_h``, ``img_w``; N is implicit (the rows of
``features``). VL-T5's loaders read ``f[f'{img_id}/features']`` and normalise ``boxes`` by
``img_w`` / ``img_h``. A file whose groups lack the label datasets carries no labels.

Image ids: the group name (``tsv_to_h5.py`` names the group after the TSV's img_id).
"""

from __future__ import annotations

import numpy as np

from ..formats import DataFormatError
from .base import LayoutError, LayoutReader, RawRecord, require, scalar_int

LABEL_DATASETS = {"objects": ("obj_id", "obj_conf"), "attributes": ("attr_id", "attr_conf")}


class VlT5H5Reader(LayoutReader):
    name = "vlt5_h5"
    title = "VL-T5 HDF5 (one group per image)"
    id_rule = "the group name"
    field_names = {"objects_id": "obj_id", "objects_conf": "obj_conf", "attrs_id": "attr_id",
                   "attrs_conf": "attr_conf"}

    def __init__(self, path, features_map=None, **kw):
        super().__init__(path, features_map, **kw)
        h5py = require("h5py", self.title, self.path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise LayoutError(self.path, f"not a readable HDF5 file: {e}", "(file)") from None
        self._keys = list(self._f.keys())
        if not self._keys:
            raise LayoutError(self.path, f"{self.title}: the file holds no group", "(file)")
        self._group_type = h5py.Group

    def keys(self):
        return self._keys

    def close(self):
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
            self._f = None

    def read(self, index, key):
        g = self._f[key]
        if not isinstance(g, self._group_type):
            raise DataFormatError(self.path, None, "(group)", "a dataset at the top level; the layout has one group "
                                                              "per image id", key)
        missing = [n for n in ("features", "boxes", "img_h", "img_w") if n not in g]
        if missing:
            raise self.error(key, missing[0], "missing")

        def arr(name):
            return np.asarray(g[name][()]) if name in g else None

        obj = [arr(n) for n in LABEL_DATASETS["objects"]]
        attr = [arr(n) for n in LABEL_DATASETS["attributes"]]
        return RawRecord(key, scalar_int(g["img_h"][()], lambda m: self.error(key, "img_h", m)),
                         scalar_int(g["img_w"][()], lambda m: self.error(key, "img_w", m)),
                         arr("features"), arr("boxes"), obj[0], obj[1], attr[0], attr[1])


def looks_like(f) -> bool:
    """Whether an open HDF5 file has VL-T5's shape: groups holding ``features`` (sampled: the first)."""
    keys = list(f.keys())[:1]
    return bool(keys) and hasattr(f[keys[0]], "keys") and "features" in f[keys[0]]

