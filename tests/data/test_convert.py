"""Conversion round trip, parallel determinism, crash safety and store integrity checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lxmert_fast.data.formats import normalise_boxes, read_tsv
from lxmert_fast.data.store import FeatureStore, StoreError
from lxmert_fast.data.tsv_convert import count_lines, convert_tsvs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def rows(pretrain_tsvs):
    out = []
    for path in pretrain_tsvs:
        out += read_tsv(path)
    return out


def _check_roundtrip(st: FeatureStore, rows, exact: bool):
    assert st.num_images == len(rows) and st.num_boxes == 36 and st.feat_dim == 2048
    assert list(st.img_ids) == [r.img_id for r in rows]
    all_rows = np.arange(len(rows))
    feats = st.read_features(all_rows)
    g = st.gather(all_rows)
    for i, r in enumerate(rows):
        f = feats[i].astype(np.float32)
        if exact:
            np.testing.assert_array_equal(f, r.feats_nd)
        else:  # fp16 rounding: relative 2^-11 (normal range), absolute 2^-25 (subnormals)
            err = np.abs(f - r.feats_nd)
            assert (err <= np.abs(r.feats_nd) * 2.0 ** -11 + 2.0 ** -24).all()
            np.testing.assert_array_equal(feats[i], r.feats_nd.astype(np.float16))
        np.testing.assert_array_equal(g["boxes"][i], normalise_boxes(r.boxes_n4, r.img_h, r.img_w))
        assert (g["boxes"][i] >= 0).all() and (g["boxes"][i] <= 1).all()
        np.testing.assert_array_equal(g["obj_ids"][i], r.obj_ids_n)
        np.testing.assert_array_equal(g["attr_ids"][i], r.attr_ids_n)
        np.testing.assert_array_equal(g["obj_conf"][i], r.obj_conf_n)
        np.testing.assert_array_equal(g["attr_conf"][i], r.attr_conf_n)
        assert (g["img_h"][i], g["img_w"][i]) == (r.img_h, r.img_w)
    # the memmap view agrees with the pread path
    np.testing.assert_array_equal(np.asarray(st.features[[3, 1, 2]]), st.read_features([3, 1, 2]))
    assert st.row_of(rows[5].img_id) == 5


def test_roundtrip_fp16(demo_store, rows):
    assert demo_store.feat_dtype == "float16"
    _check_roundtrip(demo_store, rows, exact=False)
    man = demo_store.manifest
    assert man["files"]["features"]["shape"] == [len(rows), 36, 2048]
    assert all(len(f["sha256"]) == 64 for f in man["files"].values())
    assert man["sources"][0]["lines"] + man["sources"][1]["lines"] + man["sources"][2]["lines"] \
        == len(rows)


def test_roundtrip_fp32_parallel_equals_sequential(pretrain_tsvs, rows, tmp_path, demo_store):
    out = str(tmp_path / "fp32")
    man = convert_tsvs(pretrain_tsvs, out, fp32=True, workers=2, seg_lines=7, progress=False,
                       log=None)
    st = FeatureStore.open(out, verify=True)
    assert st.feat_dtype == "float32"
    _check_roundtrip(st, rows, exact=True)
    # fp16, parallel with odd segment sizes: byte-identical to the sequential fixture store
    out16 = str(tmp_path / "fp16")
    man16 = convert_tsvs(pretrain_tsvs, out16, workers=2, seg_lines=5, progress=False, log=None)
    for name, f in man16["files"].items():
        assert f["sha256"] == demo_store.manifest["files"][name]["sha256"], name
    assert man["num_images"] == man16["num_images"]


def test_count_lines(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_bytes(b"a\nbb\n\nccc")  # 4 lines, the last without newline
    n, cps = count_lines(str(p), every=2, block=3)
    assert n == 4 and cps == [(1, 0), (3, 5)]
    p.write_bytes(b"a\nb\n")
    assert count_lines(str(p), every=1)[0] == 2
    p.write_bytes(b"")
    assert count_lines(str(p), every=1)[0] == 0


_INTERRUPTED_CLI = """
import os, sys
from lxmert_fast.data import convert

def crash(done):  # a hard crash after the first segment: no cleanup at all
    os._exit(17)

def interrupt(done):  # Ctrl-C after the first segment
    raise KeyboardInterrupt

sys.exit(convert.main(sys.argv[2:], on_segment={"crash": crash, "interrupt": interrupt}[sys.argv[1]]))
"""


@pytest.mark.parametrize("hook,rc", [("crash", 17), ("interrupt", 130)])
def test_interrupted_conversion_leaves_no_complete_store(pretrain_tsvs, tmp_path, hook, rc):
    """A hard crash (os._exit mid-conversion) and a Ctrl-C (KeyboardInterrupt) both leave
    nothing at --out that looks like a store; FeatureStore.open refuses the partial dir."""
    out = str(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_CLI, hook, *pretrain_tsvs, "--out", out, "--workers", "2",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert r.returncode == rc, r.stderr
    assert not os.path.exists(out)
    with pytest.raises(StoreError):
        FeatureStore.open(out)
    partial = [p for p in os.listdir(tmp_path) if p.startswith("store.partial-")]
    if hook.startswith("crash"):  # no chance to clean up: a partial dir without manifest
        assert len(partial) == 1
        pdir = os.path.join(tmp_path, partial[0])
        assert not os.path.exists(os.path.join(pdir, "manifest.json"))
        with pytest.raises(StoreError, match="incomplete"):
            FeatureStore.open(pdir)
    else:  # Ctrl-C: cleaned up
        assert partial == [] and "interrupted" in r.stderr
    # a later conversion succeeds, and removes what the crashed one left
    convert_tsvs(pretrain_tsvs, out, workers=2, progress=False, log=None)
    FeatureStore.open(out, verify=True)
    assert os.listdir(tmp_path) == ["store"]


def test_store_integrity_checks(demo_store, tmp_path):
    import shutil
    d = str(tmp_path / "copy")
    shutil.copytree(demo_store.path, d, ignore=shutil.ignore_patterns("sentences"))
    FeatureStore.open(d, verify=True)
    # flip one byte: verify() catches it
    with open(os.path.join(d, "boxes.npy"), "r+b") as f:
        f.seek(500)
        b = f.read(1)
        f.seek(500)
        f.write(bytes([b[0] ^ 0xFF]))
    st = FeatureStore.open(d)
    with pytest.raises(StoreError, match="sha256"):
        st.verify()
    # truncation: caught by open()
    with open(os.path.join(d, "features.npy"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(StoreError, match="size"):
        FeatureStore.open(d)
    # wrong version
    os.remove(os.path.join(d, "features.npy"))
    with pytest.raises(StoreError, match="missing"):
        FeatureStore.open(d)
    m = json.load(open(os.path.join(d, "manifest.json")))
    m["version"] = 999
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(StoreError, match="version"):
        FeatureStore.open(d)
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "nothing"))


def test_existing_output_needs_overwrite(pretrain_tsvs, tmp_path):
    out = str(tmp_path / "s")
    convert_tsvs(pretrain_tsvs[:1], out, workers=1, progress=False, log=None)
    with pytest.raises(FileExistsError):
        convert_tsvs(pretrain_tsvs[:1], out, workers=1, progress=False, log=None)
    man = convert_tsvs(pretrain_tsvs[1:2], out, workers=1, overwrite=True, progress=False,
                       log=None)
    assert FeatureStore.open(out).num_images == man["num_images"]
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_store_pickles_lazily(demo_store):
    import pickle
    st = pickle.loads(pickle.dumps(demo_store))
    assert st._maps == {} and st._fds == {}
    assert st.read_features([0]).shape == (1, 36, 2048)
    assert len(pickle.dumps(demo_store)) < 20000  # manifest only, no arrays


def test_conversion_memory_is_bounded(pretrain_tsvs, tmp_path):
    """Peak allocations of a conversion do not grow with the input (streaming, pwrite)."""
    import tracemalloc
    from .conftest import tsv_lines
    lines = tsv_lines(pretrain_tsvs[0])
    small = str(tmp_path / "small_obj36.tsv")
    with open(small, "wb") as f:  # 16 rows: already more than one read block
        for k in range(2):
            for ln in lines[:8]:
                f.write(f"copy{k}_".encode() + ln)
    big = str(tmp_path / "big_obj36.tsv")
    with open(big, "wb") as f:  # 10x more rows (unique ids)
        for k in range(20):
            for ln in lines[:8]:
                f.write(f"copy{k}_".encode() + ln)
    peaks = []
    for p in (small, big):
        tracemalloc.start()
        convert_tsvs([p], p + ".store", workers=1, seg_lines=64,
                     progress=False, log=None, checksum=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    big_mb = os.path.getsize(big) / 2 ** 20
    print(f"\npeak traced allocations: {peaks[0] / 2**20:.1f} MB for 16 rows, "
          f"{peaks[1] / 2**20:.1f} MB for 160 rows ({big_mb:.0f} MB of TSV)")
    assert peaks[1] < peaks[0] + 2 * 2 ** 20 and peaks[1] < 0.5 * big_mb * 2 ** 20
    assert FeatureStore.open(big + ".store").num_images == 160


def test_store_of_other_data_is_refused(demo_root, demo_store, pretrain_tsvs, pretrain_ds, tmp_path):
    """Stores are found again by name and content: one converted from other data (a re-generated world,
    another root with the same file names) must be refused, never read with the wrong images."""
    import shutil
    from lxmert_fast.data.pretrain_data import build_pretrain_dataset
    from .conftest import tsv_lines, write_lines
    root = pretrain_ds.store.root
    # the same data moved elsewhere: still these stores' data
    moved = str(tmp_path / "moved")
    shutil.copytree(demo_root, moved, ignore=shutil.ignore_patterns("lxmert_fast"))
    ds = build_pretrain_dataset(moved, store_dir=root, log=None)
    assert ds.store.paths == pretrain_ds.store.paths
    # the same file names, other content (one feature character changed: same size)
    tsv = os.path.join(moved, os.path.relpath(pretrain_tsvs[0], demo_root))
    lines = tsv_lines(tsv)
    first = bytearray(lines[0])
    at = first.rindex(b"\t") + 10          # inside the base64 features of the first row
    first[at] = ord("A") if first[at] != ord("A") else ord("B")
    lines[0] = bytes(first)
    write_lines(tsv, lines)
    assert os.path.getsize(tsv) == os.path.getsize(pretrain_tsvs[0])
    with pytest.raises(StoreError, match=r"store-train2014: this store was converted from .*train2014_obj36.tsv "
                                         r".*not from the content .*train2014_obj36.tsv has now"):
        build_pretrain_dataset(moved, store_dir=root, log=None)
    with pytest.raises(StoreError, match=r"another train2014_obj36.tsv .*content differs"):
        pretrain_ds.store.stores[0].check_sources([tsv])
    # a file the store was not converted from
    with pytest.raises(StoreError, match=r"does not include .*nlvr2"):
        demo_store.check_sources([os.path.join(demo_root, "nlvr2_imgfeat", "train_obj36.tsv")])
    # a store written before fingerprints were recorded: matched by path and size
    d = str(tmp_path / "old")
    shutil.copytree(demo_store.path, d, ignore=shutil.ignore_patterns("sentences"))
    m = json.load(open(os.path.join(d, "manifest.json")))
    for src in m["sources"]:
        del src["fingerprint"]
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    FeatureStore.open(d).check_sources(pretrain_tsvs)
    with pytest.raises(StoreError, match="content differs"):
        FeatureStore.open(d).check_sources([tsv])
