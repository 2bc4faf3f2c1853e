"""Several feature stores read as one: what a pre-training job over several feature files reads.

Global row ``r`` of a :class:`StoreSet` is row ``r - offsets[s]`` of store ``s``, where ``s`` is
the store whose range ``[offsets[s], offsets[s + 1])`` holds ``r`` (stores in the order given:
the order of the feature files of the splits). A global row identifies one image across the set
(the sentence index's ``img_row``, the batch's ``img_index`` that masking uses to find "another
image").

Batch reads stay whole-batch numpy: one ``searchsorted`` maps the batch's rows to stores, then
each store present in the batch reads its rows straight into their places of the batch buffer
(features with ``preadv``, never mapped; the small per-object arrays through read-only memory maps).
Like :class:`~lxmert_fast.data.store.FeatureStore` the set is lazy and cheap to pickle, so loader
workers share the stores through the page cache.

The stores must agree on ``num_boxes``, ``feat_dim`` and ``feat_dtype`` (an error names the stores
that differ). An img_id in two stores is an error naming both files and lines (the original
loader let the file loaded last win, silently); with ``skip_bad`` the first store in the set's
order keeps it and the other row is reported as skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

from .formats import DataFormatError
from .store import ROW_ARRAYS, FeatureStore, StoreError


def store_identity(store: FeatureStore) -> dict:
    """What a store holds, independent of where it is: its sources' fingerprints and sizes, its
    shape and the checksums (or sizes) of its img_ids and features."""
    m = store.manifest
    files = m["files"]
    return {
        "sources": [s.get("fingerprint") or [os.path.basename(s["path"]), s.get("bytes")] for s in store.sources],
        "num_images": store.num_images, "num_boxes": store.num_boxes, "feat_dim": store.feat_dim,
        "feat_dtype": store.feat_dtype,
        "img_ids": files["img_ids"].get("sha256") or files["img_ids"]["bytes"],
        "features": files["features"].get("sha256") or files["features"]["bytes"],
    }


class StoreSet:
    """Feature stores read as one (global row = store offset + row). Lazy and picklable.

    ``root``: the store root the stores live in (where sentence indexes of the set go); defaults
    to the stores' common parent directory, None when they have none.
    """

    def __init__(self, stores: Sequence[FeatureStore], root: Optional[str] = None):
        stores = list(stores)
        if not stores:
            raise ValueError("a StoreSet needs at least one store")
        paths = [s.path for s in stores]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a store appears twice in the set: {paths}")
        first = stores[0]
        for s in stores[1:]:
            for what in ("num_boxes", "feat_dim", "feat_dtype"):
                if getattr(s, what) != getattr(first, what):
                    raise StoreError(f"feature stores disagree on {what}: {first.path} has {getattr(first, what)}, "
                                     f"{s.path} has {getattr(s, what)} (convert the files with the same options)")
        if root is None:
            parents = {os.path.dirname(p) for p in paths}
            root = parents.pop() if len(parents) == 1 else None
        self.stores = stores
        self.root = os.path.abspath(root) if root is not None else None
        self.offsets = np.concatenate([[0], np.cumsum([s.num_images for s in stores])]).astype(np.int64)
        self.num_images = int(self.offsets[-1])
        self.num_boxes, self.feat_dim, self.feat_dtype = first.num_boxes, first.feat_dim, first.feat_dtype
        self._index: Optional[dict[str, int]] = None
        self._duplicates: Optional[list[DataFormatError]] = None

    @classmethod
    def of(cls, stores) -> "StoreSet":
        """``stores`` as a set: a StoreSet as it is, a store (or a list of them) wrapped."""
        if isinstance(stores, StoreSet):
            return stores
        return cls([stores] if isinstance(stores, FeatureStore) else stores)

    # -- identity -------------------------------------------------------------------------------
    @property
    def path(self) -> Optional[str]:
        """The set's home: its store root (as ``FeatureStore.path`` is a store's directory)."""
        return self.root

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.stores]

    @property
    def key(self) -> str:
        """Content key of the set: the stores' identities in order (not their paths, so moving the
        store root keeps it)."""
        ident = [store_identity(s) for s in self.stores]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def __getstate__(self):
        return {"stores": self.stores, "root": self.root}

    def __setstate__(self, state):
        self.__init__(state["stores"], state["root"])

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"StoreSet({self.paths!r}, images={self.num_images}, boxes={self.num_boxes}, "
                f"dim={self.feat_dim}, dtype={self.feat_dtype})")

    def close(self) -> None:
        for s in self.stores:
            s.close()

    # -- rows -----------------------------------------------------------------------------------
    def locate(self, rows_b) -> tuple[np.ndarray, np.ndarray]:
        """(store index, row within that store) of global rows ``rows_b``."""
        rows_b = np.asarray(rows_b, np.int64)
        if rows_b.size and (rows_b.min() < 0 or rows_b.max() >= self.num_images):
            raise IndexError(f"row out of range [0, {self.num_images})")
        store_b = np.searchsorted(self.offsets, rows_b, side="right") - 1
        return store_b, rows_b - self.offsets[store_b]

    def _groups(self, rows_b):
        """(store, rows within it, their positions in ``rows_b``) for each store the rows touch."""
        store_b, local_b = self.locate(rows_b)
        if len(self.stores) == 1:
            yield self.stores[0], local_b, None
            return
        for si in np.unique(store_b).tolist():
            sel = np.flatnonzero(store_b == si)
            yield self.stores[si], local_b[sel], sel

    def read_features(self, rows_b, out_bkd: Optional[np.ndarray] = None) -> np.ndarray:
        """Feature rows (B, K, D) in the stores' dtype, each read straight into its batch slot."""
        rows_b = np.asarray(rows_b, np.int64)
        if out_bkd is None:
            out_bkd = np.empty((len(rows_b), self.num_boxes, self.feat_dim), self.feat_dtype)
        elif len(out_bkd) != len(rows_b):
            raise ValueError(f"out_bkd has {len(out_bkd)} rows for {len(rows_b)} reads")
        for store, local, sel in self._groups(rows_b):
            store.read_features(local, out_bkd, out_rows=sel)
        return out_bkd

    def take(self, name: str, rows_b, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows of a small per-row array (``boxes``, ``obj_ids``, ..., ``img_ids``), cast into
        ``out`` when given."""
        if name == "features":
            raise ValueError("read features with read_features (preadv, not mapped)")
        if name not in ROW_ARRAYS and name != "img_ids":
            raise KeyError(f"no per-row array {name!r} in a feature store")
        rows_b = np.asarray(rows_b, np.int64)
        if out is None:
            proto = self.stores[0].array(name)
            dtype = (np.result_type(*[s.array(name).dtype for s in self.stores]) if name == "img_ids"
                     else proto.dtype)
            out = np.empty((len(rows_b),) + proto.shape[1:], dtype)
        for store, local, sel in self._groups(rows_b):
            if sel is None:
                out[...] = store.array(name)[local]
            else:
                out[sel] = store.array(name)[local]
        return out

    def gather_into(self, rows_b, outs: dict[str, np.ndarray]) -> None:
        """Fill ``outs`` (``{array name: batch buffer}``, ``features`` included) with rows ``rows_b``,
        mapping the rows to stores once: what a batch of the dataset does."""
        rows_b = np.asarray(rows_b, np.int64)
        for name, out in outs.items():
            if len(out) != len(rows_b):
                raise ValueError(f"{name}: buffer of {len(out)} rows for {len(rows_b)} reads")
        for store, local, sel in self._groups(rows_b):
            for name, out in outs.items():
                if name == "features":
                    store.read_features(local, out, out_rows=sel)
                elif sel is None:
                    out[...] = store.array(name)[local]
                else:
                    out[sel] = store.array(name)[local]

    @property
    def img_ids(self) -> np.ndarray:
        """Every img_id of the set in global row order (a copy: for checks, not for workers)."""
        return self.take("img_ids", np.arange(self.num_images))

    def source_of(self, row: int) -> tuple[str, int]:
        """(TSV file, line) global row ``row`` was converted from."""
        (si,), (local,) = self.locate([row])
        store = self.stores[int(si)]
        src = store.sources[int(store.array("src_file")[local])]["path"]
        return src, int(store.array("src_line")[local])

    def without_labels(self, kind: str) -> list[FeatureStore]:
        """The stores that carry no ``kind`` labels (``objects`` / ``attributes``): converted from a
        layout whose files have none (their ids and confidences are zeros)."""
        if kind not in ("objects", "attributes"):
            raise ValueError(f"kind must be 'objects' or 'attributes', got {kind!r}")
        return [s for s in self.stores if not s.labels.get(kind, True)]

    # -- img_id index ---------------------------------------------------------------------------
    def _build_index(self) -> None:
        index: dict[str, int] = {}
        dups: list[DataFormatError] = []
        for si, store in enumerate(self.stores):
            off = int(self.offsets[si])
            for r, img_id in enumerate(store.array("img_ids").tolist()):
                prev = index.get(img_id)
                if prev is None:
                    index[img_id] = off + r
                    continue
                path, line = self.source_of(off + r)
                ppath, pline = self.source_of(prev)
                if store.layout != "tsv":  # src_line is a record index there: name the record by its image id
                    line = None
                dups.append(DataFormatError(path, line, "img_id",
                                            f"img_id {img_id!r} also has features in {ppath}:{pline} "
                                            f"(stores {self.stores[int(self.locate([prev])[0][0])].path} and "
                                            f"{store.path}): one image, two feature rows",
                                            None if line is not None else img_id))
        self._index, self._duplicates = index, dups

    def duplicates(self) -> list[DataFormatError]:
        """One error per img_id row found again in a later store of the set."""
        if self._duplicates is None:
            self._build_index()
        return list(self._duplicates)

    def index(self, skip_bad: bool = False) -> dict[str, int]:
        """img_id -> global row (built on first use; meant for the main process, not for workers).

        An img_id in two stores raises the :class:`DataFormatError` naming both files unless
        ``skip_bad``: then the first store keeps it (see :meth:`duplicates` for the others).
        """
        if self._index is None:
            self._build_index()
        if self._duplicates and not skip_bad:
            raise self._duplicates[0]
        return self._index

    def row_of(self, img_id: str) -> int:
        try:
            return self.index()[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} is not in the feature stores {self.paths}") from None


def label_loss_problems(losses, store_sets) -> str:
    """What stops the ``obj`` / ``attr`` losses of ``losses`` on ``store_sets`` ('' when nothing):
    they need the detector's labels, which a store converted from a layout without them (a
    bottom-up-attention-vqa HDF5, MMF's features for attributes) does not carry. The message names
    the source files, their layout, what they lack and the losses that remain possible."""
    problems, refused = [], set()
    for loss, kind in (("obj", "objects"), ("attr", "attributes")):
        if loss not in losses:
            continue
        for sset in store_sets:
            for st in StoreSet.of(sset).without_labels(kind):
                refused.add(loss)
                src = ", ".join(s["path"] for s in st.sources)
                problems.append(f"--visual_losses {loss} needs the detector's {kind[:-1]} labels, but {src} "
                                f"({st.manifest.get('layout_title', st.layout)}) carries no {kind[:-1]} ids or "
                                f"confidences (store {st.path})")
    if not problems:
        return ""
    keep = ",".join(x for x in losses if x not in refused) or "feat"
    return "; ".join(dict.fromkeys(problems)) + f"; pre-train these features with --visual_losses {keep}"
