# Must run before anything imports the Triton kernels: Triton decides interpreter vs compiled
# when the @triton.jit decorators run (at import of lxmert_kernels).
import os

if not (os.environ.get("LXMERT_KERNELS_GPU") == "1" and __import__("torch").cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"
# The kernels use the heuristics table unless lxmert_kernels.tuning.set_autotune(True) is called
# (test_autotuned_configs_agree does, on a GPU).

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# test the source tree, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
