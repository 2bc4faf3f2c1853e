"""What every part of the benchmark shares: the environment record, the one timing helper, peak memory,
and JSON rows.

Timing (`time_calls`): the callables of a comparison are timed in interleaved rounds (A B A B ...), so a
drift of the machine's load hits every contender alike; on a GPU each call sits between two CUDA events,
read after one synchronisation, on a CPU between two reads of a clock. A kernel on a GPU is timed by
`triton.testing.do_bench` instead (`time_kernel`: L2 flushed, median). Medians everywhere.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lxmert_fast.utils import usable_cores

REPO = Path(__file__).resolve().parents[1]

# The original recipe and hardware (LXMERT.md): 670K steps x 256 samples in 10 days on 4 Titan Xp.
RECIPE_SAMPLES = 670_000 * 256
BASELINE_SAMPLES_PER_S = 198.5
BASELINE = "4x Titan Xp (paper: 10 days)"


# ---------------------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ; in a copy without .git, what `bench/gpu_check.sh
    --prepare` recorded in .whl/COMMIT."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    recorded = REPO / ".whl" / "COMMIT"
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8").split()[0] + " (.whl/COMMIT)"
    return "unknown"


def import_error(module: str) -> Optional[str]:
    """None when ``module`` imports, else why not (DeepSpeed picks its accelerator as it is imported: the
    CPU one on a machine without CUDA)."""
    if module == "deepspeed" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001  (missing, or broken here: both are answers)
        return short_error(err)
    return None


def version(module: str) -> Optional[str]:
    return None if import_error(module) else str(getattr(sys.modules[module], "__version__", "?"))


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return platform.machine()


def environment() -> dict:
    """The one record of where a figure was measured: hardware, versions, commit, date, load."""
    cuda = torch.cuda.is_available()
    cores = usable_cores()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": "cuda" if cuda else "cpu",
           "hardware": torch.cuda.get_device_name() if cuda else f"{cpu_name()} ({cores} cores)",
           "cpu": cpu_name(), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": version("triton"), "transformers": version("transformers"),
           "deepspeed": version("deepspeed"), "deepspeed_error": import_error("deepspeed"),
           "commit": git_commit(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        env.update(gpu_memory_gb=round(total / 2**30, 1), gpu_free_gb=round(free / 2**30, 1))
    return env


# ---------------------------------------------------------------------------------------------- timing
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each of ``fns``, ``rounds`` interleaved rounds after ``warmup`` untimed ones
    (see the module's docstring)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize()
    cuda = torch.cuda.is_available()
    events: dict[str, list] = {name: [] for name in fns}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        seconds = {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in events.items()}
    return seconds


def time_kernel(fn: Callable[[], object], rounds: int) -> float:
    """Milliseconds of one call of ``fn``: `triton.testing.do_bench` on a GPU, else the median of
    ``rounds`` calls (`time_calls`)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench  # on a GPU triton is there (the kernels need it)

        return float(do_bench(fn, warmup=25, rep=max(25, 4 * rounds), return_mode="median"))
    return 1e3 * median(time_calls({"fn": fn}, rounds)["fn"])


def median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def peak_row(quick: bool = False) -> dict:
    """The env:peak row: the device's measured dense matrix rate (the MFU denominator), bf16 8192^3 on a GPU
    (4096^3 quick), fp32 2048^3 on a CPU (512^3 quick)."""
    cuda = torch.cuda.is_available()
    n = (4096 if quick else 8192) if cuda else (512 if quick else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype)
    b = torch.randn_like(a)
    ms = time_kernel(lambda: torch.mm(a, b), 3 if quick else 10)
    del a, b
    if cuda:
        torch.cuda.empty_cache()  # the coordinator keeps running beside the workers: its cache freed
    return {"part": "env", "key": "env:peak", "status": "ok", "what": f"matmul {n}^3 {str(dtype)[6:]}",
            "peak_tflops": round(2 * n**3 / (ms * 1e-3) / 1e12, 3)}


# ops that only make a new view of a tensor: no kernel on a GPU
VIEW_OPS = frozenset({"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::transpose",
                      "aten::t", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select",
                      "aten::slice", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::detach",
                      "aten::alias", "aten::narrow", "aten::chunk", "aten::lift_fresh", "aten::expand_as",
                      "aten::view_as", "aten::flatten", "aten::contiguous", "aten::_reshape_alias",
                      "aten::unflatten", "aten::movedim", "aten::swapaxes"})


def dispatcher_calls(fn: Callable[[], object]) -> int:
    """The non-view aten calls at the top of the dispatcher while ``fn()`` runs (torch's profiler; the calls
    an op makes itself are not counted): the host work a GPU step pays per launch. A compiled graph's
    generated kernels are not aten calls; the aten ops its code calls (matrix products ...) are."""
    from torch.profiler import ProfilerActivity, profile  # the profiler: only when counting

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    spans = sorted((e.time_range.start, e.time_range.end, e.name, e.thread) for e in prof.events()
                   if e.name.startswith("aten::"))
    count, open_until = 0, {}
    for start, end, name, thread in spans:
        if start < open_until.get(thread, -1):
            continue  # inside an earlier top-level call on this thread
        open_until[thread] = end
        count += name not in VIEW_OPS
    return count


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory since `reset`: the CUDA caching allocator's peak on a GPU, the process's RSS
    high-water mark on a CPU (monotone over the process's life: one variant per process is exact)."""

    def reset(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def fields(self) -> dict:
        if torch.cuda.is_available():
            return {"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "peak_mem_kind": "torch.cuda.max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mem_gb": round(rss / 2**30, 2), "peak_mem_kind": "process RSS high-water mark"}


# ---------------------------------------------------------------------------------------------- rows
def clean(obj):
    """A JSON-safe copy: floats to 6 significant digits (NaN and inf to null), tensors to numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return clean(obj.item())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def append_row(path: Path, row: dict) -> None:
    """One JSON line appended with a single O_APPEND write: processes appending to one file never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(clean(row)) + "\n").encode())
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict]:
    """The rows of ``path`` (none if it does not exist); a line cut short by a kill is left out."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def short_error(err: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and "dynamo" in type(err).__module__:  # torch.compile puts the useful line last
        text += " ... " + lines[-1]
    return f"{type(err).__name__}: {text}"[:limit]


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
