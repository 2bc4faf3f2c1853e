"""bottom-up-attention.pytorch ``.npz`` files: one per image, as ``extract_features.py`` writes them.

``utils/extract_utils.py:save_roi_features`` saves, with ``np.savez_compressed``, into
``<output_dir>/<image file name without extension>.npz``:

* ``x``         (N, 2048) float32 RoI features (the MCAN / OpenVQA releases store (2048, N): told
  apart by the box count, and transposed);
* ``bbox``      (N, 4) float32 boxes x1 y1 x2 y2 in pixels of the original image;
* ``num_bbox``  N;  ``image_h``, ``image_w``: the image size in pixels;
* ``info``      a dict pickled inside a 0-d object array: ``objects_id``, ``objects_conf`` (and,
  with attributes, ``attrs_id``, ``attrs_conf``), 0-based ids like the TSV's; ``image_id``,
  ``image_h``, ``image_w``, ``num_boxes``. Read with the restricted unpickler (no code runs); a
  file without ``info`` (the MCAN releases) carries no labels.

Image ids: the file name without ``.npz`` (the image file's name without its extension, as the
text files name the images: ``COCO_train2014_000000000009``, a VG id, ``n161313``,
``train-10171-0-img0``). Files may sit in sub-folders; the name alone is the id.
"""

from __future__ import annotations

import os
import zipfile

from ..formats import DataFormatError
from ..store import list_files
from .base import LayoutError, LayoutReader, RawRecord, scalar_int
from .safe_pickle import read_npy


class BuaNpzReader(LayoutReader):
    name = "bua_npz"
    title = "bottom-up-attention.pytorch .npz (one file per image)"
    id_rule = "the file name without .npz"
    field_names = {"features": "x", "boxes": "bbox", "img_h": "image_h", "img_w": "image_w",
                   "objects_id": "info.objects_id", "objects_conf": "info.objects_conf",
                   "attrs_id": "info.attrs_id", "attrs_conf": "info.attrs_conf"}

    def __init__(self, path, features_map=None, **kw):
        super().__init__(path, features_map, **kw)
        if not os.path.isdir(self.path):
            raise LayoutError(self.path, f"{self.title}: expected the folder of .npz files")
        self._files = [f for f in list_files(self.path) if f.endswith(".npz")]
        if not self._files:
            raise LayoutError(self.path, f"{self.title}: no .npz file in the folder")
        self._keys = [os.path.basename(f)[: -len(".npz")] for f in self._files]
        self._file_of = dict(zip(self._keys, self._files))

    def keys(self):
        return self._keys

    def file_of(self, key):
        return os.path.join(self.path, self._file_of.get(key, key + ".npz"))

    def _members(self, index: int, key: str) -> dict:
        fp = os.path.join(self.path, self._files[index])
        try:
            with zipfile.ZipFile(fp) as z:
                names = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
                out = {}
                for name in ("x", "bbox", "num_bbox", "image_h", "image_w", "info"):
                    if name not in names:
                        continue
                    with z.open(names[name]) as fh:
                        out[name] = read_npy(fh, fp, name, key)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataFormatError(fp, None, "(file)", f"not a readable .npz archive: {e}", key) from None
        if "info" in out:
            info = out["info"]
            if info.shape != () or not isinstance(info.item(), dict):
                raise DataFormatError(fp, None, "info", f"expected a pickled dict, got {info.dtype} {info.shape}", key)
            out["info"] = info.item()
        return out

    def read(self, index, key):
        m = self._members(index, key)
        for name in ("x", "bbox", "image_h", "image_w"):
            if name not in m:
                raise self.error(key, name, "missing")
        boxes = m["bbox"]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise self.error(key, "bbox", f"expected (N, 4), got {boxes.dtype} {tuple(boxes.shape)}")
        n = boxes.shape[0]
        if "num_bbox" in m:
            nb = scalar_int(m["num_bbox"], lambda msg: self.error(key, "num_bbox", msg))
            if nb != n:
                raise self.error(key, "num_bbox", f"{nb}, but bbox holds {n} boxes")
        x = m["x"]
        if x.ndim == 2 and x.shape != (n, self.feat_dim) and x.shape == (self.feat_dim, n):
            x = x.T  # the MCAN / OpenVQA releases: (2048, N)
        if x.ndim != 2 or x.shape != (n, self.feat_dim):
            raise self.error(key, "x", f"expected ({n}, {self.feat_dim}) or ({self.feat_dim}, {n}) (N = the "
                                       f"{n} boxes of bbox), got {x.dtype} {tuple(x.shape)}")
        info = m.get("info") or {}
        return RawRecord(
            key, scalar_int(m["image_h"], lambda msg: self.error(key, "image_h", msg)),
            scalar_int(m["image_w"], lambda msg: self.error(key, "image_w", msg)), x, boxes,
            info.get("objects_id"), info.get("objects_conf"), info.get("attrs_id"), info.get("attrs_conf"))
