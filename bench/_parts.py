"""The kernel and data-loader parts of the suite (bench/run.py), around the project's own
benchmark modules: bench/bench_kernels.py and bench/bench_data.py."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import append_row, short_error

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


# ---------------------------------------------------------------------------------------------- kernels
def run_kernels(out: Path, quick: bool, env: dict, log=print, batches=None, use_compile: bool = True) -> list[dict]:
    """bench_kernels on a GPU (bf16; batches 32 / 128 / 512, or 32 with quick). Without a GPU the
    Triton kernels only run in the interpreter: a smoke test of the script at one tiny shape
    (batch 1, 2 heads, one timed run), marked "interpreter smoke test", never a measurement."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import bench_kernels

    path = out / "bench_kernels.jsonl"
    path.unlink(missing_ok=True)

    def keep(rows):
        for r in rows:
            r["part"] = "kernels"
            r.setdefault("measurement", "cuda events" if torch.cuda.is_available() else "interpreter smoke test")
            r["batch"] = batch_of(r)
            append_row(path, r)
        return rows

    if not torch.cuda.is_available():
        return keep(_interpreter_smoke(bench_kernels, path, log))
    if batches is None:
        batches = [32] if quick else [32, 128, 512]
    rows = []
    # one batch size at a time, each kept as soon as it is done (a timeout keeps the finished ones)
    with tempfile.TemporaryDirectory(prefix="lxmert_bench_kernels_") as tmp:
        for b in batches:
            rows += keep(bench_kernels.run(tmp, quick=quick, batches=[b], use_compile=use_compile))
    return rows


def _interpreter_smoke(bench_kernels, path: Path, log) -> list[dict]:
    lk = bench_kernels._import_kernels()
    rec = bench_kernels.Recorder(bench_kernels.environment(), 1, 1)
    dev, dt, modes, drop = "cpu", torch.float32, ("fwd", "fwd+bwd"), (0.0,)
    try:
        bench_kernels.bench_self_attention(lk, rec, [1], dt, dev, modes, drop, 2)
        bench_kernels.bench_cross_pair(lk, rec, [1], dt, dev, modes, drop, 2)
        bench_kernels.bench_layer_norm(lk, rec, [1], dt, dev, modes, False)
        bench_kernels.bench_bias_gelu(lk, rec, [1], dt, dev, modes, False)
    except (AttributeError, TypeError) as err:  # bench_kernels' internals moved: its own quick mode
        log(f"kernels: falling back to bench_kernels.run(quick=True) ({short_error(err)})")
        return bench_kernels.run(str(path.parent), quick=True)
    return rec.rows


def batch_of(row: dict):
    """The batch size of a kernel row, from its shape ("B32 ..." or "M<B*56> ...")."""
    shape = str(row.get("shape", ""))
    for tok in shape.split():
        if tok.startswith("B") and tok[1:].isdigit():
            return int(tok[1:])
        if tok.startswith("M") and tok[1:].isdigit():
            return int(tok[1:]) // 56  # 20 tokens + 36 objects per sample
    return None


# ---------------------------------------------------------------------------------------------- data
def run_data(out: Path, quick: bool, env: dict, workers: int | None = None, cache: str | None = None,
             log=print) -> list[dict]:
    """bench/bench_data.py on the demo world: TSV -> store conversion MB/s, loader samples/s
    (raw batches through make_pretrain_loader's worker processes) and batch masking samples/s on
    CPU and, with a GPU, on the GPU."""
    import bench_data
    from lxmert_fast.data.demo import ensure_demo_data

    images = 64 if quick else 2000
    batch = 16 if quick else 256
    batches = 4 if quick else 40
    if workers is None:
        workers = 1 if quick else max(1, min(8, (os.cpu_count() or 2) // 2))
    cache = cache or os.path.join(tempfile.gettempdir(), "lxmert_fast_demo")
    t0 = time.perf_counter()
    root = ensure_demo_data(cache, images=images)
    demo_s = time.perf_counter() - t0
    masking = [("cpu", 3 if quick else 20)] + ([("cuda", 5 if quick else 50)] if torch.cuda.is_available() else [])
    store = tempfile.mkdtemp(prefix="lxmert_bench_store_")
    try:
        rows = bench_data.measure(root, store, workers=workers, batch=batch, batches=batches,
                                  warmup=1 if quick else 3, masking=masking)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    path = out / "data.jsonl"
    path.unlink(missing_ok=True)
    for r in rows:
        r.update(part="data", demo_images=images, demo_world_s=round(demo_s, 2))
        append_row(path, {**env, **r})
    return rows
