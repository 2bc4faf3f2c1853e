"""Write feature records the way each tool writes them: sample files in every supported layout (the layout
tests, the conversion benchmark, or a file to try a reader on). Each writer takes :class:`~lxmert_fast.data.formats.ObjRow` records (the
TSV reader's) and lays them out as the named tool's script does, field names, dtypes, shapes and
side files included.
"""

from __future__ import annotations

import os
import pickle
import re

import numpy as np

from lxmert_fast.data.formats import DEFAULT_NUM_OBJ_CLASSES


def coco_int_id(img_id: str) -> int:
    """``COCO_train2014_000000000009`` -> 9 (the integer ids bottom-up-attention-vqa keys its files by)."""
    m = re.fullmatch(r"COCO_[a-z]+\d+_(\d+)", img_id)
    if not m:
        raise ValueError(f"not a COCO image id: {img_id!r}")
    return int(m.group(1))


def write_bua_npz(folder: str, rows, *, info: bool = True, attributes: bool = True,
                  transpose: bool = False) -> str:
    """bottom-up-attention.pytorch ``save_roi_features``: ``np.savez_compressed(<dir>/<image name>,
    x=, bbox=, num_bbox=, image_h=, image_w=, info={...})``; ``transpose``: x as (2048, N) (MCAN's
    releases); ``info=False``: no info entry."""
    os.makedirs(folder, exist_ok=True)
    for r in rows:
        d = {"x": r.feats_nd.T.copy() if transpose else r.feats_nd, "bbox": r.boxes_n4, "num_bbox": r.num_boxes,
             "image_h": r.img_h, "image_w": r.img_w}
        if info:
            inf = {"image_id": r.img_id, "image_h": r.img_h, "image_w": r.img_w, "num_boxes": r.num_boxes,
                   "objects_id": r.obj_ids_n.copy(), "objects_conf": r.obj_conf_n.copy()}
            if attributes:
                inf.update(attrs_id=r.attr_ids_n.copy(), attrs_conf=r.attr_conf_n.copy())
            d["info"] = inf
        np.savez_compressed(os.path.join(folder, r.img_id), **d)
    return folder


def write_vlt5_h5(path: str, rows, *, labels: bool = True) -> str:
    """VL-T5 ``tsv_to_h5.py``: one group per img_id with features, boxes, obj_id, obj_conf, attr_id,
    attr_conf, img_h, img_w."""
    import h5py  # optional: the [formats] extra

    with h5py.File(path, "w") as f:
        for r in rows:
            g = f.create_group(r.img_id)
            g["features"] = r.feats_nd
            g["boxes"] = r.boxes_n4
            if labels:
                g["obj_id"], g["obj_conf"] = r.obj_ids_n, r.obj_conf_n
                g["attr_id"], g["attr_conf"] = r.attr_ids_n, r.attr_conf_n
            g["img_h"], g["img_w"] = r.img_h, r.img_w
    return path


def spatial_features(boxes_n4: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """bottom-up-attention-vqa's (N, 6): x1/w, y1/h, x1/w + (x2-x1)/w, y1/h + (y2-y1)/h, (x2-x1)/w, (y2-y1)/h,
    in float32 as its converter computes them (float image_w / image_h)."""
    b = np.asarray(boxes_n4, np.float32)
    w, h = float(img_w), float(img_h)
    sw, sh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
    sx, sy = b[:, 0] / w, b[:, 1] / h
    return np.stack([sx, sy, sx + sw, sy + sh, sw, sh], axis=1).astype(np.float32)


def write_butd_h5(path: str, rows, *, adaptive: bool = False, spatial: bool = True, shuffle: bool = True,
                  pickle_protocol: int = 2) -> str:
    """bottom-up-attention-vqa ``detection_features_converter.py`` (``adaptive``: ban-vqa's
    ``adaptive_detection_features_converter.py``): image_features, image_bb, spatial_features (and
    pos_boxes), plus ``<name>_imgid2idx.pkl`` {int COCO id: index}. ``shuffle``: the images' rows in
    another order than the records' (the converter writes them in the TSV's order, which need not be
    the id map's)."""
    import h5py  # optional: the [formats] extra

    order = list(range(len(rows)))
    if shuffle:
        order = order[1::2] + order[0::2]
    with h5py.File(path, "w") as f:
        if adaptive:
            total = sum(rows[i].num_boxes for i in order)
            feats = f.create_dataset("image_features", (total, rows[0].feats_nd.shape[1]), "f")
            bb = f.create_dataset("image_bb", (total, 4), "f")
            sp = f.create_dataset("spatial_features", (total, 6), "f") if spatial else None
            pos = f.create_dataset("pos_boxes", (len(rows), 2), dtype="int32")
            start = 0
            for idx, i in enumerate(order):
                r = rows[i]
                end = start + r.num_boxes
                pos[idx] = [start, end]
                feats[start:end], bb[start:end] = r.feats_nd, r.boxes_n4
                if sp is not None:
                    sp[start:end] = spatial_features(r.boxes_n4, r.img_h, r.img_w)
                start = end
        else:
            k, d = rows[0].num_boxes, rows[0].feats_nd.shape[1]
            feats = f.create_dataset("image_features", (len(rows), k, d), "f")
            bb = f.create_dataset("image_bb", (len(rows), k, 4), "f")
            sp = f.create_dataset("spatial_features", (len(rows), k, 6), "f") if spatial else None
            for idx, i in enumerate(order):
                r = rows[i]
                feats[idx], bb[idx] = r.feats_nd, r.boxes_n4
                if sp is not None:
                    sp[idx] = spatial_features(r.boxes_n4, r.img_h, r.img_w)
    id2idx = {coco_int_id(rows[i].img_id): idx for idx, i in enumerate(order)}
    with open(os.path.splitext(path)[0] + "_imgid2idx.pkl", "wb") as fh:
        pickle.dump(id2idx, fh, protocol=pickle_protocol)
    return path


def mmf_info(r, *, background: bool = False, extra_rows: int = 0) -> dict:
    """MMF's info dict of a record: bbox, num_boxes, objects, cls_prob, image_width, image_height.
    ``background``: 1601 columns, column 0 the background and objects 1-based (``--background``);
    ``extra_rows``: rows beyond num_boxes (zero-score boxes kept by --num_features)."""
    n = r.num_boxes
    c = DEFAULT_NUM_OBJ_CLASSES + (1 if background else 0)
    objects = r.obj_ids_n + (1 if background else 0)
    prob = np.zeros((n + extra_rows, c), np.float32)
    prob[np.arange(n), objects] = r.obj_conf_n
    pad = lambda a: np.concatenate([a, np.zeros((extra_rows,) + a.shape[1:], a.dtype)]) if extra_rows else a  # noqa: E731
    return {"bbox": pad(r.boxes_n4), "num_boxes": n, "objects": pad(objects), "cls_prob": prob,
            "image_width": r.img_w, "image_height": r.img_h}


def write_mmf_npy(folder: str, rows, *, background: bool = False, vilbert: bool = False,
                  extra_rows: int = 0) -> str:
    """MMF ``extract_features_vmb.py``: ``<name>.npy`` features + ``<name>_info.npy`` (a dict);
    ``vilbert``: ViLBERT's ``extract_features.py``, one ``<name>.npy`` dict with the features inside."""
    os.makedirs(folder, exist_ok=True)
    for r in rows:
        info = mmf_info(r, background=background, extra_rows=extra_rows)
        feats = np.concatenate([r.feats_nd, np.ones((extra_rows, r.feats_nd.shape[1]), np.float32)]) \
            if extra_rows else r.feats_nd
        if vilbert:
            info.update(image_id=r.img_id, features=feats)
            np.save(os.path.join(folder, r.img_id + ".npy"), info)
        else:
            np.save(os.path.join(folder, r.img_id + ".npy"), feats)
            np.save(os.path.join(folder, r.img_id + "_info.npy"), info)
    return folder


def write_mmf_lmdb(path: str, rows, *, subfolder: str = "") -> str:
    """MMF ``lmdb_conversion.py --mode convert``: a pickled dict per key (``feature_path``, features,
    image_height, image_width, num_boxes, objects, cls_prob, bbox) and ``keys``, the pickled key list."""
    import lmdb  # optional: the [formats] extra

    env = lmdb.open(path, map_size=1 << 30)
    keys = []
    with env.begin(write=True) as txn:
        for r in rows:
            rel = f"{subfolder}/{r.img_id}" if subfolder else r.img_id
            info = mmf_info(r)
            item = {"feature_path": rel, "features": r.feats_nd, "image_height": info["image_height"],
                    "image_width": info["image_width"], "num_boxes": info["num_boxes"], "objects": info["objects"],
                    "cls_prob": info["cls_prob"], "bbox": info["bbox"]}
            keys.append(rel.encode())
            txn.put(rel.encode(), pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(keys))
    env.close()
    return path
