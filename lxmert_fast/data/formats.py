"""Readers and strict validation for the original LXMERT data files.

Formats (as released with airsplay/lxmert):

* ``*_obj36.tsv``: no header, one image per line, 10 tab-separated fields
  ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``.
  ``img_h``, ``img_w``, ``num_boxes`` are decimal ints; the rest are base64 of raw little-endian
  arrays: objects_id int64 (N,), objects_conf float32 (N,), attrs_id int64 (N,),
  attrs_conf float32 (N,), boxes float32 (N, 4) x1 y1 x2 y2 in pixels, features float32 (N, D).
* pre-training JSON (``data/lxmert/*.json``): a list of
  ``{"img_id", "sentf": {source: [sent, ...]}, "labelf": {source: [{answer: score}, ...]}}``.
* VQA / GQA / NLVR2 JSON lists and the answer tables (``all_ans.json``,
  ``trainval_ans2label.json``, ``trainval_label2ans.json``).

Every problem raises :class:`DataFormatError`, whose message names the file, the line and the
field. Callers that want to keep going pass a :class:`BadRowLog` with ``skip_bad=True``: the bad
row is then recorded (never silently dropped) and reported by :meth:`BadRowLog.summary`.
"""

from __future__ import annotations

import binascii
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np

TSV_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)
NUM_TSV_FIELDS = len(TSV_FIELDS)
DEFAULT_FEAT_DIM = 2048
DEFAULT_NUM_OBJ_CLASSES = 1600
DEFAULT_NUM_ATTR_CLASSES = 400
# Boxes may overshoot the image by this fraction of its size (the released loader's tolerance).
BOX_TOLERANCE = 1e-5
FP16_MAX = 65504.0


class DataFormatError(ValueError):
    """A bad input row. ``str()`` names the file, the line (1-based) and the field.

    For JSON inputs ``line`` is the line on which the offending record starts and ``field`` is a
    path inside the record such as ``[12].labelf.vqa[3]``. Records of the other feature layouts
    (:mod:`lxmert_fast.data.layouts`) have no line: ``key`` names the record (an HDF5 group, an
    LMDB key, a file's image id) and ``line`` is None.
    """

    def __init__(self, path: str, line: int | None, field: str, message: str, key: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.key is not None:
            where = f"{self.path}: key {self.key!r}" if self.line is None else f"{self.path}:{self.line}: key {self.key!r}"
        else:
            where = f"{self.path}:{'?' if self.line is None else self.line}"
        return f"{where}: field '{self.field}': {self.message}"

    def __reduce__(self):  # picklable across multiprocessing
        return (DataFormatError, (self.path, self.line, self.field, self.message, self.key))


@dataclass
class BadRowLog:
    """Collects skipped rows when ``skip_bad`` is set; otherwise re-raises the first error."""

    skip_bad: bool = False

    def __post_init__(self):
        self.errors: list[DataFormatError] = []

    def handle(self, err: DataFormatError) -> None:
        """Raise ``err`` unless skipping bad rows, in which case record it."""
        if not self.skip_bad:
            raise err
        self.errors.append(err)

    def extend(self, errs) -> None:
        self.errors.extend(errs)

    def __len__(self) -> int:
        return len(self.errors)

    def summary(self, max_listed: int = 20) -> str:
        """Human-readable report: total, per file and field counts, the first rows listed."""
        if not self.errors:
            return "no bad rows"
        by_field = Counter((e.path, e.field) for e in self.errors)
        lines = [f"skipped {len(self.errors)} bad row(s):"]
        for (path, field), n in sorted(by_field.items()):
            lines.append(f"  {n:8d}  {path}  field '{field}'")
        for e in self.errors[:max_listed]:
            lines.append(f"  - {e}")
        if len(self.errors) > max_listed:
            lines.append(f"  ... and {len(self.errors) - max_listed} more")
        return "\n".join(lines)

    def write_tsv(self, path: str) -> None:
        """Write every skipped row as ``file<TAB>line<TAB>field<TAB>message<TAB>key`` (``key``: the
        record of a layout without lines, empty for TSV rows)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write("file\tline\tfield\tmessage\tkey\n")
            for e in self.errors:
                msg = e.message.replace("\t", " ").replace("\n", " ")
                key = "" if e.key is None else str(e.key).replace("\t", " ").replace("\n", " ")
                f.write(f"{e.path}\t{e.line}\t{e.field}\t{msg}\t{key}\n")


# --------------------------------------------------------------------------------------------
# TSV features
# --------------------------------------------------------------------------------------------

class ObjRow(NamedTuple):
    """One decoded TSV row (N = num_boxes, D = feature dim). Arrays are read-only views."""

    img_id: str
    img_h: int
    img_w: int
    num_boxes: int
    obj_ids_n: np.ndarray      # int64 (N,)
    obj_conf_n: np.ndarray     # float32 (N,)
    attr_ids_n: np.ndarray     # int64 (N,)
    attr_conf_n: np.ndarray    # float32 (N,)
    boxes_n4: np.ndarray       # float32 (N, 4) pixels x1 y1 x2 y2
    feats_nd: np.ndarray       # float32 (N, D)


def _b64(raw: bytes, path: str, line: int, field: str) -> bytes:
    """Strict base64 decode. Fast non-strict decode + length check; strict decode on mismatch."""
    n = len(raw)
    if n % 4:
        raise DataFormatError(path, line, field, f"bad base64: length {n} is not a multiple of 4")
    pad = (raw[-1] == 61) + (n > 1 and raw[-2] == 61) if n else 0  # trailing '='s
    try:
        out = binascii.a2b_base64(raw)
    except binascii.Error as e:
        raise DataFormatError(path, line, field, f"bad base64: {e}") from None
    if len(out) != n // 4 * 3 - pad:  # a non-alphabet char was skipped: find it strictly
        try:
            binascii.a2b_base64(raw, strict_mode=True)
        except binascii.Error as e:
            raise DataFormatError(path, line, field, f"bad base64: {e}") from None
        raise DataFormatError(path, line, field, "bad base64: invalid characters")
    return out


def _array(raw: bytes, path: str, line: int, field: str, dtype, count: int,
           what: str) -> np.ndarray:
    buf = _b64(raw, path, line, field)
    item = np.dtype(dtype).itemsize
    if len(buf) != count * item:
        have = len(buf) / item
        have_s = f"{have:g}" if have != int(have) else str(int(have))
        raise DataFormatError(
            path, line, field,
            f"decoded {len(buf)} bytes = {have_s} {np.dtype(dtype).name}, expected {what} = {count}")
    return np.frombuffer(buf, dtype=dtype)


def _int_field(raw, path: str, line: int, field: str) -> int:
    raw = bytes(raw)
    try:
        v = int(raw)
    except ValueError:
        raise DataFormatError(path, line, field, f"not an integer: {raw[:40]!r}") from None
    if v <= 0:
        raise DataFormatError(path, line, field, f"must be positive, got {v}")
    return v


def _first_bad(mask_bool: np.ndarray) -> tuple:
    return tuple(int(i) for i in np.argwhere(mask_bool)[0])


def _split_fields(line_b: bytes) -> list:
    """The tab-separated fields as zero-copy memoryviews (a 400 KB line is not copied)."""
    end = len(line_b)
    while end and line_b[end - 1] in (10, 13):
        end -= 1
    mv = memoryview(line_b)
    parts, start = [], 0
    while True:
        tab = line_b.find(b"\t", start, end)
        if tab < 0:
            parts.append(mv[start:end])
            return parts
        parts.append(mv[start:tab])
        start = tab + 1


def check_features(feats_nd: np.ndarray, path: str, line: int | None, check_fp16: bool = False, *,
                   key: str | None = None, field: str = "features") -> None:
    """Non-finite features, or (``check_fp16``) values outside the float16 range, raise
    :class:`DataFormatError` (vectorised float32 reductions: a few microseconds per row)."""
    if feats_nd.size == 0:
        return
    if not np.isfinite(feats_nd).all():
        i, j = _first_bad(~np.isfinite(feats_nd))
        raise DataFormatError(path, line, field,
                              f"object {i}, dim {j}: non-finite value {float(feats_nd[i, j])!r}", key)
    if check_fp16 and (feats_nd.max() > FP16_MAX or feats_nd.min() < -FP16_MAX):
        amax = float(np.abs(feats_nd).max())
        raise DataFormatError(path, line, field,
                              f"|value| {amax:g} exceeds the float16 range; convert with --fp32", key)


# The TSV's field names; a layout whose files name a field otherwise passes its own names to
# :func:`check_obj_row`, so that an error names the field as the files do.
TSV_FIELD_NAMES = {"objects_id": "objects_id", "objects_conf": "objects_conf", "attrs_id": "attrs_id",
                   "attrs_conf": "attrs_conf", "boxes": "boxes", "features": "features"}


def check_obj_row(row: "ObjRow", path: str, line: int | None, *, key: str | None = None,
                  num_obj_classes: int = DEFAULT_NUM_OBJ_CLASSES,
                  num_attr_classes: int = DEFAULT_NUM_ATTR_CLASSES, check_fp16: bool = False,
                  check_feats: bool = True, objects: bool = True, attributes: bool = True,
                  names: dict | None = None) -> None:
    """The checks every feature record passes, whatever its layout: ids inside the detector's
    class range, confidences in [0, 1], finite boxes inside the image with x1 <= x2 and y1 <= y2,
    finite features (and, ``check_fp16``, inside the float16 range). ``objects`` / ``attributes``:
    whether the record carries those labels (a layout without them is not checked for them).
    Raises :class:`DataFormatError` naming the file, the line or key, and the field (``names``:
    the layout's names of the TSV's fields).
    """
    nm = TSV_FIELD_NAMES if names is None else {**TSV_FIELD_NAMES, **names}
    checks = []
    if objects:
        checks.append(("objects_id", "objects_conf", row.obj_ids_n, row.obj_conf_n, num_obj_classes))
    if attributes:
        checks.append(("attrs_id", "attrs_conf", row.attr_ids_n, row.attr_conf_n, num_attr_classes))
    for id_field, conf_field, ids, conf, limit in checks:
        bad = (ids < 0) | (ids >= limit)
        if bad.any():
            (i,) = _first_bad(bad)
            raise DataFormatError(path, line, nm[id_field],
                                  f"object {i}: id {int(ids[i])} outside [0, {limit})", key)
        bad = ~np.isfinite(conf) | (conf < 0) | (conf > 1 + 1e-4)
        if bad.any():
            (i,) = _first_bad(bad)
            raise DataFormatError(path, line, nm[conf_field],
                                  f"object {i}: confidence {float(conf[i])!r} not in [0, 1]", key)
    boxes, img_w, img_h = row.boxes_n4, row.img_w, row.img_h
    if not np.isfinite(boxes).all():
        i, j = _first_bad(~np.isfinite(boxes))
        raise DataFormatError(path, line, nm["boxes"], f"object {i}: non-finite coordinate {j}", key)
    lim = np.array([img_w, img_h, img_w, img_h], np.float32)
    tol = BOX_TOLERANCE * lim
    outside = (boxes < -tol) | (boxes > lim + tol)
    if outside.any():
        i, j = _first_bad(outside)
        raise DataFormatError(
            path, line, nm["boxes"],
            f"object {i}: box {boxes[i].tolist()} outside the {img_w}x{img_h} (w x h) image", key)
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        (i,) = _first_bad(flipped)
        raise DataFormatError(path, line, nm["boxes"],
                              f"object {i}: box {boxes[i].tolist()} has x2 < x1 or y2 < y1", key)
    if check_feats:
        check_features(row.feats_nd, path, line, check_fp16, key=key, field=nm["features"])


def parse_tsv_line(line_b: bytes, path: str, line: int, *, feat_dim: int = DEFAULT_FEAT_DIM,
                   num_obj_classes: int = DEFAULT_NUM_OBJ_CLASSES,
                   num_attr_classes: int = DEFAULT_NUM_ATTR_CLASSES,
                   check_fp16: bool = False, check_feats: bool = True) -> ObjRow:
    """Decode and validate one ``*_obj36.tsv`` line (bytes, with or without its newline).

    Raises :class:`DataFormatError` for: a wrong field count, a non-integer or non-positive
    size, bad base64, an array whose size does not match ``num_boxes`` x dims, ids out of the
    detector's class range, non-finite or out-of-range confidences, boxes outside the image or
    with x2 < x1, non-finite features, and (``check_fp16``) features outside the fp16 range.
    ``check_feats=False`` leaves the feature values to the caller (:func:`check_features`).
    """
    parts = _split_fields(line_b)
    if len(parts) != NUM_TSV_FIELDS:
        raise DataFormatError(path, line, "(row)",
                              f"expected {NUM_TSV_FIELDS} tab-separated fields "
                              f"({', '.join(TSV_FIELDS)}), got {len(parts)}")
    try:
        img_id = bytes(parts[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise DataFormatError(path, line, "img_id", "not valid UTF-8") from None
    if not img_id or img_id.strip() != img_id:
        raise DataFormatError(path, line, "img_id", f"empty or padded img_id {img_id!r}")
    img_h = _int_field(parts[1], path, line, "img_h")
    img_w = _int_field(parts[2], path, line, "img_w")
    n = _int_field(parts[7], path, line, "num_boxes")

    obj_ids = _array(parts[3], path, line, "objects_id", np.int64, n, "num_boxes")
    obj_conf = _array(parts[4], path, line, "objects_conf", np.float32, n, "num_boxes")
    attr_ids = _array(parts[5], path, line, "attrs_id", np.int64, n, "num_boxes")
    attr_conf = _array(parts[6], path, line, "attrs_conf", np.float32, n, "num_boxes")
    boxes = _array(parts[8], path, line, "boxes", np.float32, n * 4, "num_boxes x 4").reshape(n, 4)
    feats = _array(parts[9], path, line, "features", np.float32, n * feat_dim,
                   f"num_boxes x {feat_dim}").reshape(n, feat_dim)

    row = ObjRow(img_id, img_h, img_w, n, obj_ids, obj_conf, attr_ids, attr_conf, boxes, feats)
    check_obj_row(row, path, line, num_obj_classes=num_obj_classes, num_attr_classes=num_attr_classes,
                  check_fp16=check_fp16, check_feats=check_feats)
    return row


def normalise_boxes(boxes_n4: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """Pixel x1 y1 x2 y2 -> fractions of the image size, clipped to [0, 1] (float32)."""
    scale = np.array([img_w, img_h, img_w, img_h], np.float32)
    return np.clip(boxes_n4 / scale, 0.0, 1.0).astype(np.float32)


def iter_tsv(path: str, *, skip: BadRowLog | None = None, start_byte: int = 0,
             first_line: int = 1, max_lines: int | None = None,
             **parse_kw) -> Iterator[tuple[int, ObjRow | None]]:
    """Stream ``(line_number, ObjRow)`` from a TSV, one line in memory at a time.

    With ``skip`` (a :class:`BadRowLog` with ``skip_bad=True``) a bad row is recorded and yielded
    as ``(line_number, None)``; otherwise the first bad row raises :class:`DataFormatError`.
    ``start_byte`` / ``first_line`` / ``max_lines`` select a segment (used by parallel convert).
    """
    skip = skip if skip is not None else BadRowLog(False)
    with open(path, "rb") as f:
        f.seek(start_byte)
        line = first_line
        while max_lines is None or line < first_line + max_lines:
            raw = f.readline()
            if not raw:
                break
            try:
                row = parse_tsv_line(raw, path, line, **parse_kw)
            except DataFormatError as e:
                skip.handle(e)
                row = None
            yield line, row
            line += 1


def read_tsv(path: str, **kw) -> list[ObjRow]:
    """Read a whole (small) TSV into memory; strict. For big files use ``convert``."""
    return [row for _, row in iter_tsv(path, **kw) if row is not None]


def write_tsv_row(f, img_id: str, img_h: int, img_w: int, obj_ids_n, obj_conf_n, attr_ids_n,
                  attr_conf_n, boxes_n4, feats_nd) -> None:
    """Write one row in the original format (used by the demo world and tests)."""
    enc = lambda a, dt: binascii.b2a_base64(np.ascontiguousarray(a, dtype=dt).tobytes(),
                                            newline=False)
    n = len(obj_ids_n)
    f.write(b"\t".join([
        img_id.encode("utf-8"), str(int(img_h)).encode(), str(int(img_w)).encode(),
        enc(obj_ids_n, "<i8"), enc(obj_conf_n, "<f4"), enc(attr_ids_n, "<i8"),
        enc(attr_conf_n, "<f4"), str(n).encode(), enc(boxes_n4, "<f4"), enc(feats_nd, "<f4"),
    ]) + b"\n")


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------

def iter_json_records(path: str) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, record)`` for each element of a top-level JSON list.

    ``line`` is the 1-based line on which the element starts (works for one-line and indented
    files alike). A file that is not a JSON list raises :class:`DataFormatError`.
    """
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    dec = json.JSONDecoder()
    n = len(text)
    ws = " \t\r\n"

    def skip_ws(p: int) -> int:
        while p < n and text[p] in ws:
            p += 1
        return p

    line, line_pos = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, p)
        line_pos = p
        return line

    pos = skip_ws(0)
    if pos >= n or text[pos] != "[":
        raise DataFormatError(path, line_at(pos), "(file)", "expected a JSON list")
    pos = skip_ws(pos + 1)
    if pos < n and text[pos] == "]":
        return
    idx = 0
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"[{idx}]", f"invalid JSON: {e.msg}") from None
        yield idx, line_at(pos), obj
        idx += 1
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise DataFormatError(path, line_at(pos), "(file)", "trailing data after list")
            return
        raise DataFormatError(path, line_at(min(pos, n)), f"[{idx}]",
                              "expected ',' or ']' after list element")


def read_json(path: str, what: str = "JSON") -> Any:
    """``json.load`` with a :class:`DataFormatError` naming the file and line on failure."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, "(file)", f"invalid {what}: {e.msg}") from None


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_label(path, line, field, label) -> None:
    """A QA label: {answer(str): score(finite number >= 0)}."""
    if not isinstance(label, dict):
        raise DataFormatError(path, line, field, f"expected {{answer: score}}, got {type(label).__name__}")
    for ans, score in label.items():
        if not _is_num(score) or score < 0:
            raise DataFormatError(path, line, f"{field}[{ans!r}]",
                                  f"score must be a finite number >= 0, got {score!r}")


def _check_str(path, line, field, v, allow_empty=False) -> None:
    if not isinstance(v, str) or (not allow_empty and not v):
        raise DataFormatError(path, line, field, f"expected a non-empty string, got {v!r}")


def validate_pretrain_record(path: str, line: int, idx: int, rec: Any) -> None:
    """Validate one pre-training record (``img_id`` / ``sentf`` / ``labelf``)."""
    f0 = f"[{idx}]"
    if not isinstance(rec, dict):
        raise DataFormatError(path, line, f0, "expected an object")
    for key in ("img_id", "sentf"):
        if key not in rec:
            raise DataFormatError(path, line, f"{f0}.{key}", "missing")
    _check_str(path, line, f"{f0}.img_id", rec["img_id"])
    sentf, labelf = rec["sentf"], rec.get("labelf", {})
    if not isinstance(sentf, dict):
        raise DataFormatError(path, line, f"{f0}.sentf", "expected {source: [sentence, ...]}")
    if not isinstance(labelf, dict):
        raise DataFormatError(path, line, f"{f0}.labelf", "expected {source: [{answer: score}]}")
    for src, sents in sentf.items():
        if not isinstance(sents, list):
            raise DataFormatError(path, line, f"{f0}.sentf.{src}", "expected a list of sentences")
        for j, s in enumerate(sents):
            _check_str(path, line, f"{f0}.sentf.{src}[{j}]", s)
    for src, labels in labelf.items():
        fld = f"{f0}.labelf.{src}"
        if src not in sentf:
            raise DataFormatError(path, line, fld, "labels for a source with no sentences")
        if not isinstance(labels, list) or len(labels) != len(sentf[src]):
            have = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DataFormatError(path, line, fld,
                                  f"expected a list aligned with sentf.{src} "
                                  f"({len(sentf[src])} entries), got {have}")
        for j, lab in enumerate(labels):
            _check_label(path, line, f"{fld}[{j}]", lab)


def read_pretrain_json(path: str, skip: BadRowLog | None = None) -> list[tuple[int, dict]]:
    """Read ``data/lxmert/<split>.json``; returns ``[(line, record), ...]`` of valid records.

    Duplicate ``img_id`` within the file is an error (or a skipped row).
    """
    skip = skip if skip is not None else BadRowLog(False)
    out, seen = [], {}
    for idx, line, rec in iter_json_records(path):
        try:
            validate_pretrain_record(path, line, idx, rec)
            if rec["img_id"] in seen:
                raise DataFormatError(path, line, f"[{idx}].img_id",
                                      f"duplicate img_id {rec['img_id']!r} "
                                      f"(first on line {seen[rec['img_id']]})")
        except DataFormatError as e:
            skip.handle(e)
            continue
        seen[rec["img_id"]] = line
        out.append((line, rec))
    return out


TASK_FIELDS = {
    # name: (required fields with their kinds, optional fields)
    "vqa": ({"question_id": "id", "img_id": "str", "sent": "str"},
            {"label": "label", "answer_type": "str", "question_type": "str"}),
    "gqa": ({"question_id": "id", "img_id": "str", "sent": "str"}, {"label": "label"}),
    "nlvr2": ({"identifier": "str", "img0": "str", "img1": "str", "sent": "str"},
              {"uid": "str", "label": "binary"}),
}


def read_task_json(path: str, task: str, require_label: bool = False,
                   skip: BadRowLog | None = None) -> list[dict]:
    """Read a VQA / GQA / NLVR2 split file, validating every record.

    ``require_label``: the split must carry labels (train / valid); test splits may not.
    Duplicate ``question_id`` (VQA/GQA) or ``identifier`` (NLVR2) is an error.
    """
    if task not in TASK_FIELDS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASK_FIELDS)}")
    required, optional = TASK_FIELDS[task]
    if require_label:
        required = {**required, "label": optional["label"]}
    key = "identifier" if task == "nlvr2" else "question_id"
    skip = skip if skip is not None else BadRowLog(False)
    out, seen = [], {}
    for idx, line, rec in iter_json_records(path):
        try:
            if not isinstance(rec, dict):
                raise DataFormatError(path, line, f"[{idx}]", "expected an object")
            for name, kind in list(required.items()) + list(optional.items()):
                fld = f"[{idx}].{name}"
                if name not in rec:
                    if name in required:
                        raise DataFormatError(path, line, fld, "missing")
                    continue
                v = rec[name]
                if kind == "str":
                    _check_str(path, line, fld, v, allow_empty=name in ("answer_type", "question_type"))
                elif kind == "id":
                    if isinstance(v, bool) or not isinstance(v, (int, str)) or v == "":
                        raise DataFormatError(path, line, fld, f"expected an int or string id, got {v!r}")
                elif kind == "label":
                    _check_label(path, line, fld, v)
                elif kind == "binary":
                    if v not in (0, 1) or isinstance(v, bool):
                        raise DataFormatError(path, line, fld, f"expected 0 or 1, got {v!r}")
            k = rec[key]
            if k in seen:
                raise DataFormatError(path, line, f"[{idx}].{key}",
                                      f"duplicate {key} {k!r} (first on line {seen[k]})")
        except DataFormatError as e:
            skip.handle(e)
            continue
        seen[k] = line
        out.append(rec)
    return out


def read_all_ans(path: str) -> list[dict]:
    """``all_ans.json``: a list of ``{"ans": str, "dsets": [str, ...]}`` with unique answers."""
    out, seen = [], {}
    for idx, line, rec in iter_json_records(path):
        if not isinstance(rec, dict) or "ans" not in rec:
            raise DataFormatError(path, line, f"[{idx}].ans", "missing")
        _check_str(path, line, f"[{idx}].ans", rec["ans"], allow_empty=True)
        dsets = rec.get("dsets", [])
        if not isinstance(dsets, list) or not all(isinstance(d, str) for d in dsets):
            raise DataFormatError(path, line, f"[{idx}].dsets", "expected a list of strings")
        if rec["ans"] in seen:
            raise DataFormatError(path, line, f"[{idx}].ans",
                                  f"duplicate answer {rec['ans']!r} (first at [{seen[rec['ans']]}])")
        seen[rec["ans"]] = idx
        out.append({"ans": rec["ans"], "dsets": dsets})
    return out


def read_ans2label(path: str) -> dict[str, int]:
    """``trainval_ans2label.json``: {answer: label}, labels exactly 0..K-1."""
    d = read_json(path, "answer table")
    if not isinstance(d, dict):
        raise DataFormatError(path, 1, "(file)", "expected {answer: label}")
    for ans, lab in d.items():
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise DataFormatError(path, 1, repr(ans), f"label must be an int, got {lab!r}")
    labels = sorted(d.values())
    if labels != list(range(len(d))):
        raise DataFormatError(path, 1, "(values)", "labels must be exactly 0..K-1, each once")
    return d


def read_label2ans(path: str) -> list[str]:
    """``trainval_label2ans.json``: [answer, ...] indexed by label, unique."""
    d = read_json(path, "answer table")
    if not isinstance(d, list) or not all(isinstance(a, str) for a in d):
        raise DataFormatError(path, 1, "(file)", "expected a list of answer strings")
    if len(set(d)) != len(d):
        dup = next(a for a, c in Counter(d).items() if c > 1)
        raise DataFormatError(path, 1, f"[{d.index(dup)}]", f"duplicate answer {dup!r}")
    return d


def file_fingerprint(path: str) -> dict:
    """Cheap identity of an input file (path, size, mtime) for cache keys."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
