"""The data pipeline on the demo world: TSV -> store conversion (MB/s of TSV), the conversion of every other
feature layout against the TSV reader's on the same records (interleaved rounds), the loader (raw samples/s
with its workers) and the batch masking (samples/s on the training device)."""
from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import median, synchronize, time_calls
from lxmert_fast.data.tsv_convert import convert_tsvs
from lxmert_fast.data.demo import ensure_demo_data
from lxmert_fast.data.formats import read_tsv, write_tsv_row
from lxmert_fast.data.layouts import source_bytes, writers
from lxmert_fast.data.layouts.convert import convert_source
from lxmert_fast.data.masking import mask_pretrain_batch
from lxmert_fast.data.pretrain_data import build_pretrain_dataset, feature_files_for, make_pretrain_loader
from lxmert_fast.data.store_root import store_dir_for

PRETRAIN_SPLITS = "mscoco_train,mscoco_nominival,vgnococo"


def convert(root: str, store: Path, workers: int) -> dict:
    """Each pre-training TSV into its own store under ``store``, replacing any there, as the jobs keep them."""
    tsvs = feature_files_for(root, PRETRAIN_SPLITS)
    size = sum(os.path.getsize(p) for p in tsvs)
    t0 = time.perf_counter()
    images = 0
    for path in tsvs:
        manifest = convert_tsvs([path], store_dir_for(path, str(store), False), workers=workers, overwrite=True,
                                progress=False, log=None)
        images += manifest["num_images"]
    seconds = time.perf_counter() - t0
    return {"what": "convert", "mb_per_s": size / 1e6 / seconds, "tsv_mb": size / 1e6, "images": images,
            "workers": workers}


def layouts(tsv: str, work: Path, images: int, rounds: int) -> list[dict]:
    """The first ``images`` records of ``tsv`` written in every layout as its tool writes it, then each
    converted into a store (float16, checksums) in interleaved rounds; images/s over the TSV reader's in one
    process. Writing is not timed; the sources are read once before, so each starts from the page cache."""
    missing = [m for m in ("h5py", "lmdb") if importlib.util.find_spec(m) is None]
    if missing:
        return [{"what": "layouts", "status": f"no figure (unavailable): {', '.join(missing)} not installed "
                                               f"(pip install -e \".[formats]\")"}]
    rows = read_tsv(tsv)[:images]
    src = work / "layout_sources"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with open(src / "train2014_obj36.tsv", "wb") as fh:
        for r in rows:
            write_tsv_row(fh, r.img_id, r.img_h, r.img_w, r.obj_ids_n, r.obj_conf_n, r.attr_ids_n, r.attr_conf_n,
                          r.boxes_n4, r.feats_nd)
    sources = {"tsv": ("tsv", str(src / "train2014_obj36.tsv")),
               "bua_npz": ("bua_npz", writers.write_bua_npz(str(src / "npz"), rows)),
               "vlt5_h5": ("vlt5_h5", writers.write_vlt5_h5(str(src / "train2014_obj36.h5"), rows)),
               "butd_h5": ("butd_h5", writers.write_butd_h5(str(src / "train36.hdf5"), rows)),
               "butd_h5 (ban-vqa adaptive)": ("butd_h5", writers.write_butd_h5(str(src / "train.hdf5"), rows,
                                                                                adaptive=True)),
               "mmf_npy": ("mmf_npy", writers.write_mmf_npy(str(src / "mmf"), rows)),
               "mmf_lmdb": ("mmf_lmdb", writers.write_mmf_lmdb(str(src / "mmf.lmdb"), rows))}
    for _, path in sources.values():
        for root, _, names in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [path])]:
            for name in names:
                Path(root, name).read_bytes()

    def converter(layout: str, path: str):
        def run():
            out = str(work / "layout_store")
            shutil.rmtree(out, ignore_errors=True)
            if layout == "tsv":
                convert_tsvs([path], out, workers=1, progress=False, log=None)
            else:
                convert_source(path, out, layout=layout, progress=False, log=None)
        return run

    times = time_calls({case: converter(*source) for case, source in sources.items()}, rounds, warmup=0)
    tsv_rate = len(rows) / median(times["tsv"])
    out = []
    for case, (layout, path) in sources.items():
        seconds = median(times[case])
        out.append({"what": f"convert {case}", "layout": layout, "images": len(rows),
                    "mb_per_s": source_bytes(path, layout) / 1e6 / seconds, "images_per_s": len(rows) / seconds,
                    "x_tsv": len(rows) / seconds / tsv_rate, "rounds": rounds})
    shutil.rmtree(src, ignore_errors=True)
    return out


def loader(dataset, batch: int, workers: int, batches: int) -> dict:
    """Raw (unmasked) samples/s through the training loader, after 3 batches of warm-up."""
    ld = make_pretrain_loader(dataset, batch, num_workers=workers, seed=0)

    def epochs():
        for epoch in itertools.count():
            ld.set_epoch(epoch)
            yield from ld

    stream = epochs()
    for _ in range(3):
        next(stream)
    t0 = time.perf_counter()
    samples = sum(next(stream)["input_ids"].shape[0] for _ in range(batches))
    return {"what": "loader", "samples_per_s": samples / (time.perf_counter() - t0), "batch": batch,
            "workers": workers}


def masking(dataset, batch: int, device: str, iters: int) -> dict:
    """Samples/s of the recipe's batch masking on a raw batch already on ``device``."""
    raw = dataset.make_batch(np.arange(batch) % len(dataset), np.random.default_rng(0))
    raw = {k: v.to(device) for k, v in raw.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        mask_pretrain_batch(raw, dataset.masking_config, gen)
    synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        mask_pretrain_batch(raw, dataset.masking_config, gen)
    synchronize()
    return {"what": "masking", "samples_per_s": batch * iters / (time.perf_counter() - t0), "batch": batch,
            "device": device}


def run(world: Path, small: bool, cuda: bool) -> list[dict]:
    """The part's rows: tiny sizes when ``small`` (--quick, --dry); the GPU plan's loader with 4 workers over
    200 images (it shares the machine with the end-to-end workers), the CPU run's with 2 over 2000."""
    images, batch, workers, batches = (64, 16, 1, 5) if small else (200, 256, 4, 20) if cuda else (2000, 256, 2, 40)
    root = ensure_demo_data(str(world / "demo"), images=images, seed=0, log=None)
    store = world / f"data_part_store-n{images}"
    rows = [convert(root, store, workers)]
    rows += layouts(feature_files_for(root, "mscoco_train")[0], world, min(images, 256), 3)
    dataset = build_pretrain_dataset(root, store_dir=str(store), log=None)
    rows.append(loader(dataset, batch, workers, batches))
    rows.append(masking(dataset, batch, "cuda" if torch.cuda.is_available() else "cpu", 20))
    return [dict({"status": "ok"}, **r, part="data", key=f"data:{r['what']}") for r in rows]
