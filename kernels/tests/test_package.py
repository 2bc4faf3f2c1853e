"""Package boundaries: imports torch and triton only, probes no device at import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parents[1]


def test_import_is_light_and_device_free():
    code = (
        "import sys, torch\n"
        "import lxmert_kernels as lk\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lxmert_fast', 'deepspeed', 'transformers')]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert set(['flash_attention', 'bidirectional_cross_attention', 'layer_norm', 'bias_gelu']) <= set(dir(lk))\n"
        "print(lk.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(KERNELS_DIR)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0.2.0"


@pytest.mark.slow
def test_the_package_alone_runs_an_op_in_the_interpreter(tmp_path):
    """Installed into a fresh environment with only its declared dependencies (torch pinned to this one's
    version, which resolves to the CPU build), the package runs an op in Triton's CPU interpreter, as its
    README shows, and matches the reference."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # --no-compile: no byte-code for torch's thousands of modules up front (the one import below compiles its own)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile",
                              f"torch=={torch.__version__.split('+')[0]}",
                              str(KERNELS_DIR)], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, lxmert_kernels\n"
        "from lxmert_kernels.reference import attention_ref\n"
        "q, k, v = (torch.randn(2, 20, 4, 32) for _ in range(3))\n"
        "keep = torch.arange(20)[None] < torch.tensor([[20], [7]])\n"
        "out = lxmert_kernels.flash_attention(q, k, v, keep)\n"
        "torch.testing.assert_close(out, attention_ref(q, k, v, keep).float(), atol=1e-4, rtol=1e-4)\n"
        "import numpy; print('ok', numpy.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]
