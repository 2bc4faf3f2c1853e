"""Convert a feature source of any layout into a feature store (the TSV's store, row for row).

:func:`convert_source` is what :func:`~lxmert_fast.data.store_root.ensure_store` and
``python -m lxmert_fast.data.convert`` call for one source: a TSV goes to the TSV converter
(:func:`~lxmert_fast.data.tsv_convert.convert_tsvs`, parallel); another layout is read record by
record by its reader (:mod:`lxmert_fast.data.layouts`) and written with the same
:class:`~lxmert_fast.data.store.RowWriter`, the same checks, the same box normalisation and the
same manifest, into a temporary sibling directory renamed into place at the end. So the store is
the same object whichever layout fed it: equal records give equal stores (features to the bit,
boxes, labels, sizes, box counts), and a store of a layout without labels says so in its manifest
(``labels``), which pre-training reads before it asks for an object or attribute loss.

A record's row keeps where it came from: ``src_file`` 0 (the one source) and ``src_line`` its
index in the reader's order (``src_line`` is a record number here, not a line).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from .. import tsv_convert
from ..formats import DEFAULT_FEAT_DIM, DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES, BadRowLog, DataFormatError
from ..store import RowWriter, finalize_store
from . import FeaturesMap, layout_fingerprint, open_reader, resolve_layout, source_bytes

_WRITE_BLOCK_ROWS = 32


def convert_source(path: str, out_dir: str, *, layout: str = "auto", features_map: Optional[FeaturesMap] = None,
                   fp32: bool = False, skip_bad: bool = False, workers: Optional[int] = None,
                   num_boxes: Optional[int] = None, feat_dim: int = DEFAULT_FEAT_DIM,
                   num_obj_classes: int = DEFAULT_NUM_OBJ_CLASSES, num_attr_classes: int = DEFAULT_NUM_ATTR_CLASSES,
                   overwrite: bool = False, checksum: bool = True, progress: bool = True, log=print,
                   fingerprint: Optional[str] = None) -> dict:
    """Convert one feature source (a file or a folder) into a store at ``out_dir``; the manifest.

    ``layout``: a name of :data:`~lxmert_fast.data.layouts.LAYOUT_NAMES` or ``auto`` (detected).
    A TSV is converted by :func:`~lxmert_fast.data.tsv_convert.convert_tsvs` (``workers`` processes);
    the other layouts in this process. Raises :class:`DataFormatError` (file, key, field) on the
    first bad record unless ``skip_bad``: then bad records are skipped, counted, logged and listed in
    ``skipped_rows.tsv``. ``num_boxes``: the store's boxes per image (images with fewer are
    zero-padded; default the first record's count, which every record must then have).
    """
    layout = resolve_layout(path, layout)
    opts = dict(fp32=fp32, skip_bad=skip_bad, num_boxes=num_boxes, feat_dim=feat_dim,
                num_obj_classes=num_obj_classes, num_attr_classes=num_attr_classes, overwrite=overwrite,
                checksum=checksum, progress=progress, log=log)
    if layout == "tsv":
        if features_map is not None and features_map.path is not None:
            layout_fingerprint(path, layout, features_map)  # raises: a map does not apply to a TSV
        return tsv_convert.convert_tsvs([path], out_dir, workers=workers, **opts)
    return _convert_records(path, out_dir, layout, features_map or FeaturesMap(), fingerprint, **opts)


def _convert_records(path: str, out_dir: str, layout: str, fmap: FeaturesMap, fingerprint: Optional[str], *,
                     fp32: bool, skip_bad: bool, num_boxes: Optional[int], feat_dim: int, num_obj_classes: int,
                     num_attr_classes: int, overwrite: bool, checksum: bool, progress: bool,
                     log: Optional[Callable[[str], None]]) -> dict:
    t0 = time.time()
    path = os.path.abspath(path)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass --overwrite to replace it)")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    fingerprint = fingerprint or layout_fingerprint(path, layout, fmap)
    tmp = tsv_convert.make_partial_dir(out_dir, log)
    feat_dtype = "float32" if fp32 else "float16"
    bad = BadRowLog(skip_bad)
    try:
        with open_reader(path, layout, fmap, feat_dim=feat_dim, num_obj_classes=num_obj_classes,
                         num_attr_classes=num_attr_classes) as reader:
            n_rec = len(reader)
            fixed = num_boxes is not None
            if fixed and num_boxes <= 0:
                raise ValueError("num_boxes must be positive")
            opts = tsv_convert._Options(num_boxes or 0, fixed, feat_dim, fp32, skip_bad, num_obj_classes,
                                        num_attr_classes, "--num-boxes" if fixed else "")
            writer, img_ids = _write_records(reader, layout, tmp, opts, feat_dtype, bad, progress)
            written = len(img_ids)
            if writer is None or written == 0:
                raise DataFormatError(path, None, "(file)", f"no valid record to convert ({n_rec} records)")
            if written < n_rec:  # skipped records: exact-size arrays
                writer = tsv_convert._compact(writer, tmp, np.arange(written), opts, progress)
            extra = _manifest_extra(path, layout, reader, fmap, fingerprint, opts, bad)
        tsv_convert.write_skipped_rows(bad, tmp, extra)
        manifest = finalize_store(tmp, writer, num_images=written, num_boxes=opts.num_boxes, feat_dim=feat_dim,
                                  feat_dtype=feat_dtype, img_ids=img_ids, extra=extra, checksum=checksum)
        tsv_convert.place_store(tmp, out_dir, overwrite, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.time() - t0
    _log_converted(log, written, extra, reader.title, out_dir, dt, feat_dtype, bad)
    manifest["seconds"] = dt
    return manifest


def _write_records(reader, layout: str, tmp: str, opts, feat_dtype: str, bad: BadRowLog,
                   progress: bool) -> tuple[Optional[RowWriter], list[str]]:
    """Write the valid records, in source order, into row arrays under ``tmp``: (the writer, closed; None when no
    record is valid) and the image id of each row written. The first valid record fixes the box count unless
    ``opts.fixed_boxes``; a bad record (also a repeated image id) goes to ``bad``."""
    writer = bufs = None
    img_ids: list[str] = []
    first_seen: dict[str, str] = {}
    filled = written = 0
    bar = None
    if progress:
        bar = tqdm(total=len(reader), unit="img", desc=f"convert {layout}", file=sys.stderr, dynamic_ncols=True)
    try:
        for i, key, row in reader.rows(bad, check_fp16=not opts.fp32):
            if bar:
                bar.update(1)
            if row is None:
                continue
            try:
                if writer is None:  # the first valid record fixes the box count
                    if not opts.fixed_boxes:
                        opts.num_boxes, opts.first_row = row.num_boxes, f"{reader.file_of(key)} key {key!r}"
                    writer = RowWriter.create(tmp, len(reader), opts.num_boxes, opts.feat_dim, feat_dtype)
                    bufs = writer.buffers(_WRITE_BLOCK_ROWS)
                _check_record(row, key, reader, opts, first_seen)
            except DataFormatError as e:
                bad.handle(e)
                continue
            first_seen[row.img_id] = key
            tsv_convert._fill_row(bufs, filled, row, opts, 0, i)
            img_ids.append(row.img_id)
            filled += 1
            if filled == _WRITE_BLOCK_ROWS:
                writer.write(written, bufs, filled)
                written, filled = written + filled, 0
        if writer is not None and filled:
            writer.write(written, bufs, filled)
    finally:
        if bar:
            bar.close()
        if writer is not None:
            writer.close()
    return writer, img_ids


def _check_record(row, key: str, reader, opts, first_seen: dict[str, str]) -> None:
    """DataFormatError for a record whose box count the store cannot hold or whose image id was seen before."""
    _check_boxes(row.num_boxes, opts, reader.file_of(key), key)
    prev = first_seen.get(row.img_id)
    if prev is not None:
        raise DataFormatError(reader.file_of(key), None, "image id",
                              f"duplicate image id {row.img_id!r} (first at key {prev!r})", key)


def _manifest_extra(path: str, layout: str, reader, fmap: FeaturesMap, fingerprint: str, opts,
                    bad: BadRowLog) -> dict:
    """The store's manifest fields beyond the arrays: its source, layout, labels, image-id rule, skipped count."""
    return {
        "sources": [{"path": path, "bytes": source_bytes(path, layout), "records": len(reader),
                     "fingerprint": fingerprint, "layout": layout}],
        "layout": layout, "layout_title": reader.title, "labels": dict(reader.labels),
        "image_ids": reader.id_rule if fmap.path is None else f"{reader.id_rule}; features map {fmap.path}",
        "features_map": fmap.describe(), "src_line": "record index in the source",
        "skipped_rows": len(bad), "num_obj_classes": opts.num_obj_classes, "num_attr_classes": opts.num_attr_classes,
        "fixed_num_boxes": opts.fixed_boxes,
    }


def _log_converted(log, written: int, extra: dict, title: str, out_dir: str, dt: float, feat_dtype: str,
                   bad: BadRowLog) -> None:
    if not log:
        return
    total = extra["sources"][0]["bytes"]
    carried = [k for k, v in extra["labels"].items() if v]
    log(f"converted {written} images ({total / 1e6:.1f} MB of {title}) into {out_dir} in {dt:.1f} s "
        f"({total / 1e6 / max(dt, 1e-9):.1f} MB/s), features {feat_dtype}; labels: "
        f"{', '.join(carried) if carried else 'none (fine-tuning, and pre-training with --visual_losses feat)'}")
    if len(bad):
        log(bad.summary())
        log(f"every skipped record is listed in {os.path.join(out_dir, 'skipped_rows.tsv')}")


def _check_boxes(n: int, opts, path: str, key: str) -> None:
    if n == opts.num_boxes:
        return
    if not opts.fixed_boxes:
        raise DataFormatError(path, None, "num_boxes",
                              f"{n} boxes, but the store holds {opts.num_boxes} per image (the count of the first "
                              f"record, {opts.first_row}); pass --num-boxes K to pad images with fewer boxes", key)
    if n > opts.num_boxes:
        raise DataFormatError(path, None, "num_boxes", f"{n} boxes > --num-boxes {opts.num_boxes}", key)
