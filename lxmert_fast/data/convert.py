"""The command line that converts feature files into memory-mapped feature stores: ``*_obj36.tsv`` files
(:mod:`lxmert_fast.data.tsv_convert`, several processes) or feature sources of the other layouts (see
:mod:`lxmert_fast.data.layouts` and docs/data.md; :mod:`lxmert_fast.data.layouts.convert`), into one store
(``--out``) or one store per file under a store root (``--store-root``, :mod:`lxmert_fast.data.store_root`).

Usage::

    python -m lxmert_fast.data.convert data/mscoco_imgfeat/train2014_obj36.tsv \\
        data/mscoco_imgfeat/val2014_obj36.tsv data/vg_gqa_imgfeat/vg_gqa_obj36.tsv \\
        --out data/store [--fp32] [--skip-bad] [--workers 8] [--num-boxes 36]

    # one store per file under a store root, as pre-training and fine-tuning keep them
    # (files already converted there, found by their content fingerprint, are left as they are)
    python -m lxmert_fast.data.convert data/mscoco_imgfeat/*_obj36.tsv --store-root data/lxmert_fast

    # another layout, detected from the files (or named with --features-format)
    python -m lxmert_fast.data.convert data/butd/train36.hdf5 --store-root data/lxmert_fast
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .formats import DEFAULT_FEAT_DIM, DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES, DataFormatError
from .layouts import FeaturesMap, resolve_layout
from .layouts.convert import convert_source
from .store import StoreError
from .store_root import ensure_store
from .tsv_convert import convert_tsvs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lxmert_fast.data.convert",
        description="Convert LXMERT *_obj36.tsv feature files (img_id, img_h, img_w, objects_id, "
                    "objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features) into one "
                    "memory-mapped feature store shared by all data-loader workers. Rows are "
                    "validated strictly; the first bad row stops the conversion with an error "
                    "naming its file, line and field (exit code 2) unless --skip-bad.",
        epilog="Example: python -m lxmert_fast.data.convert data/mscoco_imgfeat/*_obj36.tsv "
               "data/vg_gqa_imgfeat/vg_gqa_obj36.tsv --out data/store")
    p.add_argument("tsv", nargs="+", help="input *_obj36.tsv files, or feature sources of another layout (a folder "
                   "of .npz or .npy files, an HDF5 file, an LMDB: see docs/data.md)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="store directory to create (every input file goes into this one store)")
    where.add_argument("--store-root", help="store root (as the jobs use: default <data_root>/lxmert_fast): each "
                       "input file gets its own store there, store-<name>; a file whose content is already "
                       "converted there is not converted again")
    p.add_argument("--fp32", action="store_true", help="store features as float32 "
                   "(default float16: half the size, within fp16 rounding)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of failing; "
                   "they are counted, reported at the end and listed in skipped_rows.tsv")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: number of CPUs)")
    p.add_argument("--num-boxes", type=int, default=None, help="fixed boxes per image; images "
                   "with fewer are zero-padded (default: the count of the first row, and every "
                   "row must match it)")
    p.add_argument("--feat-dim", type=int, default=DEFAULT_FEAT_DIM,
                   help=f"feature dimension (default {DEFAULT_FEAT_DIM})")
    p.add_argument("--num-obj-classes", type=int, default=DEFAULT_NUM_OBJ_CLASSES,
                   help="object ids must be below this (default 1600)")
    p.add_argument("--num-attr-classes", type=int, default=DEFAULT_NUM_ATTR_CLASSES,
                   help="attribute ids must be below this (default 400)")
    p.add_argument("--features-format", "--features_format", default="auto",
                   help="the inputs' layout: auto (detected from the files), tsv, bua_npz (bottom-up-attention.pytorch), "
                        "vlt5_h5 (VL-T5), butd_h5 (bottom-up-attention-vqa / ban-vqa), mmf_npy (MMF / ViLBERT), "
                        "mmf_lmdb (MMF's LMDB)")
    p.add_argument("--features-map", "--features_map", default=None,
                   help="JSON file mapping the image ids of a non-TSV layout to the text files' ids "
                        "({\"format\": ..., \"ids\": {...}, \"image_sizes\": {...}}; docs/data.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-checksum", action="store_true", help="skip the sha256 of the outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None, on_segment: Callable[[int], None] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(num_boxes=args.num_boxes, feat_dim=args.feat_dim, num_obj_classes=args.num_obj_classes,
                   num_attr_classes=args.num_attr_classes, checksum=not args.no_checksum)
    try:
        if args.store_root is not None:
            if args.overwrite:
                raise ValueError("--overwrite goes with --out; under --store-root delete a store to convert it again")
            for tsv in args.tsv:
                st = ensure_store(tsv, args.store_root, fp32=args.fp32, skip_bad=args.skip_bad,
                                  workers=args.workers, convert_options=options,
                                  features_format=args.features_format, features_map=args.features_map,
                                  log=print if not args.no_progress else None)
                print(f"{tsv} -> {st.path} ({st.num_images} images, {st.layout})")
            return 0
        layouts = [resolve_layout(p, args.features_format) for p in args.tsv]
        if set(layouts) == {"tsv"} and args.features_map is None:
            convert_tsvs(args.tsv, args.out, fp32=args.fp32, skip_bad=args.skip_bad,
                         workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress,
                         on_segment=on_segment, **options)
        elif len(args.tsv) == 1:
            convert_source(args.tsv[0], args.out, layout=layouts[0], features_map=FeaturesMap.load(args.features_map),
                           fp32=args.fp32, skip_bad=args.skip_bad, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.no_progress, **options)
        else:
            raise ValueError("--out takes several inputs only when all are TSV files; give one source of another "
                             "layout at a time, or use --store-root (one store per source)")
    except DataFormatError as e:
        print(f"error: {e}\n(no store written; use --skip-bad to skip and report bad rows)",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no store written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
