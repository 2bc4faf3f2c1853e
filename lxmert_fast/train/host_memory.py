"""The training process's host memory: Python's cyclic garbage collector on a schedule, and glibc's malloc told
to keep the blocks a CPU step frees.

- `ScheduledGC`: the automatic collector pauses the loop whenever enough container objects have been allocated,
  and a step allocates many; inside the training loop it is off, and generations 0 and 1 are collected every
  ``--gc_every`` steps instead (torchtitan's practice). Reference cycles are still freed, on schedule.
- `keep_freed_host_memory` (CPU jobs): a step allocates and frees the same large activations every time. glibc's
  default returns freed memory at the top of the heap to the kernel once it passes a threshold that it adapts
  as it goes, and the next step faults the pages in again; on the demo model that was half of the process's
  system time. With a fixed 32 MiB mmap threshold and a 1 GiB trim threshold the blocks stay in the heap and are
  reused, for a little more resident memory at the peak (6-8% on the demo run; bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import gc
from typing import Optional

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20   # glibc's largest: blocks above it are mapped and unmapped each time
TRIM_THRESHOLD_BYTES = 1 << 30    # return free heap memory to the kernel only above this much


class ScheduledGC:
    """Between `start()` and `stop()` the automatic collector is off and `step(n)` collects
    generations 0 and 1 when ``n`` is a multiple of ``every``; `stop()` leaves the collector as `start()` found it.
    ``every=0``: the automatic collector stays on (Python's own schedule) and `step` does nothing."""

    def __init__(self, every: int):
        if every < 0:
            raise ValueError(f"--gc_every must be 0 (Python's own collector) or a number of steps, got {every}")
        self.every = every
        self._was_enabled: Optional[bool] = None

    def start(self) -> None:
        if self.every and self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.collect()  # the loop starts from a clean heap
            gc.disable()

    def step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(1)

    def stop(self) -> None:
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None


def keep_freed_host_memory() -> Optional[str]:
    """Tell glibc's malloc to keep freed blocks up to 32 MiB in the heap (see the module's docstring). Returns
    None when done, else why it could not be (not glibc: musl or macOS keep their own policies)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return "the C library has no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "glibc's mallopt refused the thresholds"
    return None
