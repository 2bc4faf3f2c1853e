"""Shared test setup.

TRITON_INTERPRET=1 must be set before any @triton.jit function is defined, so it is set here,
first thing, unless LXMERT_KERNELS_GPU=1 asks for the real GPU kernels (bench/gpu_check.sh).
"""

import os

if os.environ.get("LXMERT_KERNELS_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
