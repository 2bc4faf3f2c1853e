"""A checkpoint tag's manifest: what a complete tag holds, written last, checked before the tag is trusted.

``manifest.json`` in a tag directory lists every other file of the tag (paths relative to it), its size in
bytes and the CRC-32 of each 64 MiB chunk. It is written after every rank's files are on disk (and
fsync'ed), so a tag without one is a save that did not finish; at resume a file missing, shorter, longer
or with other bytes than the manifest says marks the tag damaged.

CRC-32 (zlib) rather than a cryptographic hash: the manifest guards against truncation and corruption
(an interrupted copy, a failing disk), not against tampering; zlib's CRC-32 reads about 1.2-1.5 GB/s
on a 2-core x86 CPU against about 0.65 GB/s for SHA-256 (bench/RESULTS.md), and both release the GIL,
so chunks are checked by several threads at once.

Tags written before manifests existed (`verify_legacy`): every ``*.pt`` that is a zip archive (torch's
format since 1.6) must pass the CRC-32 of each of its members (``zipfile.testzip``), every ``*.json``
must parse.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import zipfile
import zlib
from typing import Optional

from lxmert_fast.utils import atomic_write_text, usable_cores

MANIFEST_FILE = "manifest.json"
FORMAT = "lxmert-fast checkpoint manifest"
VERSION = 1
CHUNK_BYTES = 64 << 20


def _threads() -> int:
    return max(1, min(8, usable_cores()))


def _chunk_crc(path: str, offset: int, length: int) -> str:
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            block = fh.read(min(left, 8 << 20))
            if not block:
                break  # shorter than expected: the sizes are compared separately
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return f"{crc:08x}"


def _crcs(paths_sizes: list[tuple[str, int]]) -> list[list[str]]:
    """The chunk CRCs of each (path, size), the chunks of all files spread over a thread pool."""
    jobs = [(i, path, off, min(CHUNK_BYTES, size - off)) for i, (path, size) in enumerate(paths_sizes)
            for off in range(0, size, CHUNK_BYTES)]
    out: list[list[str]] = [[] for _ in paths_sizes]
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
        crcs = list(pool.map(lambda job: _chunk_crc(*job[1:]), jobs))
    for (i, *_), crc in zip(jobs, crcs):
        out[i].append(crc)
    return out


def tag_files(tag_dir: str) -> list[str]:
    """Every file under ``tag_dir`` but the manifest, relative, sorted."""
    found = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST_FILE:
                found.append(rel)
    return sorted(found)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(tag_dir: str, extra: Optional[dict] = None) -> dict:
    """Flush every file of the tag to disk, then write its manifest (atomically); returns the manifest."""
    rels = tag_files(tag_dir)
    paths = [os.path.join(tag_dir, rel) for rel in rels]
    for path in paths:  # on disk before the manifest says the tag is complete
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    for root, _, _ in os.walk(tag_dir):
        _fsync_dir(root)
    sizes = [os.path.getsize(p) for p in paths]
    crcs = _crcs(list(zip(paths, sizes)))
    manifest = {"format": FORMAT, "version": VERSION, "checksum": "crc32", "chunk_bytes": CHUNK_BYTES,
                **(extra or {}),
                "files": [{"path": rel, "bytes": size, "crc32": c} for rel, size, c in zip(rels, sizes, crcs)]}
    atomic_write_text(os.path.join(tag_dir, MANIFEST_FILE), json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(tag_dir)
    return manifest


def read_manifest(tag_dir: str) -> dict:
    """The manifest (raises ValueError naming what is wrong with it)."""
    path = os.path.join(tag_dir, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"{MANIFEST_FILE} cannot be read ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("checksum") != "crc32" \
            or not isinstance(manifest.get("files"), list):
        raise ValueError(f"{MANIFEST_FILE} is not an {FORMAT} (version {VERSION}, crc32)")
    return manifest


def has_manifest(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, MANIFEST_FILE))


def verify(tag_dir: str) -> Optional[str]:
    """None if every file the manifest lists is there with its size and CRCs; else the first problem found,
    naming the file."""
    try:
        manifest = read_manifest(tag_dir)
        chunk = int(manifest["chunk_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        return str(err)
    if chunk != CHUNK_BYTES:
        return f"{MANIFEST_FILE}: chunks of {chunk} bytes, this version reads {CHUNK_BYTES}"
    entries = manifest["files"]
    for entry in entries:
        path = os.path.join(tag_dir, entry["path"])
        if not os.path.isfile(path):
            return f"{entry['path']} is missing"
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            what = "empty" if size == 0 else ("truncated" if size < entry["bytes"] else "longer")
            return f"{entry['path']} has {size:,} bytes, the manifest says {entry['bytes']:,} ({what})"
    crcs = _crcs([(os.path.join(tag_dir, e["path"]), e["bytes"]) for e in entries])
    for entry, got in zip(entries, crcs):
        for i, (want, have) in enumerate(zip(entry["crc32"], got)):
            if want != have:
                start = i * CHUNK_BYTES
                return (f"{entry['path']}: bytes {start:,}-{min(start + CHUNK_BYTES, entry['bytes']):,} differ from "
                        f"what was written (CRC-32 {have}, the manifest says {want})")
    return None


def verify_legacy(tag_dir: str) -> Optional[str]:
    """A tag of an earlier version (no manifest): torch's zip archives must pass their own CRC-32s, JSON must
    parse. None if they do; else the problem, naming the file."""
    files = tag_files(tag_dir)
    if not files:
        return "it holds no files"
    for rel in files:
        path = os.path.join(tag_dir, rel)
        if rel.endswith(".pt"):
            with open(path, "rb") as fh:
                head = fh.read(4)
            if not head:
                return f"{rel} is empty"
            if head != b"PK\x03\x04":
                continue  # torch's legacy (non-zip) serialisation has no checksums: its load is the test
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                return f"{rel} is not a complete archive ({err})"
            if bad is not None:
                return f"{rel}: its member {bad} fails its CRC-32"
        elif rel.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as fh:
                    json.load(fh)
            except (OSError, ValueError) as err:
                return f"{rel} cannot be read ({err})"
    return None
