"""Record the Triton kernel launches of a test run: one JSON line per compilation (``launch_keys``).

As a pytest plugin (``kernels/tools`` on ``PYTHONPATH``)::

    python -m pytest -m gpu -q -p launch_recorder --record-launches launches.jsonl [--as-on-sm90]
    python kernels/tools/compile_check.py --launches launches.jsonl --fresh-cache   # build each for sm_90, timed

or in code: ``with recording(run=False) as rows: kernel[grid](...)`` (``rows()`` gives the rows).

A row is a kernel (name, module, file) with the specialisation Triton's CUDA launcher compiles it
for, the number of launches that shared it, the first test that made it (``test``: the one that
pays for the compilation in a run) and every test that made it (``tests``). On a GPU the rows are
the compilations the run made. On a CPU (Triton's interpreter) they are those of the CPU run, unless
``--as-on-sm90`` makes the host code choose what it chooses on an sm_90 GPU, so that the rows are
(an estimate of) the compilations a GPU run of the same selection makes:

* the kernel tests' cases in every dtype, as on a GPU (``_helpers.ON_GPU``);
* the ops' host code as compiled: heuristics-table configurations, GPU block sizes, 4 x 132
  persistent programs (an H100 SXM's or H200's SMs); CPU tensors stand for CUDA tensors;
* each launch recorded with the flags a GPU gets (``COMPUTE_F32`` only for fp32 inputs) and run in
  the interpreter with ``COMPUTE_F32`` (the interpreter computes low precision wrongly).

What it cannot count: tests that need CUDA and skip on a CPU, and what a test does after it fails
(a test that checks the refusal of CPU tensors fails under ``--as-on-sm90``; the rows before stay valid).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

KERNELS_DIR = Path(__file__).resolve().parents[1]
SM90_PROGRAMS = 4 * 132  # num_programs_hint on a 132-SM GPU


@contextlib.contextmanager
def recording(run: bool = True, rewrite_kwargs=None, current_test=lambda: None):
    """Record every kernel launch (compiled or interpreted) while the block runs; yields ``rows()``,
    the distinct compilations so far. ``run=False`` records without launching; ``rewrite_kwargs``
    changes the keyword arguments of the launch that runs (not of the one recorded)."""
    # imported here, not at the top: as a plugin this module loads before conftest.py chooses the
    # interpreter, and Triton decides it when its own @jit functions are defined
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import launch_keys

    rows: dict = {}
    real_runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def patched(real_run):
        def run_(self, *args, grid, warmup=False, **kwargs):
            if not warmup:
                row = launch_keys.launch_row(self, args, kwargs)
                kept = rows.setdefault(launch_keys.row_key(row), dict(row, launches=0, test=current_test(), tests=[]))
                kept["launches"] += 1
                if current_test() not in kept["tests"]:
                    kept["tests"].append(current_test())
            if not run:
                return None
            return real_run(self, *args, grid=grid, warmup=warmup,
                            **(rewrite_kwargs(kwargs) if rewrite_kwargs else kwargs))
        return run_

    for cls, real_run in real_runs.items():
        cls.run = patched(real_run)
    try:
        yield lambda: list(rows.values())
    finally:
        for cls, real_run in real_runs.items():
            cls.run = real_run


def _compute_f32(kwargs):
    return {**kwargs, "COMPUTE_F32": True} if "COMPUTE_F32" in kwargs else kwargs


@contextlib.contextmanager
def host_code_as_on_sm90(monkeypatch: pytest.MonkeyPatch):
    """Make lxmert_kernels' host code and the kernel tests' cases what they are on an sm_90 GPU while
    the kernels run in the interpreter (see the module docstring)."""
    core = importlib.import_module("lxmert_kernels._attention_core")
    if not core.INTERPRETED:
        raise pytest.UsageError("--as-on-sm90 stands in for a GPU where the kernels run in Triton's interpreter; "
                                "on a GPU, record the real launches without it")
    monkeypatch.syspath_prepend(str(KERNELS_DIR / "tests"))
    helpers = importlib.import_module("_helpers")  # the module the kernel tests import (prepend import mode),
    monkeypatch.setattr(helpers, "ON_GPU", True)   # imported before INTERPRETED changes: DEVICE stays the CPU
    ops = [importlib.import_module(f"lxmert_kernels.{name}")
           for name in ("flash_attention", "cross_attention", "layer_norm", "gelu")]
    for module in (core, ops[2], ops[3]):
        monkeypatch.setattr(module, "INTERPRETED", False)
    for module in ops:
        real_check = module.check_device
        monkeypatch.setattr(module, "check_device", lambda interpreted, *t, _real=real_check: _real(True, *t))
    for module in (ops[2], ops[3]):
        monkeypatch.setattr(module, "num_programs_hint", lambda device, interpreted: SM90_PROGRAMS)
    yield


class LaunchRecorder:
    """The plugin's session object: records from configure to unconfigure, writes the rows."""

    def __init__(self, path: str, as_on_sm90: bool) -> None:
        self.path = Path(path)
        self.as_on_sm90 = as_on_sm90
        self.stack = contextlib.ExitStack()
        self.nodeid = None
        self.rows = None

    def start(self) -> None:
        if self.as_on_sm90:
            self.stack.enter_context(host_code_as_on_sm90(self.stack.enter_context(pytest.MonkeyPatch.context())))
        self.rows = self.stack.enter_context(recording(rewrite_kwargs=_compute_f32 if self.as_on_sm90 else None,
                                                       current_test=lambda: self.nodeid))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.nodeid = item.nodeid
        try:
            return (yield)
        finally:
            self.nodeid = None

    def pytest_terminal_summary(self, terminalreporter):
        rows = self.rows()
        by_kernel = Counter(r["kernel"] for r in rows)
        terminalreporter.write_line(
            f"launch_recorder: {sum(r['launches'] for r in rows)} launches, {len(rows)} distinct compilations"
            f"{' (as on sm_90)' if self.as_on_sm90 else ''} -> {self.path}")
        for kernel, n in sorted(by_kernel.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"  {n:4d}  {kernel}")

    def finish(self) -> None:
        rows = self.rows()
        self.stack.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def pytest_addoption(parser):
    group = parser.getgroup("launch_recorder", "record Triton kernel launches (kernels/tools/launch_recorder.py)")
    group.addoption("--record-launches", metavar="FILE", default=None,
                    help="write one JSON line per distinct kernel compilation the run launches")
    group.addoption("--as-on-sm90", action="store_true", default=False,
                    help="on CPU (interpreter): host code and test cases as on an sm_90 GPU")


def pytest_configure(config):
    path = config.getoption("record_launches")
    if path is None:
        if config.getoption("as_on_sm90"):
            raise pytest.UsageError("--as-on-sm90 needs --record-launches FILE")
        return
    recorder = LaunchRecorder(path, config.getoption("as_on_sm90"))
    recorder.start()
    config.pluginmanager.register(recorder, "launch_recorder_session")


def pytest_unconfigure(config):
    recorder = config.pluginmanager.get_plugin("launch_recorder_session")
    if recorder is not None:
        recorder.finish()


if __name__ == "__main__":
    sys.exit("launch_recorder is a pytest plugin: python -m pytest -p launch_recorder --record-launches FILE")
