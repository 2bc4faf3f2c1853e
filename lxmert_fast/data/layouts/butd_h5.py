"""bottom-up-attention-vqa HDF5 (``tools/detection_features_converter.py``) and ban-vqa's adaptive
variant (``tools/adaptive_detection_features_converter.py``).

Fixed (36 boxes an image), ``train36.hdf5`` / ``val36.hdf5``:
``image_features`` (I, 36, 2048), ``image_bb`` (I, 36, 4) x1 y1 x2 y2 in pixels,
``spatial_features`` (I, 36, 6) = x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h.
Adaptive (10 to 100 boxes an image), ban-vqa's ``train.hdf5`` / ``val.hdf5`` / ``test2015.hdf5``:
the same datasets flat over all boxes, (B, 2048), (B, 4), (B, 6), and ``pos_boxes`` (I, 2): the
[start, end) rows of each image.
Beside each file ``<name>_imgid2idx.pkl``: a pickled dict {COCO image id (int): image index}
(read with the restricted unpickler: no code runs).

No labels and no image size. The size is recovered from the boxes and the normalised spatial
features (x2 / (x2/w), checked against every coordinate of every box); where the file has no
``spatial_features`` or no box allows it, the features map must give it (``image_sizes``).

Image ids: the id map's integer COCO ids, as ``COCO_<split>_%012d`` with the split taken from the
file name as the two tools name their files: ``train*`` -> ``train2014``, ``val*`` -> ``val2014``,
``test2015*`` / ``test*`` -> ``test2015``; any other file name keeps the bare id. The features
map's ``format`` replaces the rule (``"%d"`` for ban-vqa's Flickr30k files, also named train/val/test).
"""

from __future__ import annotations

import os

import numpy as np

from ..formats import DataFormatError
from ..store import source_fingerprint
from .base import LayoutError, LayoutReader, RawRecord, require
from .safe_pickle import safe_load

BLOCK_IMAGES = 64
SPATIAL_TOLERANCE = 1e-4  # |box / size - spatial feature|: float32 rounding is ~1e-7; a size 1 px off ~1e-3


def id_map_path(path: str) -> str:
    """``<dir>/<name>_imgid2idx.pkl`` beside ``<dir>/<name>.hdf5``."""
    return os.path.splitext(path)[0] + "_imgid2idx.pkl"


def coco_split(path: str) -> str | None:
    """The COCO split a bottom-up-attention-vqa / ban-vqa file name stands for, None if none."""
    name = os.path.basename(path).lower()
    if name.startswith("train"):
        return "train2014"
    if name.startswith("val"):
        return "val2014"
    if name.startswith("test"):
        return "test2015"
    return None


def companion_fingerprints(path: str) -> list[str]:
    """What besides the HDF5 file decides the store: its id map."""
    m = id_map_path(path)
    return [source_fingerprint(m)] if os.path.isfile(m) else []


class ButdH5Reader(LayoutReader):
    name = "butd_h5"
    title = "bottom-up-attention-vqa HDF5 (with <name>_imgid2idx.pkl)"
    id_rule = ("COCO_<split>_%012d of the id map's integer ids, the split from the file name (train* -> train2014, "
               "val* -> val2014, test* -> test2015); other names: the bare id")
    field_names = {"features": "image_features", "boxes": "image_bb", "img_h": "image size",
                   "img_w": "image size"}

    def __init__(self, path, features_map=None, **kw):
        super().__init__(path, features_map, **kw)
        h5py = require("h5py", self.title, self.path)
        self.map_path = id_map_path(self.path)
        if not os.path.isfile(self.map_path):
            raise LayoutError(self.path, f"{self.title}: the image id map {self.map_path} is missing (the converter "
                                         f"writes it beside the .hdf5; without it the rows have no image ids)",
                              "(id map)")
        with open(self.map_path, "rb") as fh:
            id2idx = safe_load(fh, self.map_path, "(id map)")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise LayoutError(self.path, f"not a readable HDF5 file: {e}", "(file)") from None
        f = self._f
        for name in ("image_features", "image_bb"):
            if name not in f:
                raise LayoutError(self.path, f"{self.title}: no dataset '{name}'", name)
        self.adaptive = "pos_boxes" in f
        feats = f["image_features"]
        self.spatial = f["spatial_features"] if "spatial_features" in f else None
        if self.adaptive:
            self.pos = np.asarray(f["pos_boxes"][()])
            n_img = len(self.pos)
            want = {"image_features": (feats.shape[0], self.feat_dim), "image_bb": (feats.shape[0], 4),
                    "spatial_features": (feats.shape[0], 6), "pos_boxes": (n_img, 2)}
        else:
            n_img = feats.shape[0]
            k = feats.shape[1] if feats.ndim == 3 else -1
            want = {"image_features": (n_img, k, self.feat_dim), "image_bb": (n_img, k, 4),
                    "spatial_features": (n_img, k, 6)}
        for name, shape in want.items():
            if name in f and tuple(f[name].shape) != shape:
                raise LayoutError(self.path, f"{self.title}: '{name}' has shape {tuple(f[name].shape)}, expected "
                                             f"{shape}", name)
        if not isinstance(id2idx, dict):
            raise LayoutError(self.map_path, f"expected a pickled {{image id: index}} dict, got {type(id2idx).__name__}",
                              "(id map)")
        by_idx = {}
        for img, idx in id2idx.items():
            if (not isinstance(idx, (int, np.integer)) or isinstance(idx, bool) or not 0 <= int(idx) < n_img
                    or not isinstance(img, (int, np.integer, str))):
                raise DataFormatError(self.map_path, None, "(id map)", f"image {img!r} -> {idx!r}: expected an image "
                                      f"id -> an index in [0, {n_img}) of {os.path.basename(self.path)}", str(img))
            if int(idx) in by_idx:
                raise DataFormatError(self.map_path, None, "(id map)", f"images {by_idx[int(idx)]!r} and {img!r} "
                                      f"share index {idx}", str(img))
            by_idx[int(idx)] = img
        self._order = sorted(by_idx)            # file order: read consecutive rows
        self._keys = [str(by_idx[i]) for i in self._order]
        self._split = coco_split(self.path)
        self._block = (-1, None)

    def keys(self):
        return self._keys

    def close(self):
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()
            self._f = None

    def rule(self, file_id):
        if self._split is None:
            return file_id
        try:
            return f"COCO_{self._split}_{int(file_id):012d}"
        except ValueError:
            return file_id

    def _rows_of(self, idx: int):
        """(features, boxes, spatial or None) of image ``idx``."""
        f = self._f
        if self.adaptive:
            s, e = (int(v) for v in self.pos[idx])
            if not 0 <= s < e <= f["image_features"].shape[0]:
                raise ValueError(f"pos_boxes [{s}, {e}) is not a non-empty range of the "
                                 f"{f['image_features'].shape[0]} boxes")
            return (f["image_features"][s:e], f["image_bb"][s:e],
                    None if self.spatial is None else self.spatial[s:e])
        b0 = idx - idx % BLOCK_IMAGES
        if self._block[0] != b0:  # one read of BLOCK_IMAGES consecutive images
            b1 = min(b0 + BLOCK_IMAGES, f["image_features"].shape[0])
            self._block = (b0, (f["image_features"][b0:b1], f["image_bb"][b0:b1],
                                None if self.spatial is None else self.spatial[b0:b1]))
        arrs = self._block[1]
        j = idx - b0
        return arrs[0][j], arrs[1][j], None if arrs[2] is None else arrs[2][j]

    def read(self, index, key):
        idx = self._order[index]
        try:
            feats, boxes, spatial = self._rows_of(idx)
        except ValueError as e:
            raise self.error(key, "pos_boxes", str(e)) from None
        size = self.features_map.image_sizes.get(key)
        if size is None:
            size = self._recover_size(key, np.asarray(boxes, np.float64), spatial)
        return RawRecord(key, size[0], size[1], feats, boxes)

    def _recover_size(self, key, boxes, spatial) -> tuple[int, int]:
        """(h, w) from the boxes and the spatial features, checked against every coordinate."""
        how = "give it in the features map's image_sizes (--features_map)"
        if spatial is None:
            raise self.error(key, "spatial_features", f"absent, and the file stores no image size: {how}")
        sp = np.asarray(spatial, np.float64)
        if sp.shape != (len(boxes), 6) or not np.isfinite(sp).all():
            raise self.error(key, "spatial_features", f"expected finite ({len(boxes)}, 6), got {sp.shape}")
        if not np.isfinite(boxes).all():
            raise self.error(key, "image_bb", "non-finite coordinate")
        size = []
        for col, what in ((3, "height"), (2, "width")):  # y2 / (y2 / h), x2 / (x2 / w)
            ok = (sp[:, col] > 1e-6) & (boxes[:, col] > 0)
            if not ok.any():
                raise self.error(key, "spatial_features", f"no box gives the image {what} (every box ends at 0): {how}")
            size.append(int(round(float(np.median(boxes[ok, col] / sp[ok, col])))))
        h, w = size
        if h <= 0 or w <= 0:
            raise self.error(key, "spatial_features", f"the boxes give an image size of {w}x{h} (w x h): {how}")
        scale = np.array([w, h, w, h], np.float64)
        err = np.abs(boxes / scale - sp[:, :4])
        if err.max() > SPATIAL_TOLERANCE:
            i, j = np.unravel_index(int(np.argmax(err)), err.shape)
            raise self.error(key, "spatial_features",
                             f"object {i}: the boxes and the normalised spatial features disagree: no image size "
                             f"fits (best {w}x{h}, w x h: coordinate {j} is {boxes[i, j]:g} px, "
                             f"spatial {sp[i, j]:g} vs {boxes[i, j] / scale[j]:g}); {how}")
        return h, w


def looks_like(f) -> bool:
    """Whether an open HDF5 file has bottom-up-attention-vqa's shape."""
    return "image_features" in f and "image_bb" in f
