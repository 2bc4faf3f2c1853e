"""Conversion speed of each feature layout against the TSV reader's, on the same records, in one run.

    python bench/feature_layouts.py [--images 256] [--repeats 3] [--json rows.jsonl]

Builds ``--images`` synthetic records (36 boxes, 2048-d ReLU-like features: about half zeros, as
detector features are; labels, boxes, image sizes), writes them as the original TSV and as every
other layout the way its tool writes them (tests/data/layout_writers.py), then converts each into
a feature store (float16, checksums on, as the jobs do), ``--repeats`` rounds over all layouts in
turn, and reports each one's median: MB/s of the source's bytes on disk, images/s, and the ratio of images/s to the TSV
converter's in one process (``workers=1``; the TSV's parallel default is reported beside it).
Writing the sources is not timed. Needs h5py and lmdb (``pip install -e ".[formats]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from lxmert_fast.data.convert import convert_tsvs  # noqa: E402
from lxmert_fast.data.formats import ObjRow, write_tsv_row  # noqa: E402
from lxmert_fast.data.layouts import source_bytes  # noqa: E402
from lxmert_fast.data.layouts.convert import convert_source  # noqa: E402
from tests.data import layout_writers as W  # noqa: E402


def make_records(n: int, boxes: int = 36, dim: int = 2048, seed: int = 0) -> list[ObjRow]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        x1 = rng.uniform(0, w / 2, boxes).astype(np.float32)
        y1 = rng.uniform(0, h / 2, boxes).astype(np.float32)
        x2 = (x1 + rng.uniform(1, w / 2, boxes)).astype(np.float32)
        y2 = (y1 + rng.uniform(1, h / 2, boxes)).astype(np.float32)
        feats = np.maximum(rng.standard_normal((boxes, dim), np.float32), 0) * np.float32(2.0)
        out.append(ObjRow(f"COCO_train2014_{i + 1:012d}", h, w, boxes, rng.integers(0, 1600, boxes),
                          rng.uniform(0, 1, boxes).astype(np.float32), rng.integers(0, 400, boxes),
                          rng.uniform(0, 1, boxes).astype(np.float32), np.stack([x1, y1, x2, y2], 1), feats))
    return out


def write_sources(folder: str, rows) -> dict[str, tuple[str, str]]:
    """case -> (layout, path)."""
    tsv = os.path.join(folder, "train2014_obj36.tsv")
    with open(tsv, "wb") as f:
        for r in rows:
            write_tsv_row(f, r.img_id, r.img_h, r.img_w, r.obj_ids_n, r.obj_conf_n, r.attr_ids_n, r.attr_conf_n,
                          r.boxes_n4, r.feats_nd)
    return {
        "tsv (1 process)": ("tsv", tsv),
        "tsv (default workers)": ("tsv", tsv),
        "bua_npz": ("bua_npz", W.write_bua_npz(os.path.join(folder, "npz"), rows)),
        "vlt5_h5": ("vlt5_h5", W.write_vlt5_h5(os.path.join(folder, "train2014_obj36.h5"), rows)),
        "butd_h5": ("butd_h5", W.write_butd_h5(os.path.join(folder, "train36.hdf5"), rows)),
        "butd_h5 (ban-vqa adaptive)": ("butd_h5", W.write_butd_h5(os.path.join(folder, "train.hdf5"), rows,
                                                                  adaptive=True)),
        "mmf_npy": ("mmf_npy", W.write_mmf_npy(os.path.join(folder, "mmf"), rows)),
        "mmf_lmdb": ("mmf_lmdb", W.write_mmf_lmdb(os.path.join(folder, "mmf.lmdb"), rows)),
    }


def warm_page_cache(path: str) -> None:
    """Read a source once before timing, so every case starts from the page cache alike."""
    if os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    else:
        files = [path]
    for fp in files:
        with open(fp, "rb") as fh:
            while fh.read(8 << 20):
                pass


def time_once(case: str, layout: str, path: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if layout == "tsv":
        convert_tsvs([path], out, workers=1 if "1 process" in case else None, progress=False, log=None)
    else:
        convert_source(path, out, layout=layout, progress=False, log=None)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return dt


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import h5py
    import lmdb
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "h5py": h5py.__version__, "lmdb": lmdb.__version__, "commit": commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", default=None, help="append one JSON row per layout to this file")
    args = p.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="feature-layouts-")
    os.makedirs(work, exist_ok=True)
    env = environment()
    try:
        rows = make_records(args.images)
        os.makedirs(os.path.join(work, "src"), exist_ok=True)
        sources = write_sources(os.path.join(work, "src"), rows)
        for layout, path in sources.values():
            warm_page_cache(path)
        # round robin: repeat r of every case before repeat r + 1 of any, so that a change of the
        # machine's load during the run falls on every case alike
        times: dict[str, list[float]] = {case: [] for case in sources}
        for _ in range(args.repeats):
            for case, (layout, path) in sources.items():
                times[case].append(time_once(case, layout, path, os.path.join(work, "store")))
        results = []
        for case, (layout, path) in sources.items():
            sec = statistics.median(times[case])
            nbytes = source_bytes(path, layout)
            results.append({"bench": "feature_layouts", "case": case, "layout": layout, "images": args.images,
                            "source_mb": nbytes / 1e6, "seconds": sec, "mb_per_s": nbytes / 1e6 / sec,
                            "images_per_s": args.images / sec, "repeats": args.repeats, **env})
        base = next(r for r in results if r["case"] == "tsv (1 process)")["images_per_s"]
        for r in results:
            r["images_per_s_vs_tsv_1_process"] = r["images_per_s"] / base
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                for r in results:
                    fh.write(json.dumps(r) + "\n")
        print(f"{args.images} images x 36 boxes x 2048, float16 store, median of {args.repeats}; "
              f"{env['cpu']} ({env['cores']} cores), numpy {env['numpy']}, h5py {env['h5py']}, commit {env['commit']}")
        print(f"{'layout':<28} {'source MB':>10} {'MB/s':>8} {'images/s':>9} {'vs TSV (1 proc)':>16}")
        for r in results:
            print(f"{r['case']:<28} {r['source_mb']:>10.1f} {r['mb_per_s']:>8.1f} {r['images_per_s']:>9.0f} "
                  f"{r['images_per_s_vs_tsv_1_process']:>15.2f}x")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
