"""The suite's own settings for `pytest -n` (the root conftest.py): a distribution that would run a file's shared
runs once per worker is refused, with the command that works; each worker takes its share of the cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from lxmert_fast.utils import usable_cores
from tests.helpers import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "tests/parallel_probe.py"  # records the threads its test runs with


def _pytest(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_each_worker_takes_its_share_of_the_cores(tmp_path):
    env = {k: v for k, v in child_env().items() if k != "OMP_NUM_THREADS"}
    env["LXMERT_TEST_THREADS_PROBE"] = str(tmp_path / "probe.json")
    proc = _pytest(["-n", "2", "--dist", "loadfile", PROBE], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "probe.json", encoding="utf-8") as fh:
        probe = json.load(fh)
    share = max(1, usable_cores() // 2)
    assert probe == {"torch": share, "omp": str(share), "worker": probe["worker"]} and probe["worker"], probe


def test_xdist_modes_other_than_loadfile_are_refused_with_the_command_that_works():
    proc = _pytest(["-n", "2", "tests/test_flops.py"], child_env())
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # pytest's usage error
    assert "--dist load (pytest-xdist's default with -n)" in proc.stderr, proc.stderr
    assert "python -m pytest -q -n auto --dist loadfile" in proc.stderr, proc.stderr
