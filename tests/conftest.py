"""Shared test setup.

Where the Triton kernels run, decided from the machine alone (kernels/tests/conftest.py makes the
same choice): with a CUDA device they are compiled and the tests that use them put their tensors on
CUDA (`tests.helpers.kernel_device`); without one, Triton's interpreter runs them on CPU tensors.
TRITON_INTERPRET=1 must be set before any @triton.jit function is defined, hence here, first thing.
TRITON_INTERPRET set on a machine with CUDA is refused: no environment variable changes what a test means.
"""

import os

import torch

if torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        raise RuntimeError("tests: TRITON_INTERPRET is set on a machine with CUDA; the tests run the kernels "
                           "compiled on CUDA there (unset it, or hide the GPUs with CUDA_VISIBLE_DEVICES= to run "
                           "the interpreter)")
else:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
