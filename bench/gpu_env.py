"""The environment part of the GPU check: versions, the GPU and its clocks, and two measured
ceilings (bf16 matrix rate: the MFU denominator; device copy bandwidth: the elementwise kernels'
ceiling). One row each, appended to GPU_CHECK_ROWS as soon as it is known.

    python bench/gpu_env.py [--rows ROWS] [--dry]

Runs before anything else uses the device, so the ceilings are measured on an idle GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO), str(REPO / "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import (append_row, cpu_cores, git_commit, import_version, measured_matmul_peak,  # noqa: E402
                     median, time_runs)

SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "pstate", "compute_mode", "persistence_mode")
SMI_MINIMAL = ("name", "driver_version", "clocks.sm", "clocks.max.sm")  # if a driver refuses one of the above


def source_fingerprint() -> str:
    """sha256 over the project's Python sources (identifies the tree where git is absent)."""
    h = hashlib.sha256()
    for folder in ("lxmert_fast", "kernels/lxmert_kernels", "bench"):
        for p in sorted((REPO / folder).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def versions_row(dry: bool) -> dict:
    import torch

    row = {"part": "env", "key": "env:versions", "figure": True, "status": "ok", "dry_run": dry,
           "python": platform.python_version(), "executable": sys.executable, "host": platform.node(),
           "cpu_cores": cpu_cores(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "commit": git_commit(), "source_sha256": source_fingerprint(),
           "nvcc": shutil.which("nvcc"), "pythonpath": os.environ.get("PYTHONPATH", "")}
    for name in ("triton", "transformers", "numpy", "matplotlib", "flash_attn", "lxmert_kernels"):
        row[name], err = import_version(name)
        if err:
            row[f"{name}_error"] = err
    row["deepspeed"], err = import_version("deepspeed")
    row["deepspeed_importable"] = err is None
    if err:
        row["deepspeed_error"] = err
    return row


def gpu_row(dry: bool) -> dict:
    import torch

    row = {"part": "env", "key": "env:gpu"}
    if not torch.cuda.is_available():
        return {**row, "figure": False, "no_figure": "unavailable", "dry_run": dry,
                "status": "no figure (unavailable): no CUDA device" + (" (dry run: the GPU is hidden)" if dry else "")}
    p = torch.cuda.get_device_properties(0)
    row.update(figure=True, status="ok", name=p.name, capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
               l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    row["nvidia_smi"] = "not available"
    for fields in (SMI_FIELDS, SMI_MINIMAL):
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as err:
            row["nvidia_smi"] = f"not available: {err}"
            break
        lines = out.stdout.strip().splitlines()
        vals = [v.strip() for v in lines[0].split(",")] if out.returncode == 0 and lines else []
        if len(vals) == len(fields):
            row["nvidia_smi"] = dict(zip(fields, vals))
            break
        row["nvidia_smi"] = f"nvidia-smi rc {out.returncode}: {(out.stdout + out.stderr)[:300]}"
    return row


def peak_row(dry: bool) -> dict:
    import torch

    peak = measured_matmul_peak(quick=not torch.cuda.is_available())  # GPU: bf16 8192^3
    return {**peak, "part": "env", "key": "env:peak_matmul", "figure": True, "status": "ok", "dry_run": dry,
            "note": f"random data, median of {peak['reps']} after {peak['warmup']} warm-ups: the MFU denominator "
                    f"(datasheet: lxmert_fast.flops)"}


def copy_row(dry: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    nbytes = 2**30 if cuda else 2**24
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda" if cuda else "cpu").normal_()
    y = torch.empty_like(x)
    s = median(time_runs(lambda: y.copy_(x), 3 if cuda else 1, 20 if cuda else 3))
    return {"part": "env", "key": "env:copy_bandwidth", "figure": True, "status": "ok", "bytes": nbytes,
            "median_s": s, "tb_per_s": 2 * nbytes / s / 1e12, "dry_run": dry,
            "note": "device-to-device copy of 1 GiB, bytes read + written"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default=os.environ.get("GPU_CHECK_ROWS"))
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1")
    a = ap.parse_args(argv)
    rc = 0
    for make in (versions_row, gpu_row, peak_row, copy_row):
        t0 = time.perf_counter()
        try:
            row = make(a.dry)
        except Exception as err:  # noqa: BLE001
            key = {"versions_row": "env:versions", "gpu_row": "env:gpu", "peak_row": "env:peak_matmul",
                   "copy_row": "env:copy_bandwidth"}[make.__name__]
            row = {"part": "env", "key": key, "figure": False, "no_figure": "error",
                   "status": f"no figure (error): {type(err).__name__}: {err}"[:400]}
            rc = 1
        row["seconds"] = round(time.perf_counter() - t0, 2)
        append_row(a.rows, row)
        brief = {k: row.get(k) for k in ("status", "torch", "triton", "transformers", "deepspeed", "name",
                                         "peak_tflops", "tb_per_s") if row.get(k) is not None}
        print(row["key"], brief, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
