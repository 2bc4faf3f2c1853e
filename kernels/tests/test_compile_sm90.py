"""Compile the production kernel variants for Hopper (sm_90) without a GPU, and check the
heuristic configurations spill nothing.

The interpreter does not check what only the compiler checks (types of loop-carried values,
layouts, shared memory, registers), so this runs ``tools/compile_check.py --report --quick`` in
a subprocess (the test process runs the interpreter): every launch of the ops at the LXMERT
base shapes (bf16, D=64, dropout on), specialised as a real launch, through ptxas. Skipped where
Triton's CUDA backend is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS_DIR = Path(__file__).resolve().parents[1]


def _cuda_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _cuda_backend_available(), reason="Triton's CUDA backend is not installed")
def test_heuristic_configs_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(KERNELS_DIR / "tools" / "compile_check.py"), "--report", "--quick"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_one_tile_kernel", "_attn_bwd_one_tile_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel",
            "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"} <= kernels, kernels
    for r in rows:
        assert r["heuristic"] and r["regs"] > 0 and r["sass_instructions"] > 0, r
        assert r["spill_bytes"] == 0, f"{r['kernel']} {r['scenario']} {r['config']} spills {r['spill_bytes']} bytes"
