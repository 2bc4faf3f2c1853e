"""Data-pipeline measurements: conversion MB/s, loader samples/s, masking samples/s.

    python bench/bench_data.py [--images 2000] [--workers 2] [--batch 256] [--batches 40] [--device cpu]
                               [--json OUT]

Generates (or reuses) a demo world, converts its pre-training TSVs (one store each, under one
store root, as the jobs keep them), then times the loader and the batch masking. bench/run.py's
data part runs the same functions (bench/_parts.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import append_row, environment  # noqa: E402

PRETRAIN_SPLITS = "mscoco_train,mscoco_nominival,vgnococo"


def bench_convert(tsvs: list[str], out: str, *, workers: int | None = None,
                  fp32: bool = False) -> dict:
    """Convert each of ``tsvs`` into its own store under the store root ``out`` (replacing any
    there), as the jobs keep them; MB/s of TSV input, checksums included."""
    from lxmert_fast.data.convert import convert_tsvs
    from lxmert_fast.data.store_root import store_dir_for
    size = sum(os.path.getsize(p) for p in tsvs)
    t0 = time.perf_counter()
    images, dtype = 0, None
    for p in tsvs:
        man = convert_tsvs([p], store_dir_for(p, out, fp32), workers=workers, fp32=fp32, overwrite=True,
                           progress=False, log=None)
        images, dtype = images + man["num_images"], man["feat_dtype"]
    dt = time.perf_counter() - t0
    return {"what": "convert", "tsv_mb": size / 1e6, "seconds": dt, "mb_per_s": size / 1e6 / dt,
            "images": images, "files": len(tsvs), "workers": workers or os.cpu_count(),
            "feat_dtype": dtype}


def bench_loader(dataset, *, batch_size: int = 256, num_workers: int = 2, batches: int = 40,
                 warmup: int = 3) -> dict:
    """Raw (unmasked) batches per second through :func:`make_pretrain_loader`."""
    from lxmert_fast.data.pretrain_data import make_pretrain_loader
    ld = make_pretrain_loader(dataset, batch_size, num_workers=num_workers, seed=0)
    n = t0 = 0
    done = 0
    epoch = 0
    while done < warmup + batches:
        ld.set_epoch(epoch)
        for b in ld:
            done += 1
            if done == warmup:
                t0, n = time.perf_counter(), 0
            elif done > warmup:
                n += b["input_ids"].shape[0]
            if done >= warmup + batches:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    return {"what": "loader", "batch": batch_size, "workers": num_workers, "samples": n,
            "seconds": dt, "samples_per_s": n / dt}


def bench_masking(dataset, *, batch_size: int = 256, device: str = "cpu", iters: int = 20) -> dict:
    """Samples/s of :func:`mask_pretrain_batch` on a raw batch already on ``device``."""
    import numpy as np
    import torch
    from lxmert_fast.data.masking import mask_pretrain_batch
    raw = dataset.make_batch(np.arange(batch_size) % len(dataset), np.random.default_rng(0))
    raw = {k: v.to(device) for k, v in raw.items()}
    cfg = dataset.masking_config
    g = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        mask_pretrain_batch(raw, cfg, g)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        mask_pretrain_batch(raw, cfg, g)
    sync()
    dt = time.perf_counter() - t0
    return {"what": "masking", "device": device, "batch": batch_size,
            "samples_per_s": batch_size * iters / dt}


def measure(root: str, store: str, *, workers: int, batch: int, batches: int, warmup: int = 3,
            masking=(("cpu", 20),)) -> list[dict]:
    """The data rows of the world at ``root``: its pre-training TSVs converted into stores under
    ``store``, the loader over them, and the masking on each ``(device, iterations)`` of ``masking``."""
    from lxmert_fast.data.pretrain_data import build_pretrain_dataset, feature_files_for

    tsvs = feature_files_for(root, PRETRAIN_SPLITS)
    rows = [bench_convert(tsvs, store, workers=workers)]
    ds = build_pretrain_dataset(root, store_dir=store, log=None)
    rows.append(bench_loader(ds, batch_size=batch, num_workers=workers, batches=batches, warmup=warmup))
    for device, iters in masking:
        rows.append(bench_masking(ds, batch_size=batch, device=device, iters=iters))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2, help="converter and loader workers")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lxmert_fast_demo"))
    p.add_argument("--json", default=None,
                   help="append one JSON row per measurement here (with hardware, versions and commit)")
    a = p.parse_args(argv)
    from lxmert_fast.data.demo import ensure_demo_data

    root = ensure_demo_data(a.cache, images=a.images)
    store = os.path.join(root, "bench_store")
    rows = measure(root, store, workers=a.workers, batch=a.batch, batches=a.batches, masking=((a.device, 20),))
    shutil.rmtree(os.path.join(store, "sentences"), ignore_errors=True)
    if a.json:
        env = environment()
        for r in rows:
            append_row(a.json, {**env, "part": "data", **r})
    print(f"{'what':10s} {'figure':>14s}  details")
    for r in rows:
        fig = (f"{r['mb_per_s']:.1f} MB/s" if "mb_per_s" in r else f"{r['samples_per_s']:.0f} smp/s")
        rest = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                if k not in ("what", "mb_per_s", "samples_per_s")}
        print(f"{r['what']:10s} {fig:>14s}  {rest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
