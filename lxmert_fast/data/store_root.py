"""A store root: one converted feature store per feature file, shared by every job.

Layout (default ``<data_root>/lxmert_fast``; pre-training's ``--store_in_cache`` and fine-tuning's
``--store_dir`` name another)::

    <store_root>/
      store-train2014/        one store per *_obj36.tsv (its manifest names the source file and
      store-val2014/            records its content fingerprint), converted on first use
      store-vg_gqa/
      sentences/<key>/        pre-training sentence indexes, keyed by the splits and the stores read

:func:`ensure_store` gives the store of one feature file: converted on first use (written aside,
renamed into place), reused after. Pre-training and the fine-tuning tasks both call it, so the
same TSV under the same store root is converted once, whichever job comes first; a job that needs
several files reads several stores (pre-training through a
:class:`~lxmert_fast.data.store_set.StoreSet`).

A store is *found again by its source fingerprint* (:func:`~lxmert_fast.data.store.source_fingerprint`:
size, first and last MiB): first the directory named after the file (``store-<name>``), then any
other complete single-file store under the root whose source has the file's fingerprint, so a
renamed or moved TSV (or its copy in another data root sharing the store root) finds the store
converted from its content and is not converted again. The fingerprint is checked on every reuse:
when ``store-<name>`` holds a store converted from other content and no store of this content
exists, that is an error naming both files (delete the store or give another store root), never
a read with the wrong images and never a silent second conversion of tens of GB.

A feature source of another layout (:mod:`lxmert_fast.data.layouts`: a folder of ``.npz`` or ``.npy``
files, an HDF5 file, an LMDB) gets its store the same way, named ``store-<name>-<layout>`` and found
again by its layout's fingerprint (the files' content, an HDF5 file's id map, the features map).

Stores that several files were converted into (the combined pre-training store of earlier
versions, ``store-train2014+val2014+vg_gqa``) are never used for one file: their rows are not one
file's rows. A conversion logs that such a store can be deleted.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

from . import tsv_convert
from .layouts import FeaturesMap, layout_fingerprint, resolve_layout
from .layouts.convert import convert_source
from .store import MANIFEST, STORE_FORMAT, FeatureStore, StoreError, source_size

SENTENCES_DIR = "sentences"


def store_name(tsv_path: str, fp32: bool = False, layout: str = "tsv") -> str:
    """``store-<name>[-<layout>][-fp32]`` with ``<name>`` the file name without ``_obj36.tsv`` (or its
    extension): ``train2014_obj36.tsv`` -> ``store-train2014``; a source of another layout adds the
    layout's name: ``train36.hdf5`` -> ``store-train36-butd_h5``."""
    name = os.path.basename(os.path.normpath(tsv_path))
    name = name[: -len("_obj36.tsv")] if name.endswith("_obj36.tsv") else os.path.splitext(name)[0]
    return f"store-{name}{'' if layout == 'tsv' else '-' + layout}{'-fp32' if fp32 else ''}"


def store_dir_for(tsv_path: str, store_root: str, fp32: bool = False, layout: str = "tsv") -> str:
    """The directory a new store of ``tsv_path`` gets under ``store_root``."""
    return os.path.join(store_root, store_name(tsv_path, fp32, layout))


def _read_manifest(path: str) -> Optional[dict]:
    """The manifest of a complete store at ``path``, None where there is none (or not readable)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == STORE_FORMAT and m.get("complete") else None


def _is_store_of(manifest: dict, tsv_path: str, fingerprint: str) -> bool:
    """Whether a store was converted from ``tsv_path``'s content alone: its one source has the
    file's fingerprint (stores of versions before fingerprints: the file's path and size)."""
    sources = manifest.get("sources") or []
    if len(sources) != 1:
        return False
    src = sources[0]
    if "fingerprint" in src:
        return src["fingerprint"] == fingerprint
    return src.get("path") == os.path.abspath(tsv_path) and src.get("bytes") == source_size(tsv_path)


def _candidates(store_root: str) -> list[str]:
    """Directories under ``store_root`` that may hold a store (sorted; no partial conversions)."""
    try:
        names = sorted(os.listdir(store_root))
    except FileNotFoundError:
        return []
    return [os.path.join(store_root, n) for n in names
            if n != SENTENCES_DIR and ".partial-" not in n and ".old-" not in n
            and os.path.isdir(os.path.join(store_root, n))]


def find_store(tsv_path: str, store_root: str, *, fp32: bool = False,
               fingerprint: Optional[str] = None, layout: str = "tsv") -> Optional[FeatureStore]:
    """The complete store under ``store_root`` converted from the content of ``tsv_path`` alone,
    with features in the asked dtype, or None.

    Looks at ``store-<name>`` first, then at every other single-file store of the root (one
    manifest read each): the match is by source fingerprint (``fingerprint``: the layout's, see
    :func:`~lxmert_fast.data.layouts.layout_fingerprint`), not by name.
    """
    fingerprint = fingerprint or layout_fingerprint(tsv_path, layout)
    dtype = "float32" if fp32 else "float16"
    preferred = store_dir_for(tsv_path, store_root, fp32, layout)
    for path in [preferred] + [c for c in _candidates(store_root) if c != preferred]:
        m = _read_manifest(path)
        if m is not None and m.get("feat_dtype") == dtype and _is_store_of(m, tsv_path, fingerprint):
            return FeatureStore.open(path)
    return None


def _combined_stores(store_root: str) -> list[str]:
    out = []
    for path in _candidates(store_root):
        m = _read_manifest(path)
        if m is not None and len(m.get("sources") or []) > 1:
            out.append(path)
    return out


def ensure_store(tsv_path: str, store_root: str, *, fp32: bool = False, skip_bad: bool = False,
                 workers: Optional[int] = None, convert: bool = True,
                 convert_options: Optional[dict] = None, features_format: str = "auto",
                 features_map: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = print) -> FeatureStore:
    """The store of one feature source under ``store_root``: found by its source fingerprint, or
    (``convert``) converted on first use into ``store-<name>`` (atomically: written aside and
    renamed into place; concurrent builders keep the first complete one). ``convert_options``: more
    keywords of :func:`~lxmert_fast.data.tsv_convert.convert_tsvs` for a conversion (``num_boxes``,
    ``feat_dim``, ...); a store found is used as it was converted. ``features_format``: the source's
    layout (``auto``: detected, see :mod:`lxmert_fast.data.layouts`); ``features_map``: a JSON file
    mapping the other layouts' image ids to the text files' ids (part of their stores' identity; a
    TSV source does not read it).

    Raises :class:`FileNotFoundError` for a missing file, :class:`StoreError` when ``store-<name>``
    holds a store of other content (naming both files) or, without ``convert``, when there is no
    store of this file yet.
    """
    if not os.path.exists(tsv_path):
        raise FileNotFoundError(f"feature file {tsv_path} not found")
    layout = resolve_layout(tsv_path, features_format)
    # a job's map serves its sources of other layouts; a TSV's img_ids are the text files' ids already
    fmap = FeaturesMap.load(features_map) if layout != "tsv" else None
    fp = layout_fingerprint(tsv_path, layout, fmap)
    store = find_store(tsv_path, store_root, fp32=fp32, fingerprint=fp, layout=layout)
    out = store_dir_for(tsv_path, store_root, fp32, layout)
    if store is not None:
        if store.path != os.path.abspath(out) and log:
            src = store.sources[0]["path"]
            log(f"{tsv_path}: using the store {store.path}, converted from the same content "
                f"({src}: same fingerprint)")
    else:
        if os.path.exists(os.path.join(out, MANIFEST)):
            other = FeatureStore.open(out)
            if _is_store_of(other.manifest, tsv_path, fp):
                raise StoreError(f"{out}: a store of {tsv_path} with {other.feat_dtype} features, "
                                 f"{'float32' if fp32 else 'float16'} asked for; delete it to convert again, "
                                 f"or ask for {other.feat_dtype}")
            built = "; ".join(f"{src['path']} ({src.get('bytes')} bytes, content fingerprint "
                              f"{str(src.get('fingerprint'))[:12]})"
                              for src in other.sources) or "(no sources recorded)"
            raise StoreError(
                f"{out}: this store was converted from {built}, not from the content {tsv_path} has now "
                f"({source_size(tsv_path)} bytes, fingerprint {fp[:12]}: re-generated or replaced, or another "
                f"features map?), and no store of that content is under {store_root}; delete {out} to convert "
                f"{tsv_path} again, or give another store root")
        if not convert:
            raise StoreError(f"{store_root}: no converted store of {tsv_path} (expected {out}); convert it "
                             f"first (python -m lxmert_fast.data.convert --store-root {store_root} {tsv_path})")
        if log:
            for old in _combined_stores(store_root):
                log(f"{old}: a store of several feature files from an earlier version; it is no longer "
                    f"read (one store per file now): delete it to free its space")
        options = dict(fp32=fp32, skip_bad=skip_bad, workers=workers, overwrite=os.path.exists(out),
                       progress=bool(log), log=log, **(convert_options or {}))
        if layout == "tsv":  # the TSV's parallel converter (looked up on call: tests count its calls)
            tsv_convert.convert_tsvs([tsv_path], out, **options)
        else:
            convert_source(tsv_path, out, layout=layout, features_map=fmap, fingerprint=fp, **options)
        store = FeatureStore.open(out)
    store.check_sources([tsv_path], fingerprints=[fp])  # on every reuse, and after a concurrent builder won
    return store
