"""Where the kernel tests run: on CUDA when the machine has a CUDA device, else in Triton's interpreter.

Triton decides interpreter or compiler when the ``@triton.jit`` decorators run (at the import of
lxmert_kernels), so the choice is made here, before any test module imports the kernels, from the
machine alone: with CUDA the kernels are compiled and the tests put their tensors on CUDA
(``_helpers.DEVICE``); without it ``TRITON_INTERPRET=1`` runs them on CPU tensors. No environment
variable changes what a test means: ``TRITON_INTERPRET=1`` on a machine with CUDA is refused (hide
the GPUs with ``CUDA_VISIBLE_DEVICES=`` to run the interpreter there).

Markers (also in the repository's pytest.ini): ``gpu``, the tests that run kernels or the model on
CUDA when it is present (``python -m pytest -m gpu``); ``autotune``, runs of the autotuning
candidates, which run only when selected (``-m autotune``).
"""
import os
import sys
from pathlib import Path

import torch

if torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        raise RuntimeError("kernels/tests: TRITON_INTERPRET is set on a machine with CUDA; the tests run the kernels "
                           "compiled on CUDA there (unset it, or hide the GPUs with CUDA_VISIBLE_DEVICES= to run "
                           "the interpreter)")
else:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# test the source tree, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARKERS = (
    "gpu: runs kernels or the model on CUDA when the machine has it (the interpreter on CPU otherwise)",
    "autotune: benchmarks autotuning candidates (GPU only); runs only when selected with -m autotune",
)


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    """Autotuning runs stay out of every run that does not select them by marker."""
    if "autotune" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="autotuning candidates run only when selected: python -m pytest -m autotune")
    for item in items:
        if item.get_closest_marker("autotune") is not None:
            item.add_marker(skip)
