"""Region features in the layouts other tools write, converted into the same feature store.

One reader module per layout family, and this registry, which detects a source's layout and
selects its reader (``--features_format``, default ``auto``):

==============  ===========================================================================
``tsv``         the original release's ``*_obj36.tsv`` (:mod:`lxmert_fast.data.formats`)
``bua_npz``     bottom-up-attention.pytorch, a folder of ``.npz`` (:mod:`.bua_npz`)
``vlt5_h5``     VL-T5's HDF5, one group per image (:mod:`.vlt5_h5`)
``butd_h5``     bottom-up-attention-vqa / ban-vqa HDF5 + ``*_imgid2idx.pkl`` (:mod:`.butd_h5`)
``mmf_npy``     MMF / ViLBERT, a folder of ``.npy`` (+ ``_info.npy``) (:mod:`.mmf`)
``mmf_lmdb``    MMF's LMDB of those (:mod:`.mmf`)
==============  ===========================================================================

Every layout goes through :func:`~lxmert_fast.data.layouts.convert.convert_source` into the
store :class:`~lxmert_fast.data.store.FeatureStore` reads, whichever tool wrote the files; the
store's manifest records the layout and which labels it carries (``labels``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from ..store import source_fingerprint, source_size
from .base import FeaturesMap, LayoutError, LayoutReader, require
from .bua_npz import BuaNpzReader
from .butd_h5 import ButdH5Reader, companion_fingerprints
from .butd_h5 import looks_like as _looks_butd
from .mmf import MmfLmdbReader, MmfNpyReader, lmdb_data_file, lmdb_fingerprint
from .vlt5_h5 import VlT5H5Reader
from .vlt5_h5 import looks_like as _looks_vlt5

READERS: dict[str, type[LayoutReader]] = {r.name: r for r in (BuaNpzReader, VlT5H5Reader, ButdH5Reader,
                                                               MmfNpyReader, MmfLmdbReader)}
LAYOUT_NAMES = ("tsv",) + tuple(READERS)
FORMAT_CHOICES = ("auto",) + LAYOUT_NAMES
TITLES = {"tsv": "LXMERT / Caffe bottom-up-attention TSV", **{n: r.title for n, r in READERS.items()}}
H5_SUFFIXES = (".h5", ".hdf5", ".hdf")

__all__ = ["FORMAT_CHOICES", "LAYOUT_NAMES", "READERS", "TITLES", "FeaturesMap", "LayoutError", "detect_layout",
           "layout_fingerprint", "open_reader", "resolve_layout", "source_bytes"]


def _scan(path: str, limit: int = 2000) -> set[str]:
    """The kinds of files in a folder (``.npz``, ``.npy``, ``_info.npy``, ``data.mdb``), looking at
    no more than ``limit`` files."""
    kinds: set[str] = set()
    seen = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name == "data.mdb":
                kinds.add("data.mdb")
            elif name.endswith("_info.npy"):
                kinds.add("_info.npy")
            elif name.endswith((".npy", ".npz", ".tsv")):
                kinds.add(os.path.splitext(name)[1])
            seen += 1
            if seen >= limit:
                return kinds
    return kinds


def detect_layout(path: str) -> str:
    """The layout of a feature source, from its name and a look inside; :class:`LayoutError` when
    it cannot be told (then name it with ``--features_format``)."""
    hint = f"name the layout with --features_format ({', '.join(LAYOUT_NAMES)})"
    if not os.path.exists(path):
        raise FileNotFoundError(f"feature source {path} not found")
    if os.path.isdir(path):
        kinds = _scan(path)
        if "data.mdb" in kinds:
            return "mmf_lmdb"
        found = [k for k in (".npz", ".npy") if k in kinds]
        if len(found) == 1:
            return "bua_npz" if found == [".npz"] else "mmf_npy"
        what = "both .npz and .npy files" if found else "no .npz, .npy or LMDB files"
        raise LayoutError(path, f"cannot tell the feature layout of this folder: it holds {what}; {hint}")
    low = path.lower()
    if low.endswith(".tsv"):
        return "tsv"
    if low.endswith(".lmdb") or low.endswith(".mdb"):
        return "mmf_lmdb"
    if low.endswith(H5_SUFFIXES):
        h5py = require("h5py", "an HDF5 feature file", path)
        try:
            with h5py.File(path, "r") as f:
                if _looks_butd(f):
                    return "butd_h5"
                if _looks_vlt5(f):
                    return "vlt5_h5"
                top = sorted(f.keys())[:5]
        except OSError as e:
            raise LayoutError(path, f"not a readable HDF5 file: {e}", "(file)") from None
        raise LayoutError(path, f"an HDF5 file of no known feature layout (top-level entries {top}: neither "
                                f"bottom-up-attention-vqa's image_features/image_bb nor VL-T5's groups with "
                                f"features); {hint}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF"):
        raise LayoutError(path, f"an HDF5 file without an .h5/.hdf5 name; {hint}")
    return "tsv"  # a TSV by another name: its reader names what is wrong with it


def resolve_layout(path: str, features_format: str = "auto") -> str:
    """``features_format`` checked (``auto``: :func:`detect_layout`)."""
    if features_format in (None, "auto"):
        return detect_layout(path)
    if features_format not in LAYOUT_NAMES:
        raise LayoutError(path, f"unknown --features_format {features_format!r}: expected one of {', '.join(FORMAT_CHOICES)}")
    if features_format == "tsv" and os.path.isdir(path):
        raise LayoutError(path, "--features_format tsv names a file, not a folder")
    return features_format


def open_reader(path: str, layout: str, features_map: Optional[FeaturesMap] = None, **kw) -> LayoutReader:
    """The reader of ``path`` in ``layout`` (not ``tsv``: the TSV has its own parallel converter)."""
    if layout not in READERS:
        raise LayoutError(path, f"no record reader for layout {layout!r} (one of {', '.join(READERS)})")
    return READERS[layout](path, features_map, **kw)


def layout_fingerprint(path: str, layout: str, features_map: Optional[FeaturesMap] = None) -> str:
    """What identifies the store of a source: for a TSV its content fingerprint (as stores have
    always recorded it); for the other layouts the layout, the content fingerprint of the files
    (a folder's listing, an LMDB's data file, an HDF5 file and its id map) and the features map."""
    if layout == "tsv":
        if features_map is not None and features_map.path is not None:
            raise LayoutError(path, "--features_map applies to the other layouts: a TSV's img_ids are the text "
                                    "files' ids already")
        return source_fingerprint(path)
    h = hashlib.sha256(f"layout={layout}\n".encode())
    h.update((lmdb_fingerprint(path) if layout == "mmf_lmdb" else source_fingerprint(path)).encode())
    if layout == "butd_h5":
        for fp in companion_fingerprints(path):
            h.update(fp.encode())
    if features_map is not None and features_map.sha256:
        h.update(f"map={features_map.sha256}".encode())
    return h.hexdigest()


def source_bytes(path: str, layout: str) -> int:
    """The bytes a conversion reads (for MB/s): a file, a folder's files, an LMDB's data file."""
    if layout == "mmf_lmdb":
        data = lmdb_data_file(path)
        return os.path.getsize(data) if data else 0
    return source_size(path)
