"""The data pipeline: TSV -> store conversion (MB/s of TSV), the loader (raw samples/s with its workers)
and the batch masking (samples/s on the training device), on the demo world."""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import synchronize

PRETRAIN_SPLITS = "mscoco_train,mscoco_nominival,vgnococo"


def convert(root: str, store: Path, workers: int) -> dict:
    """Each pre-training TSV into its own store under ``store``, replacing any there, as the jobs keep them."""
    from lxmert_fast.data.convert import convert_tsvs
    from lxmert_fast.data.pretrain_data import feature_files_for
    from lxmert_fast.data.store_root import store_dir_for

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


def loader(dataset, batch: int, workers: int, batches: int) -> dict:
    """Raw (unmasked) samples/s through the training loader, after 3 batches of warm-up."""
    from lxmert_fast.data.pretrain_data import make_pretrain_loader

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
    from lxmert_fast.data.masking import mask_pretrain_batch

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


def run(world: Path, images: int, batch: int, workers: int, batches: int) -> list[dict]:
    from lxmert_fast.data.demo import ensure_demo_data
    from lxmert_fast.data.pretrain_data import build_pretrain_dataset

    root = ensure_demo_data(str(world / "demo"), images=images, seed=0, log=None)
    store = world / f"data_part_store-n{images}"
    rows = [convert(root, store, workers)]
    dataset = build_pretrain_dataset(root, store_dir=str(store), log=None)
    rows.append(loader(dataset, batch, workers, batches))
    rows.append(masking(dataset, batch, "cuda" if torch.cuda.is_available() else "cpu", 20))
    return [dict(r, part="data", key=f"data:{r['what']}", status="ok") for r in rows]
