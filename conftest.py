"""The whole suite's settings for parallel runs: ``python -m pytest -q -n auto --dist loadfile`` (pytest-xdist).

- Each worker takes an equal share of the cores: torch's threads in the worker and ``OMP_NUM_THREADS`` for the
  jobs the tests start, unless ``OMP_NUM_THREADS`` is set already. Two workers of two OpenMP threads each on two
  cores spin against each other: a CPU job then runs several times slower, not half as fast.
- ``--dist loadfile`` keeps a file's tests on one worker: the expensive runs are module or session fixtures
  shared by a file's tests, and another distribution would run them once per worker. Other modes are refused.
- The files with the longest runs start first (``LONGEST_FIRST``), so the workers end together.

Without ``-n`` nothing changes: one process, the tests in their own order, every core for each job.
"""
from __future__ import annotations

import os

import pytest
import torch

from lxmert_fast.utils import usable_cores

# Files whose runs take a minute or more on 2 CPU cores, longest first (the quick start's pre-training and fine-tuning,
# the multi-object grounding run, the GPU check's dry runs, the launcher runs).
LONGEST_FIRST = (
    "tests/test_quick_start.py",
    "tests/test_pretrain.py",
    "tests/test_bench.py",
    "tests/test_preemption.py",
    "tests/test_elastic_resume.py",
    "tests/test_runtime.py",
    "tests/test_finetune.py",
    "kernels/tests/test_package.py",
)


def _workers(config) -> tuple[int, bool]:
    """(the xdist workers of this run, whether this process is one of them); (0, False) without xdist. A worker
    knows it from ``config.workerinput`` (not from the environment, which a pytest started by a test inherits)."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return int(workerinput["workercount"]), True
    count = getattr(config.option, "numprocesses", 0) or 0  # an int once xdist has read "auto"
    return (count if isinstance(count, int) else 0), False


def pytest_configure(config):
    workers, is_worker = _workers(config)
    if workers == 0:
        return
    if not is_worker:  # the controller
        dist = getattr(config.option, "dist", "no")
        if dist != "loadfile":
            default = " (pytest-xdist's default with -n)" if dist == "load" else ""
            raise pytest.UsageError(f"--dist {dist}{default}: this suite runs in parallel with --dist loadfile only: "
                                    "python -m pytest -q -n auto --dist loadfile (a file's expensive runs are "
                                    "fixtures its tests share; another mode runs them once per worker)")
        config.option.loadscopereorder = False  # LONGEST_FIRST orders the files, not their numbers of tests
        return
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // workers))))
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the files of LONGEST_FIRST first (a stable sort: the rest keep their order)."""
    if _workers(config)[0] == 0:
        return
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))
