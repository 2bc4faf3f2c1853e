"""The benchmark suite's shared plumbing: the commit, versions and environment of a row, clocks,
memory, the measured peak rate, time limits and JSON rows. Every script in bench/ takes these from
here.

Nothing here imports torch, DeepSpeed or transformers at module import time: bench/gpu_check.py
(stdlib only, it must not touch the device) writes and reads rows through this module, and the
end-to-end part decides the accelerator (DS_ACCELERATOR) before DeepSpeed is first imported.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The LXMERT recipe and the original hardware (LXMERT.md): 670K steps x 256 = 171.5M samples in
# 10 days on 4 Titan Xp = 198.5 samples/s.
RECIPE_SAMPLES = 670_000 * 256
BASELINE_SAMPLES_PER_S = 198.5
BASELINE_DEVICES = 4
BASELINE_NAME = "4x Titan Xp (paper: 10 days)"


# ---------------------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """HEAD's hash, with "-dirty" when the tracked files of the repository differ from it; in a copy
    without .git (the GPU machine), the commit `bench/gpu_check.sh --prepare` wrote into .whl/COMMIT."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        pass
    recorded = REPO / ".whl" / "COMMIT"
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8").strip().splitlines()[0] + " (from .whl/COMMIT)"
    return "unknown (no .git and no .whl/COMMIT)"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:  # noqa: BLE001
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def import_version(module: str) -> tuple[str | None, str | None]:
    """(version, None) when `module` imports, else (None, why not). DeepSpeed is imported with the CPU
    accelerator on a machine without CUDA (importing it picks its accelerator)."""
    try:
        if module == "deepspeed":
            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return str(getattr(importlib.import_module(module), "__version__", "?")), None
    except Exception as err:  # noqa: BLE001  (not installed, or fails to import here)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(world_size: int = 1) -> dict:
    """Hardware, software versions, commit and load: merged into every JSON row of bench/run.py."""
    import torch

    on_gpu = torch.cuda.is_available()
    cores = cpu_cores()
    return {
        "date": utc_now(),
        "host": platform.node(),
        "device_kind": "cuda" if on_gpu else "cpu",
        "hardware": torch.cuda.get_device_name() if on_gpu else f"{cpu_model()} ({cores} cores)",
        "num_devices": world_size,
        "cpu": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": import_version("transformers")[0],
        "deepspeed": import_version("deepspeed")[0],
        "triton": import_version("triton")[0],
        "flash_attn": import_version("flash_attn")[0] if on_gpu else None,
        "commit": git_commit(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------- clocks
def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Times a region: CUDA events on a GPU (read after one synchronize at the end), else a
    synchronised perf_counter. `with timer: ...` then `timer.seconds()`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._pairs = []
        self._wall = []

    def __enter__(self):
        if self.cuda:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._pairs.append([start, None])
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs[-1][1] = end
        else:
            self._wall.append(time.perf_counter() - self._t0)
        return False

    def seconds(self) -> list[float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self._pairs]
        return list(self._wall)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def time_runs(fn, warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn() after `warmup` untimed ones (StepTimer's clock)."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize()
    timer = StepTimer(torch.cuda.is_available())
    for _ in range(reps):
        with timer:
            fn()
    return timer.seconds()


# ---------------------------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """The process's peak RSS so far (resource.getrusage; monotone over the process's life)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryProbe:
    """Peak memory of one variant: torch.cuda.max_memory_allocated on a GPU; on CPU the largest RSS
    sampled at the probe points (after forward / backward / step), next to getrusage's process peak."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_rss = 0
        if cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = current_rss_bytes()

    def sample(self) -> None:
        if not self.cuda:
            self.peak_rss = max(self.peak_rss, current_rss_bytes())

    def fields(self) -> dict:
        if self.cuda:
            import torch

            return {"peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    "peak_mem_kind": "torch.cuda.max_memory_allocated",
                    "mem_at_start_gb": round(self.start / 2**30, 3)}
        return {"peak_mem_gb": round(self.peak_rss / 2**30, 3),
                "peak_mem_kind": "RSS sampled after fwd/bwd/step",
                "mem_at_start_gb": round(self.start / 2**30, 3),
                "process_max_rss_gb": round(max_rss_bytes() / 2**30, 3)}


# ---------------------------------------------------------------------------------------------- peak rate
def measured_matmul_peak(quick: bool = False) -> dict:
    """The device's measured dense matrix rate: bf16 8192^3 on a GPU, fp32 on CPU (2048^3, or
    512^3 with quick); median of several runs after a warm-up. Used as the MFU denominator."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        n, dtype, warmup, reps = (4096, torch.bfloat16, 3, 10) if quick else (8192, torch.bfloat16, 5, 20)
        device = "cuda"
    else:
        n, dtype, warmup, reps = (512, torch.float32, 2, 5) if quick else (2048, torch.float32, 2, 7)
        device = "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_runs(lambda: torch.mm(a, b), warmup, reps)
    med = median(times)
    return {"part": "peak", "what": f"matmul {n}^3 {str(dtype)[6:]}", "n": n, "dtype": str(dtype)[6:],
            "warmup": warmup, "reps": reps, "median_s": med, "peak_tflops": round(2 * n**3 / med / 1e12, 4),
            "min_s": min(times), "max_s": max(times)}


# ---------------------------------------------------------------------------------------------- timeouts
class PartTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM; no limit when None/0 or off
    the main thread). The work in progress is abandoned; the caller records the timeout."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise PartTimeout(f"{what}: timed out after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------- rows
def clean(obj):
    """JSON-safe copy (floats rounded to 6 significant digits, tensors/paths to plain values)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    torch = sys.modules.get("torch")  # a tensor means torch is imported already
    if torch is not None and isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return clean(obj.item())
    return str(obj)


def append_row(path: str | Path | None, row: dict) -> None:
    """One JSON line (`clean`ed) appended to `path` with a single O_APPEND write, so that processes
    appending to one file never interleave; printed to stdout when `path` is None."""
    line = json.dumps(clean(row)) + "\n"
    if path is None:
        sys.stdout.write(line)
        sys.stdout.flush()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict]:
    """The JSON lines of `path` (none when it does not exist); a line cut by a timeout or a kill is skipped."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def short_error(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    # torch.compile errors put the useful line last
    if len(text) > 1 and ("dynamo" in type(err).__module__ or "inductor" in first.lower()):
        first = first + " ... " + text[-1]
    return f"{type(err).__name__}: {first}"[:limit]
