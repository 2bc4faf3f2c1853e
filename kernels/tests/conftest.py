# Must run before anything imports the Triton kernels: Triton decides interpreter vs compiled
# when the @triton.jit decorators run (at import of lxmert_kernels).
import os

if not (os.environ.get("LXMERT_KERNELS_GPU") == "1" and __import__("torch").cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"
else:
    # One heuristic config per kernel variant: autotuning every variant the tests touch would
    # compile hundreds of kernels. test_autotuned_configs_agree covers the autotuned path.
    os.environ.setdefault("LXMERT_KERNELS_AUTOTUNE", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# test the source tree, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
