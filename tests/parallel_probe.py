"""Run only by tests/test_parallel_runs.py, in a pytest of its own (not a test_*.py file: the suite does not
collect it): records the threads of the process its test runs in."""
from __future__ import annotations

import json
import os

import torch


def test_record_this_processs_threads():
    with open(os.environ["LXMERT_TEST_THREADS_PROBE"], "w", encoding="utf-8") as fh:
        json.dump({"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                   "worker": os.environ.get("PYTEST_XDIST_WORKER")}, fh)
