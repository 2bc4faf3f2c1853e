"""The TSV converter: ``*_obj36.tsv`` files into a memory-mapped feature store, and the row writing
(options, row filling, compaction, placing a finished store) that the other layouts' converter
(:mod:`lxmert_fast.data.layouts.convert`) shares. The command line is :mod:`lxmert_fast.data.convert`.

How it works (bounded memory, parallel, crash safe):

1. one fast pass counts the lines of every file (vectorised newline search over 16 MB blocks)
   and remembers the byte offset of every ``seg_lines``-th line;
2. the row arrays are preallocated (sparse ``.npy`` files) in a temporary sibling directory
   ``<out>.partial-<pid>``, one row per input line, in input order;
3. segments of lines (from several files and from inside big files) are decoded and validated
   by a process pool; each worker streams its lines and writes blocks of rows with ``pwrite``,
   so memory is a few MB per worker whatever the file size;
4. duplicate img_ids are checked across all files; with ``--skip-bad`` the bad rows' slots are
   compacted away (and listed in ``skipped_rows.tsv``), without it the first bad row aborts the
   conversion with a non-zero exit and an error naming the file, the line and the field;
5. checksums, then ``manifest.json`` (last), then one ``rename`` of the directory into place.
   A crash or Ctrl-C at any point leaves no directory at ``--out`` (only, after a hard kill,
   a ``*.partial-*`` directory without manifest, which :class:`FeatureStore` refuses).
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable

import numpy as np
from tqdm import tqdm

from .formats import (DEFAULT_FEAT_DIM, DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES,
                      BadRowLog, DataFormatError, normalise_boxes, parse_tsv_line)
from .store import MANIFEST, RowWriter, _preadv_rows, finalize_store, fsync_dir, source_fingerprint

_WRITE_BLOCK_ROWS = 32


def count_lines(path: str, every: int, block: int = 4 << 20) -> tuple[int, list[tuple[int, int]]]:
    """Number of lines and ``[(line_number, byte_offset)]`` of lines 1, 1+every, 1+2*every, ...

    A last line without a trailing newline counts; an empty file has 0 lines.
    """
    checkpoints = [(1, 0)]
    n_nl, pos, last = 0, 0, b"\n"
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = f.read(block)
            if not buf:
                break
            nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
            # line numbers that start right after these newlines: n_nl + 2, n_nl + 3, ...
            starts = n_nl + 2 + np.arange(len(nl))
            sel = (starts - 1) % every == 0
            for ln, off in zip(starts[sel].tolist(), (pos + nl[sel] + 1).tolist()):
                checkpoints.append((ln, off))
            n_nl += len(nl)
            pos += len(buf)
            last = buf[-1:]
    size = pos
    n_lines = n_nl + (1 if size and last != b"\n" else 0)
    checkpoints = [(ln, off) for ln, off in checkpoints if ln <= n_lines]
    return n_lines, checkpoints


class _Options:
    """Picklable conversion options shared with the workers."""

    def __init__(self, num_boxes: int, fixed_boxes: bool, feat_dim: int, fp32: bool,
                 skip_bad: bool, num_obj_classes: int, num_attr_classes: int, first_row: str):
        self.num_boxes = num_boxes
        self.fixed_boxes = fixed_boxes
        self.feat_dim = feat_dim
        self.fp32 = fp32
        self.skip_bad = skip_bad
        self.num_obj_classes = num_obj_classes
        self.num_attr_classes = num_attr_classes
        self.first_row = first_row  # "file:line" the box count was taken from


def _fill_row(bufs: dict, slot: int, row, opts: _Options, file_idx: int, line: int) -> None:
    k, n = opts.num_boxes, row.num_boxes
    if n < k:  # padded image: clear the slots this row does not fill
        for name in ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf"):
            bufs[name][slot, n:] = 0
    bufs["features"][slot, :n] = row.feats_nd  # casts to fp16 / fp32
    bufs["boxes"][slot, :n] = normalise_boxes(row.boxes_n4, row.img_h, row.img_w)
    bufs["obj_ids"][slot, :n] = row.obj_ids_n
    bufs["obj_conf"][slot, :n] = row.obj_conf_n
    bufs["attr_ids"][slot, :n] = row.attr_ids_n
    bufs["attr_conf"][slot, :n] = row.attr_conf_n
    bufs["img_h"][slot] = row.img_h
    bufs["img_w"][slot] = row.img_w
    bufs["num_boxes"][slot] = n
    bufs["src_file"][slot] = file_idx
    bufs["src_line"][slot] = line


def convert_segment(writer: RowWriter, path: str, file_idx: int, byte0: int, line0: int,
                    n_lines: int, row0: int, opts: _Options):
    """Decode lines ``[line0, line0 + n_lines)`` of ``path`` into rows ``row0 ...``.

    Returns ``(ids, errors)``: ``ids`` a list of ``(row, img_id, line)`` for valid rows, and the
    list of skipped-row errors (empty unless ``opts.skip_bad``).
    """
    log = BadRowLog(opts.skip_bad)
    block = min(_WRITE_BLOCK_ROWS, n_lines)
    bufs = writer.buffers(block)
    ids = []
    with open(path, "rb") as f:
        f.seek(byte0)
        filled = 0
        for i in range(n_lines):
            line = line0 + i
            raw = f.readline()
            if not raw:
                raise DataFormatError(path, line, "(file)", "file ended early (modified while "
                                      "converting?)")
            slot = i % block
            try:
                row = parse_tsv_line(raw, path, line, feat_dim=opts.feat_dim,
                                     num_obj_classes=opts.num_obj_classes,
                                     num_attr_classes=opts.num_attr_classes,
                                     check_fp16=not opts.fp32)
                if row.num_boxes != opts.num_boxes:
                    if not opts.fixed_boxes:
                        raise DataFormatError(
                            path, line, "num_boxes",
                            f"{row.num_boxes} boxes, but the store holds {opts.num_boxes} per image "
                            f"(the count of the first row, {opts.first_row}); pass --num-boxes K "
                            f"to pad images with fewer boxes")
                    if row.num_boxes > opts.num_boxes:
                        raise DataFormatError(path, line, "num_boxes",
                                              f"{row.num_boxes} boxes > --num-boxes {opts.num_boxes}")
                _fill_row(bufs, slot, row, opts, file_idx, line)
                ids.append((row0 + i, row.img_id, line))
            except DataFormatError as e:
                log.handle(e)
                for b in bufs.values():
                    b[slot] = 0
            filled = slot + 1
            if filled == block or i == n_lines - 1:
                writer.write(row0 + i + 1 - filled, bufs, filled)
    writer.close()
    return ids, log.errors


def _segment_task(args):
    return convert_segment(*args)


def _worker_init() -> None:
    """Workers die with the converter (even on SIGKILL) and leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the parent already died
                os._exit(1)
        except (OSError, AttributeError):
            pass


def _first_row(paths: list[str], skip_bad: bool, **kw) -> tuple[int, str]:
    """Box count of the first valid row (its errors are re-found and reported by the workers)."""
    for path in paths:
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                try:
                    row = parse_tsv_line(raw, path, line, **kw)
                    return row.num_boxes, f"{path}:{line}"
                except DataFormatError:
                    if not skip_bad:
                        raise
    raise DataFormatError(paths[0], None, "(file)", "no valid row in any input file")


def _plan_segments(counts, seg_lines):
    """[(file_idx, byte0, line0, n_lines, row0)] covering every line of every file, in order."""
    segs, row0 = [], 0
    for fi, (n_lines, cps) in enumerate(counts):
        for j, (ln, off) in enumerate(cps):
            end = cps[j + 1][0] if j + 1 < len(cps) else n_lines + 1
            segs.append((fi, off, ln, end - ln, row0 + ln - 1))
        row0 += n_lines
    return segs


def _compact(writer: RowWriter, directory: str, valid_rows: np.ndarray, opts: _Options,
             progress: bool) -> RowWriter:
    """Copy the valid rows into new exact-size arrays (only when rows were skipped)."""
    sub = os.path.join(directory, "compact")
    os.makedirs(sub)
    new = RowWriter.create(sub, len(valid_rows), opts.num_boxes, opts.feat_dim,
                           "float32" if opts.fp32 else "float16")
    bufs = new.buffers(_WRITE_BLOCK_ROWS)
    fds = {n: os.open(s["path"], os.O_RDONLY) for n, s in writer.layout.items()}
    try:
        for start in range(0, len(valid_rows), _WRITE_BLOCK_ROWS):
            rows = valid_rows[start:start + _WRITE_BLOCK_ROWS]
            for name, spec in writer.layout.items():
                _preadv_rows(fds[name], spec["offset"], writer.row_bytes(name), rows,
                             bufs[name][:len(rows)])
            new.write(start, bufs, len(rows))
    finally:
        for fd in fds.values():
            os.close(fd)
        new.close()
    for name, spec in writer.layout.items():
        os.replace(new.layout[name]["path"], spec["path"])
        new.layout[name]["path"] = spec["path"]
    os.rmdir(sub)
    return new


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: str, log=print) -> list[str]:
    """Delete ``<out_dir>.partial-<pid>`` directories left by conversions that crashed (their
    process is gone); a hard kill leaves one behind, as big as the store."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    removed = []
    for name in os.listdir(parent or "."):
        if not name.startswith(base + ".partial-"):
            continue
        pid = name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
            if log:
                log(f"removed {name}: left by an interrupted conversion (process {pid} is gone)")
    return removed


def place_store(tmp: str, out_dir: str, overwrite: bool, log=print) -> None:
    """Rename a finished store directory ``tmp`` into place at ``out_dir``: the only moment a store
    appears there (an existing one is replaced with ``overwrite``; a store another process finished
    first is kept)."""
    old = None
    if os.path.exists(out_dir) and overwrite:
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.exists(os.path.join(out_dir, MANIFEST)):
            raise
        # another process converted the same store concurrently and finished first
        shutil.rmtree(tmp, ignore_errors=True)
        log and log(f"{out_dir} was completed by another process; keeping it")
    fsync_dir(os.path.dirname(out_dir))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _check_inputs(tsv_paths: list[str], out_dir: str, overwrite: bool) -> tuple[list[str], str]:
    """The input paths (each an existing file) and the absolute output directory (which must not
    exist unless ``overwrite``)."""
    tsv_paths = [os.fspath(p) for p in tsv_paths]
    if not tsv_paths:
        raise ValueError("no input files")
    for p in tsv_paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(p)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass --overwrite to replace it)")
    return tsv_paths, out_dir


def make_partial_dir(out_dir: str, log=print) -> str:
    """A fresh, empty ``<out_dir>.partial-<pid>`` to build a store in, renamed into place when
    complete (those of crashed conversions removed first)."""
    remove_stale_partials(out_dir, log)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _box_options(tsv_paths: list[str], num_boxes: int | None, fp32: bool, skip_bad: bool,
                 parse_kw: dict) -> _Options:
    """The conversion options; the box count is ``num_boxes`` (fixed) or the first valid row's
    (``parse_kw``: the row parser's limits)."""
    fixed = num_boxes is not None
    if num_boxes is None:
        num_boxes, first = _first_row(tsv_paths, skip_bad, **parse_kw)
    else:
        first = "--num-boxes"
    if num_boxes <= 0:
        raise ValueError("num_boxes must be positive")
    return _Options(num_boxes, fixed, parse_kw["feat_dim"], fp32, skip_bad,
                    parse_kw["num_obj_classes"], parse_kw["num_attr_classes"], first)


def _default_seg_lines(total_bytes: int, num_boxes: int, feat_dim: int, workers: int) -> int:
    """Lines per segment: ~4 segments per worker for balance, at most 256 lines (~100 MB)."""
    approx_lines = max(1, total_bytes // max(1, 4 * num_boxes * feat_dim * 4 // 3))
    return int(min(256, max(8, math.ceil(approx_lines / (4 * workers)))))


def _segment_bytes(segs, tsv_paths: list[str]) -> list[int]:
    """Bytes of each planned segment (for the progress bar)."""
    seg_bytes = []
    for i, (fi, b0, _l0, _n, _r0) in enumerate(segs):
        same = i + 1 < len(segs) and segs[i + 1][0] == fi
        seg_bytes.append((segs[i + 1][1] if same else os.path.getsize(tsv_paths[fi])) - b0)
    return seg_bytes


def _run_segments(tasks: list, seg_bytes: list[int], total_bytes: int, workers: int,
                  progress: bool, on_segment: Callable[[int], None] | None) -> list:
    """Convert every segment, in a process pool unless ``workers == 1`` or there is one segment;
    the results in task order. A worker's DataFormatError is re-raised here."""
    bar = None
    if progress:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert",
                   file=sys.stderr, dynamic_ncols=True)

    def segment_done(i: int, done_n: int) -> None:
        if bar:
            bar.update(seg_bytes[i])
        if on_segment is not None:
            on_segment(done_n)

    try:
        if workers == 1 or len(tasks) == 1:
            results = []
            for i, t in enumerate(tasks):
                results.append(_segment_task(t))
                segment_done(i, i + 1)
            return results
        return _run_segments_in_pool(tasks, workers, segment_done)
    finally:
        if bar:
            bar.close()


def _run_segments_in_pool(tasks: list, workers: int, segment_done: Callable[[int, int], None]) -> list:
    """The segments in a process pool; on any error or interrupt the workers are terminated."""
    results = [None] * len(tasks)
    # fork where available: no re-import of the package in every worker (the
    # workers only run numpy code); spawn elsewhere
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                             initializer=_worker_init)
    try:
        futs = {ex.submit(_segment_task, t): i for i, t in enumerate(tasks)}
        pending, done_n = set(futs), 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                i = futs[f]
                results[i] = f.result()  # re-raises a worker's DataFormatError
                done_n += 1
                segment_done(i, done_n)
    except BaseException:
        for p in list(getattr(ex, "_processes", {}).values()):
            p.terminate()
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return results


def _unique_rows(results: list, segs, tsv_paths: list[str], total_lines: int,
                 bad: BadRowLog) -> tuple[np.ndarray, list]:
    """(valid (total_lines,) bool, img_id of each valid row): the workers' bad rows go to
    ``bad``, and so does every repeat of an img_id, across every file in input order."""
    valid = np.zeros(total_lines, bool)
    img_ids = [None] * total_lines
    first_seen: dict[str, tuple[str, int]] = {}
    for (ids, errs), (fi, *_rest) in zip(results, segs):
        bad.extend(errs)
        for row, img_id, line in ids:
            prev = first_seen.get(img_id)
            if prev is not None:
                bad.handle(DataFormatError(tsv_paths[fi], line, "img_id",
                                           f"duplicate img_id {img_id!r} (first at "
                                           f"{prev[0]}:{prev[1]})"))
                continue
            first_seen[img_id] = (tsv_paths[fi], line)
            valid[row] = True
            img_ids[row] = img_id
    return valid, img_ids


def _manifest_extra(tsv_paths: list[str], counts, opts: _Options, bad: BadRowLog) -> dict:
    """The TSV store's manifest fields beyond the arrays: its sources (with their fingerprints),
    the skipped-row count, the label spaces."""
    return {
        "sources": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "lines": c[0],
                     "fingerprint": source_fingerprint(p)}
                    for p, c in zip(tsv_paths, counts)],
        "skipped_rows": len(bad),
        "num_obj_classes": opts.num_obj_classes, "num_attr_classes": opts.num_attr_classes,
        "fixed_num_boxes": opts.fixed_boxes, "layout": "tsv", "labels": {"objects": True, "attributes": True},
    }


def write_skipped_rows(bad: BadRowLog, directory: str, extra: dict) -> None:
    """List the skipped rows in ``skipped_rows.tsv`` (when there are any) and name it in the
    manifest's ``extra``."""
    if len(bad):
        bad.write_tsv(os.path.join(directory, "skipped_rows.tsv"))
        extra["skipped_rows_file"] = "skipped_rows.tsv"


def _log_converted(log, n_valid: int, total_bytes: int, out_dir: str, dt: float, feat_dtype: str,
                   bad: BadRowLog) -> None:
    if not log:
        return
    log(f"converted {n_valid} images ({total_bytes / 1e6:.1f} MB of TSV) into {out_dir} "
        f"in {dt:.1f} s ({total_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s), features {feat_dtype}")
    if len(bad):
        log(bad.summary())
        log(f"every skipped row is listed in {os.path.join(out_dir, 'skipped_rows.tsv')}")


def convert_tsvs(tsv_paths: list[str], out_dir: str, *, fp32: bool = False,
                 skip_bad: bool = False, workers: int | None = None,
                 num_boxes: int | None = None, feat_dim: int = DEFAULT_FEAT_DIM,
                 num_obj_classes: int = DEFAULT_NUM_OBJ_CLASSES,
                 num_attr_classes: int = DEFAULT_NUM_ATTR_CLASSES, overwrite: bool = False,
                 checksum: bool = True, progress: bool = True, seg_lines: int | None = None,
                 log=print, on_segment: Callable[[int], None] | None = None) -> dict:
    """Convert TSV files into a feature store at ``out_dir``; returns the manifest.

    Raises :class:`DataFormatError` on the first bad row unless ``skip_bad``; then bad rows are
    skipped, counted, logged and listed in ``skipped_rows.tsv``. ``workers`` processes decode
    in parallel (default: CPU count; 1 = in this process). ``on_segment(n)`` is called in this
    process after each converted segment with the number done so far (progress; an exception it
    raises interrupts the conversion like Ctrl-C: nothing is left at ``out_dir``).
    """
    t0 = time.time()
    tsv_paths, out_dir = _check_inputs(tsv_paths, out_dir, overwrite)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    kw = dict(feat_dim=feat_dim, num_obj_classes=num_obj_classes,
              num_attr_classes=num_attr_classes, check_fp16=not fp32)
    tmp = make_partial_dir(out_dir, log)
    try:
        opts = _box_options(tsv_paths, num_boxes, fp32, skip_bad, kw)
        total_bytes = sum(os.path.getsize(p) for p in tsv_paths)
        if seg_lines is None:
            seg_lines = _default_seg_lines(total_bytes, opts.num_boxes, feat_dim, workers)
        counts = [count_lines(p, seg_lines) for p in tsv_paths]
        total_lines = sum(c[0] for c in counts)
        if total_lines == 0:
            raise DataFormatError(tsv_paths[0], None, "(file)", "input files are empty")
        feat_dtype = "float32" if fp32 else "float16"
        writer = RowWriter.create(tmp, total_lines, opts.num_boxes, feat_dim, feat_dtype)
        segs = _plan_segments(counts, seg_lines)
        tasks = [(writer, tsv_paths[fi], fi, b0, l0, n, r0, opts) for fi, b0, l0, n, r0 in segs]
        results = _run_segments(tasks, _segment_bytes(segs, tsv_paths), total_bytes, workers,
                                progress, on_segment)
        bad = BadRowLog(skip_bad)
        valid, img_ids = _unique_rows(results, segs, tsv_paths, total_lines, bad)
        n_valid = int(valid.sum())
        if n_valid == 0:
            raise DataFormatError(tsv_paths[0], None, "(file)", "no valid rows to convert")
        if n_valid < total_lines:
            rows = np.flatnonzero(valid)
            writer = _compact(writer, tmp, rows, opts, progress)
            img_ids = [img_ids[r] for r in rows.tolist()]
        extra = _manifest_extra(tsv_paths, counts, opts, bad)
        write_skipped_rows(bad, tmp, extra)
        manifest = finalize_store(tmp, writer, num_images=n_valid, num_boxes=opts.num_boxes,
                                  feat_dim=feat_dim, feat_dtype=feat_dtype, img_ids=img_ids,
                                  extra=extra, checksum=checksum)
        place_store(tmp, out_dir, overwrite, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.time() - t0
    _log_converted(log, n_valid, total_bytes, out_dir, dt, feat_dtype, bad)
    manifest["seconds"] = dt
    return manifest

