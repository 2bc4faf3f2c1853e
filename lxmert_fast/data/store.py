"""Memory-mapped feature store: one conversion of the ``*_obj36.tsv`` files (or of a feature
source of another layout, :mod:`lxmert_fast.data.layouts`), shared by workers.

Layout of a store directory (every array is a ``.npy`` file, row i = image i)::

    features.npy   (N, K, D) float16 (default) or float32
    boxes.npy      (N, K, 4) float32, x1 y1 x2 y2 normalised to [0, 1] by img_w / img_h
    obj_ids.npy    (N, K) int32      obj_conf.npy  (N, K) float32
    attr_ids.npy   (N, K) int32      attr_conf.npy (N, K) float32
    img_h.npy, img_w.npy, num_boxes.npy  (N,) int32   (num_boxes < K only with --num-boxes)
    src_file.npy   (N,) int16, src_line.npy (N,) int64: where each row came from (the other
                   layouts: src_line is the record's index in its source)
    img_ids.npy    (N,) fixed-width unicode
    skipped_rows.tsv (only with --skip-bad and skipped rows)
    manifest.json  written last: format, version, shapes, dtypes, counts, sha256 of every file

A store is complete only if ``manifest.json`` exists and says so; the converter writes into a
temporary sibling directory and renames it into place at the very end.

Reading: :meth:`FeatureStore.open` is lazy (no array is touched until used) and picklable, so
DataLoader workers open their own file handles after fork/spawn. :meth:`FeatureStore.gather`
reads feature rows with ``os.preadv`` into fresh buffers: the bytes come from the shared page
cache and are never mapped into the worker, so a worker's RSS does not grow with the amount of
data it has read. The small per-object arrays (about 1% of the bytes) are read through
read-only memory maps.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

import numpy as np

STORE_FORMAT = "lxmert-fast-feature-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """A missing, incomplete, incompatible or corrupted store."""


def array_specs(num_boxes: int, feat_dim: int, feat_dtype: str) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, per-row shape) for the row arrays of a store."""
    k = num_boxes
    return {
        "features": (feat_dtype, (k, feat_dim)),
        "boxes": ("float32", (k, 4)),
        "obj_ids": ("int32", (k,)),
        "obj_conf": ("float32", (k,)),
        "attr_ids": ("int32", (k,)),
        "attr_conf": ("float32", (k,)),
        "img_h": ("int32", ()),
        "img_w": ("int32", ()),
        "num_boxes": ("int32", ()),
        "src_file": ("int16", ()),
        "src_line": ("int64", ()),
    }


ROW_ARRAYS = tuple(array_specs(1, 1, "float16"))


def npy_data_offset(path: str) -> int:
    """Byte offset of the data in a ``.npy`` file."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            fmt.read_array_header_2_0(f)
        else:
            raise StoreError(f"{path}: unsupported .npy version {version}")
        return f.tell()


def create_npy(path: str, dtype: str, shape: tuple) -> int:
    """Create a (sparse) ``.npy`` file of the given shape; returns its data offset."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    del mm
    return npy_data_offset(path)


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def sha256_files(paths: Iterable[str], threads: int = 4) -> list[str]:
    """sha256 of several files in parallel threads (hashlib releases the GIL)."""
    paths = list(paths)
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as ex:
        return list(ex.map(sha256_file, paths))


def source_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """Content fingerprint of a source file: sha256 of its size, first and last ``chunk`` bytes.

    Cheap (2 MiB read) and independent of the path and mtime, so a store still matches its data
    after the data folder is moved or copied, and no longer matches a re-generated or replaced
    file (whose feature rows differ from the first line on).

    A directory (a layout of one file per image): sha256 of every file's relative name and size,
    in name order, and the fingerprints of the first and the last file.
    """
    if os.path.isdir(path):
        files = list_files(path)
        h = hashlib.sha256(b"dir")
        for rel in files:
            h.update(f"{rel}\0{os.path.getsize(os.path.join(path, rel))}\n".encode())
        for rel in files[:1] + files[-1:]:
            h.update(source_fingerprint(os.path.join(path, rel), chunk).encode())
        return h.hexdigest()
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def list_files(directory: str) -> list[str]:
    """Every file under ``directory`` (relative paths with '/', sorted; hidden files left out)."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, directory)
        for name in files:
            if not name.startswith("."):
                out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(out)


def source_size(path: str) -> int:
    """Bytes of a source: a file's size, or the sum over the files of a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, rel)) for rel in list_files(path))
    return os.path.getsize(path)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RowWriter:
    """Positional writes of row blocks into the preallocated ``.npy`` files of a store.

    Picklable description (``layout``) so that worker processes can write their own regions.
    """

    def __init__(self, layout: dict):
        self.layout = layout  # name -> {"path", "offset", "dtype", "row_shape"}
        self._fds: dict[str, int] = {}

    @staticmethod
    def create(directory: str, num_rows: int, num_boxes: int, feat_dim: int,
               feat_dtype: str) -> "RowWriter":
        layout = {}
        for name, (dtype, row_shape) in array_specs(num_boxes, feat_dim, feat_dtype).items():
            path = os.path.join(directory, f"{name}.npy")
            off = create_npy(path, dtype, (num_rows,) + row_shape)
            layout[name] = {"path": path, "offset": off, "dtype": dtype, "row_shape": row_shape}
        return RowWriter(layout)

    def row_bytes(self, name: str) -> int:
        spec = self.layout[name]
        return int(np.dtype(spec["dtype"]).itemsize * np.prod(spec["row_shape"], dtype=np.int64))

    def buffers(self, rows: int) -> dict[str, np.ndarray]:
        """Zeroed staging buffers for ``rows`` consecutive rows."""
        return {n: np.zeros((rows,) + tuple(s["row_shape"]), s["dtype"])
                for n, s in self.layout.items()}

    def write(self, row0: int, bufs: dict[str, np.ndarray], count: int) -> None:
        """Write rows ``[row0, row0 + count)`` from the first ``count`` rows of ``bufs``."""
        for name, spec in self.layout.items():
            fd = self._fds.get(name)
            if fd is None:
                fd = self._fds[name] = os.open(spec["path"], os.O_WRONLY)
            data = memoryview(np.ascontiguousarray(bufs[name][:count])).cast("B")
            pos = spec["offset"] + row0 * self.row_bytes(name)
            while len(data):
                n = os.pwrite(fd, data, pos)
                data, pos = data[n:], pos + n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        return {"layout": self.layout}

    def __setstate__(self, state):
        self.__init__(state["layout"])


def _preadv_rows(fd: int, offset: int, row_bytes: int, rows_b: np.ndarray,
                 out_b: np.ndarray, dest_b: np.ndarray | None = None) -> None:
    """``out_b[dest_b[i]] = row rows_b[i]`` of a file of fixed-size rows, via positional reads
    (``dest_b`` defaults to ``0 .. len(rows_b) - 1``).

    Runs of rows consecutive in the file and in ``out_b`` are read with one call each, so a
    caller scattering the rows of several files into one batch buffer needs no extra copy.
    """
    rows_b = np.asarray(rows_b, np.int64)
    if not out_b.flags.c_contiguous:
        raise ValueError("output buffer must be C-contiguous")
    flat = memoryview(out_b.reshape(-1)).cast("B")
    n = len(rows_b)
    if n == 0:
        return
    dest_b = np.arange(n, dtype=np.int64) if dest_b is None else np.asarray(dest_b, np.int64)
    if dest_b.shape != rows_b.shape:
        raise ValueError(f"dest_b has shape {dest_b.shape}, rows_b {rows_b.shape}")
    breaks = np.flatnonzero((np.diff(rows_b) != 1) | (np.diff(dest_b) != 1)) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [n]]).tolist()
    for s, e in zip(starts, ends):
        d0 = int(dest_b[s])
        view = flat[d0 * row_bytes:(d0 + e - s) * row_bytes]
        pos = offset + int(rows_b[s]) * row_bytes
        while len(view):
            got = os.preadv(fd, [view], pos)
            if got <= 0:
                raise StoreError(f"short read at byte {pos} (truncated store file?)")
            view, pos = view[got:], pos + got


class FeatureStore:
    """Read side of a converted store. Open with :meth:`open`; cheap to pickle into workers."""

    def __init__(self, path: str, manifest: dict):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self.num_images: int = manifest["num_images"]
        self.num_boxes: int = manifest["num_boxes"]
        self.feat_dim: int = manifest["feat_dim"]
        self.feat_dtype: str = manifest["feat_dtype"]
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._maps: dict[str, np.ndarray] = {}
        self._fds: dict[str, int] = {}
        self._index: dict[str, int] | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, verify: bool = False) -> "FeatureStore":
        """Open a complete store (lazy: reads only the manifest and file sizes).

        Raises :class:`StoreError` if the directory is missing, incomplete (an interrupted
        conversion), of another format version, or if a file has the wrong size;
        ``verify=True`` also recomputes every sha256.
        """
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise StoreError(f"{path}: no feature store here (convert TSV files with "
                             f"`python -m lxmert_fast.data.convert`)")
        if not os.path.exists(mpath):
            raise StoreError(f"{path}: incomplete feature store (no {MANIFEST}; an interrupted "
                             f"conversion?) - convert again")
        with open(mpath, "r", encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != STORE_FORMAT or not manifest.get("complete"):
            raise StoreError(f"{mpath}: not a complete {STORE_FORMAT}")
        if manifest.get("version") != STORE_VERSION:
            raise StoreError(f"{mpath}: store version {manifest.get('version')}, this code reads "
                             f"version {STORE_VERSION}; convert again")
        for name, spec in manifest["files"].items():
            fp = os.path.join(path, spec["file"])
            if not os.path.exists(fp):
                raise StoreError(f"{path}: file {spec['file']} listed in the manifest is missing")
            if os.path.getsize(fp) != spec["bytes"]:
                raise StoreError(f"{fp}: size {os.path.getsize(fp)} != {spec['bytes']} in the "
                                 f"manifest (truncated or modified)")
        store = cls(path, manifest)
        if verify:
            store.verify()
        return store

    @property
    def sources(self) -> list[dict]:
        """What the store was converted from: ``[{"path", "bytes", "lines", "fingerprint"}]``
        (``fingerprint``: :func:`source_fingerprint`, or for the other layouts their own, see
        :mod:`lxmert_fast.data.layouts`; absent in stores of early versions; ``records`` instead of
        ``lines`` for the other layouts)."""
        return self.manifest.get("sources") or []

    @property
    def layout(self) -> str:
        """The layout the store was converted from (``tsv`` for stores of earlier versions)."""
        return self.manifest.get("layout", "tsv")

    @property
    def labels(self) -> dict[str, bool]:
        """Which detector labels the store carries: ``{"objects": bool, "attributes": bool}``
        (a layout without them stores zero ids and zero confidences; TSV stores carry both)."""
        return dict(self.manifest.get("labels") or {"objects": True, "attributes": True})

    def check_sources(self, tsv_paths: Iterable[str], fingerprints: Optional[Iterable[str]] = None) -> None:
        """Raise :class:`StoreError` unless every file of ``tsv_paths`` is one this store was
        converted from: matched by content fingerprint, whatever the file's name or place now (a
        renamed, moved or copied file is still its source); for stores written before fingerprints
        were recorded, by absolute path and size. ``fingerprints``: the sources' fingerprints when the
        caller has them (the other layouts' include their id maps; default :func:`source_fingerprint`).

        Stores are found again by name or fingerprint (:mod:`lxmert_fast.data.store_root`), so
        without this check a store converted from other data (a re-generated demo world, another
        data root with the same file names) could be read silently, pairing sentences with the
        wrong images. The error names both files.
        """
        sources = self.sources
        built_from = ", ".join(s["path"] for s in sources) or "(no sources recorded)"
        tsv_paths = list(tsv_paths)
        fps = list(fingerprints) if fingerprints is not None else [None] * len(tsv_paths)
        for p, given_fp in zip(tsv_paths, fps):
            size = source_size(p)
            fp = ((given_fp or source_fingerprint(p)) if any("fingerprint" in s for s in sources) else None)
            if any(s.get("fingerprint") == fp if "fingerprint" in s
                   else (s.get("bytes") == size and os.path.abspath(p) == s["path"])
                   for s in sources):
                continue
            same_name = [s for s in sources if os.path.basename(s["path"]) == os.path.basename(p)]
            if not same_name:
                raise StoreError(f"{self.path}: this store was converted from {built_from}, which does "
                                 f"not include {p}; delete the store directory or give another one")
            src = same_name[0]
            raise StoreError(f"{self.path}: this store was converted from another {os.path.basename(p)} "
                             f"({src['path']}, {src.get('bytes')} bytes) than {p} ({size} bytes; "
                             f"the content differs: re-generated or replaced?); delete the store "
                             f"directory to convert again, or give another one")

    def verify(self) -> None:
        """Recompute the sha256 of every file and compare with the manifest."""
        files = self.manifest["files"]
        sums = sha256_files(os.path.join(self.path, s["file"]) for s in files.values())
        for (name, spec), got in zip(files.items(), sums):
            if got != spec["sha256"]:
                raise StoreError(f"{self.path}/{spec['file']}: sha256 mismatch (corrupted store)")

    # -- pickling / fork safety -----------------------------------------------------------------
    def __getstate__(self):
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state):
        self.__init__(state["path"], state["manifest"])

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: never share fds / maps across processes
            self._reset()

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._reset()

    def __del__(self):
        try:
            if self._pid == os.getpid():
                for fd in self._fds.values():
                    os.close(fd)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_images

    def _file(self, name: str) -> str:
        return os.path.join(self.path, self.manifest["files"][name]["file"])

    def array(self, name: str) -> np.ndarray:
        """Read-only memmap of one array (``features``, ``boxes``, ``obj_ids``, ..., ``img_ids``)."""
        self._check_pid()
        a = self._maps.get(name)
        if a is None:
            a = self._maps[name] = np.load(self._file(name), mmap_mode="r")
        return a

    def __getattr__(self, name):
        if name in ROW_ARRAYS or name == "img_ids":
            return self.array(name)
        raise AttributeError(name)

    def _fd(self, name: str) -> int:
        self._check_pid()
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self._file(name), os.O_RDONLY)
        return fd

    def read_features(self, rows_b: np.ndarray, out_bkd: np.ndarray | None = None,
                      out_rows: np.ndarray | None = None) -> np.ndarray:
        """Feature rows (B, K, D) in the store dtype, read with ``preadv`` (not mapped).

        With ``out_rows``, row ``rows_b[i]`` goes to ``out_bkd[out_rows[i]]`` (the other rows of
        ``out_bkd`` are left as they are): how a :class:`~lxmert_fast.data.store_set.StoreSet`
        fills one batch from several stores without a copy.
        """
        rows_b = np.asarray(rows_b, dtype=np.int64)
        if rows_b.size and (rows_b.min() < 0 or rows_b.max() >= self.num_images):
            raise IndexError(f"row out of range [0, {self.num_images})")
        spec = self.manifest["files"]["features"]
        if out_bkd is None:
            if out_rows is not None:
                raise ValueError("out_rows needs out_bkd")
            out_bkd = np.empty((len(rows_b), self.num_boxes, self.feat_dim), self.feat_dtype)
        elif (out_bkd.dtype != np.dtype(self.feat_dtype)
              or out_bkd.shape[1:] != (self.num_boxes, self.feat_dim)):
            raise ValueError(f"out_bkd is {out_bkd.dtype} {out_bkd.shape}, this store's rows are "
                             f"{self.feat_dtype} {(self.num_boxes, self.feat_dim)} ({self.path})")
        if out_rows is not None:
            out_rows = np.asarray(out_rows, np.int64)
            if out_rows.size and (out_rows.min() < 0 or out_rows.max() >= len(out_bkd)):
                raise IndexError(f"out_rows out of range [0, {len(out_bkd)})")
        elif len(out_bkd) != len(rows_b):
            raise ValueError(f"out_bkd has {len(out_bkd)} rows for {len(rows_b)} reads")
        row_bytes = self.num_boxes * self.feat_dim * np.dtype(self.feat_dtype).itemsize
        _preadv_rows(self._fd("features"), spec["offset"], row_bytes, rows_b, out_bkd, out_rows)
        return out_bkd

    def gather(self, rows_b, names: Iterable[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        """Rows of several arrays: ``{name: array (B, ...)}``; features via :meth:`read_features`."""
        rows_b = np.asarray(rows_b, dtype=np.int64)
        out = {}
        for name in names:
            if name == "features":
                out[name] = self.read_features(rows_b)
            else:
                out[name] = np.asarray(self.array(name)[rows_b])
        return out

    # -- img_id index --------------------------------------------------------------------------
    def index(self) -> dict[str, int]:
        """img_id -> row (built on first use; meant for the main process, not for workers)."""
        if self._index is None:
            ids = self.array("img_ids").tolist()
            self._index = {s: i for i, s in enumerate(ids)}
        return self._index

    def row_of(self, img_id: str) -> int:
        try:
            return self.index()[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} is not in the feature store {self.path}") from None

    def __repr__(self) -> str:
        return (f"FeatureStore({self.path!r}, images={self.num_images}, boxes={self.num_boxes}, "
                f"dim={self.feat_dim}, dtype={self.feat_dtype})")


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (temp file + fsync + rename)."""
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def finalize_store(directory: str, writer: RowWriter, *, num_images: int, num_boxes: int,
                   feat_dim: int, feat_dtype: str, img_ids: list[str], extra: dict,
                   checksum: bool = True) -> dict:
    """Write ``img_ids.npy``, checksums and the manifest (last) into a fully written directory."""
    width = max([len(s) for s in img_ids] + [1])
    np.save(os.path.join(directory, "img_ids.npy"), np.array(img_ids, dtype=f"<U{width}"))
    files = {}
    for name, spec in writer.layout.items():
        files[name] = {"file": os.path.basename(spec["path"]), "dtype": spec["dtype"],
                       "shape": [num_images, *spec["row_shape"]], "offset": spec["offset"]}
    files["img_ids"] = {"file": "img_ids.npy", "dtype": f"<U{width}", "shape": [num_images],
                        "offset": npy_data_offset(os.path.join(directory, "img_ids.npy"))}
    paths = [os.path.join(directory, s["file"]) for s in files.values()]
    for name, p in zip(files, paths):
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        files[name]["bytes"] = os.path.getsize(p)
    sums = sha256_files(paths) if checksum else [None] * len(paths)
    for name, s in zip(files, sums):
        files[name]["sha256"] = s
    manifest = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "complete": True,
        "num_images": num_images, "num_boxes": num_boxes, "feat_dim": feat_dim,
        "feat_dtype": feat_dtype,
        "boxes": "x1 y1 x2 y2 normalised to [0, 1] by img_w / img_h",
        "files": files, **extra,
    }
    write_manifest(directory, manifest)
    fsync_dir(directory)
    return manifest
