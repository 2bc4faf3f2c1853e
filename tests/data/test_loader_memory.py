"""Loader workers share the stores through the page cache: their RSS does not grow with them."""

from __future__ import annotations

import json
import os

import numpy as np
import psutil
import pytest
import torch

from lxmert_fast.data.pretrain_data import (PretrainDataset, build_pretrain_index,
                                            make_pretrain_loader)
from lxmert_fast.data.store import FeatureStore, RowWriter, finalize_store
from lxmert_fast.data.store_set import StoreSet

N_IMAGES = 1200          # 1200 x 36 x 2048 fp16 = 177 MB of features
MB = 1 << 20


def _write_store(d: str, first: int, n: int) -> list[str]:
    """A store of images ``big_<first>`` .. whose features all hold their global row."""
    os.makedirs(d)
    w = RowWriter.create(d, n, 36, 2048, "float16")
    bufs = w.buffers(100)
    rng = np.random.default_rng(first)
    for s in range(0, n, 100):
        bufs["features"][:] = np.arange(first + s, first + s + 100, dtype=np.float16)[:, None, None]
        bufs["boxes"][:] = np.sort(rng.random((100, 36, 4), np.float32), -1)
        bufs["obj_conf"][:] = 0.5
        bufs["img_h"][:], bufs["img_w"][:], bufs["num_boxes"][:] = 480, 640, 36
        w.write(s, bufs, 100)
    w.close()
    ids = [f"big_{i}" for i in range(first, first + n)]
    finalize_store(d, w, num_images=n, num_boxes=36, feat_dim=2048,
                   feat_dtype="float16", img_ids=ids, extra={}, checksum=False)
    return ids


@pytest.fixture(scope="module")
def big_store(tmp_path_factory, demo_root):
    """Two stores (two feature files) read as one set, much larger than a worker's expected growth,
    written directly (fast)."""
    root = tmp_path_factory.mktemp("big")
    half = N_IMAGES // 2
    ids = _write_store(str(root / "store-a"), 0, half) + _write_store(str(root / "store-b"), half, N_IMAGES - half)
    # one caption per image, in the original pre-training JSON format
    lx = root / "data" / "lxmert"
    lx.mkdir(parents=True)
    json.dump([{"img_id": i, "sentf": {"mscoco": ["a red dog"]}, "labelf": {}} for i in ids],
              open(lx / "mscoco_train.json", "w"))
    json.dump([{"ans": "red", "dsets": ["vqa"]}], open(lx / "all_ans.json", "w"))
    st = StoreSet([FeatureStore.open(str(root / "store-a")), FeatureStore.open(str(root / "store-b"))])
    idx = build_pretrain_index(str(root / "data"), "mscoco_train", st,
                               os.path.join(demo_root, "vocab.txt"), log=None)
    return st, idx


class RssDataset(PretrainDataset):
    """Adds the worker's RSS (bytes) after building each batch; optionally reads via memmap."""

    via_memmap = False

    def make_batch(self, items_b, rng, seed=0):
        b = super().make_batch(items_b, rng, seed)
        if self.via_memmap:  # control: what mapping the stores would do to the worker's RSS
            store_b, row_b = self.store.locate(np.sort(b["img_index"].numpy()))
            b["visual_feats"] = torch.from_numpy(np.concatenate(
                [np.asarray(s.features[row_b[store_b == i]]) for i, s in enumerate(self.store.stores)]))
        b["rss"] = torch.tensor([psutil.Process().memory_info().rss])
        b["pid"] = torch.tensor([os.getpid()])
        return b


def _worker_rss(st, idx, via_memmap: bool) -> list[int]:
    """RSS of the (single) loader worker after each batch of one epoch over the whole store."""
    ds = RssDataset(st, idx, task_matched=False)
    ds.via_memmap = via_memmap
    ld = make_pretrain_loader(ds, batch_size=50, num_workers=1, shuffle=True, drop_last=False,
                              prefetch_factor=2)
    rss, pids, seen = [], set(), set()
    for b in ld:
        rss.append(int(b["rss"][0]))
        pids.add(int(b["pid"][0]))
        seen.update(b["img_index"].tolist())
        if not via_memmap:  # global row i of the set holds the value i: the right rows came back
            assert torch.equal(b["visual_feats"][:, 0, 0].float(), b["img_index"].float())
    assert len(seen) == N_IMAGES and len(pids) == 1 and pids != {os.getpid()}
    return rss


def test_worker_rss_does_not_grow_with_store(big_store):
    st, idx = big_store
    store_mb = sum(s.manifest["files"]["features"]["bytes"] for s in st.stores) / MB
    rss = _worker_rss(st, idx, via_memmap=False)
    # the first batches warm up per-batch buffers (batch arrays, shared-memory IPC segments
    # of the batches in flight): a constant set by batch size x prefetch, not by the store
    warm = max(rss[:4])
    growth_mb = (max(rss) - warm) / MB
    # control: reading the same rows through a memory map puts the store into the worker's RSS
    ctl = _worker_rss(st, idx, via_memmap=True)
    extra_mb = (max(ctl) - max(rss)) / MB
    print(f"\nworker RSS after 4 batches {warm / MB:.0f} MB, then +{growth_mb:.1f} MB while "
          f"reading all of {store_mb:.0f} MB in two stores; a memmap reader ends {extra_mb:.0f} MB higher")
    assert growth_mb < 0.05 * store_mb
    assert extra_mb > 0.5 * store_mb  # the measurement is sensitive to mapped store pages
