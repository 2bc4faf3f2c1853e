"""Package boundaries: imports torch and triton only, probes no device at import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
