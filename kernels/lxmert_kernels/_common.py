"""Shared host-side helpers: input validation, interpreter detection, seeds, launch sizes.

Nothing here touches a device at import time.
"""
from __future__ import annotations

import os

import torch
import triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpret_requested() -> bool:
    """True when the Triton interpreter was requested through the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs in the Triton interpreter.

    Triton decides this when the decorator runs (module import), so we ask the kernel object
    rather than the environment: setting TRITON_INTERPRET after the import has no effect.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Raise a ValueError unless the tensors can be handed to ``kernel``."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"lxmert_kernels: all tensors must be on one device, got {sorted(map(str, devices))}")
    if is_interpreted(kernel):
        return
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise ValueError(
                "lxmert_kernels needs CUDA tensors or TRITON_INTERPRET=1 (set before importing "
                f"lxmert_kernels); got a tensor on {t.device}"
            )


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"lxmert_kernels: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lxmert_kernels: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def resolve_seed(seed, dropout_p: float) -> int:
    """The Philox seed for a dropout launch.

    ``seed=None`` draws one from torch's default CPU generator, so ``torch.manual_seed`` makes runs
    reproducible. Without dropout the seed is irrelevant and 0 is returned (no draw, so the
    generator state is untouched).
    """
    if dropout_p == 0.0:
        return 0
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"lxmert_kernels: seed must be a non-negative int, got {seed}")
    return seed


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def num_programs_hint(device: torch.device, interpreted: bool) -> int:
    """How many persistent programs a row-looping kernel should launch."""
    if interpreted or device.type != "cuda":
        return 8
    props = torch.cuda.get_device_properties(device)
    return 4 * props.multi_processor_count


def dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
