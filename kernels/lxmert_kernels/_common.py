"""Shared host-side helpers: input validation, interpreter detection, seeds, launch sizes.

Nothing here touches a device at import time.
"""
from __future__ import annotations

import operator
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


def check_device(interpreted: bool, *tensors) -> None:
    """Raise a ValueError unless the tensors (None entries are skipped) can be handed to the kernels.

    ``interpreted`` says whether the kernels run in the Triton interpreter (a constant of each
    kernel module, fixed when its ``@triton.jit`` decorators ran). Reads tensor metadata only, so
    torch.compile traces it without a graph break.
    """
    first = None
    for t in tensors:
        if t is None:
            continue
        if first is None:
            first = t
        elif t.device != first.device:
            raise ValueError(f"lxmert_kernels: all tensors must be on one device, got {first.device} and {t.device}")
        if not interpreted and t.device.type != "cuda":
            raise ValueError(
                "lxmert_kernels needs CUDA tensors or TRITON_INTERPRET=1 (set before importing "
                f"lxmert_kernels); got a tensor on {t.device}"
            )


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"lxmert_kernels: {name} must be float16, bfloat16 or float32, got {t.dtype}")


MAX_DROPOUT = 1.0 - 2.0**-24  # the largest p below 1 that stays below 1 as the kernels' fp32 argument


def check_dropout(dropout_p: float) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= MAX_DROPOUT:
        raise ValueError(f"lxmert_kernels: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


SEED_HIGH = 2**31 - 1  # seeds drawn for seed=None lie in [0, SEED_HIGH)


def seed_tensor(seed, dropout_p: float, device: torch.device):
    """The Philox seed of a dropout launch as a 1-element int64 tensor on ``device`` (or None).

    The kernels read the seed through a pointer (``tl.load(SEED)``), never as a host integer, so a
    compiled graph or a CUDA graph can take the whole call:

    * ``seed=None`` draws a seed on ``device`` with torch's own generator
      (``torch.randint(..., device=device)``): ``torch.manual_seed`` makes runs reproducible, under
      torch.compile inductor turns the draw into its graph-safe RNG and under CUDA graphs torch's
      Philox state advances inside the graph;
    * an int in [0, 2**63) is copied to a tensor (tests, reproducing a run); refused while a CUDA graph is
      being captured (the copy cannot be recorded): pass None or a tensor there;
    * a tensor must be int64 with shape (1,) on ``device``; it is used as is (never read on the host).

    Without dropout no seed is needed and None is returned (no draw: the generator is untouched).
    """
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, SEED_HIGH, (1,), device=device, dtype=torch.int64)
    return as_seed_tensor(seed, device)


def as_seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """An explicit seed (int or 1-element int64 tensor) as the int64 tensor the kernels read."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (1,):
            raise ValueError(
                f"lxmert_kernels: a seed tensor must be int64 with shape (1,), got {seed.dtype} {tuple(seed.shape)}"
            )
        device = torch.device(device)
        if seed.device.type != device.type or (device.index is not None and seed.device.index != device.index):
            raise ValueError(f"lxmert_kernels: the seed tensor is on {seed.device}, the inputs on {device}")
        return seed
    if isinstance(seed, bool):
        raise ValueError("lxmert_kernels: seed must be None, an int or an int64 tensor, got a bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(
            f"lxmert_kernels: seed must be None, an int or an int64 tensor, got {type(seed).__name__}"
        ) from None
    if not 0 <= seed < 2**63:
        raise ValueError(f"lxmert_kernels: seed must be a non-negative int below 2**63, got {seed}")
    if torch.device(device).type == "cuda" and capturing_cuda_graph():
        raise ValueError(
            "lxmert_kernels: an int seed is copied to the device (a host-to-device copy), which CUDA-graph capture "
            "cannot record; while capturing pass seed=None (drawn on the device) or a 1-element int64 tensor "
            "made on the device before the capture"
        )
    return torch.tensor([seed], dtype=torch.int64, device=device)


def capturing_cuda_graph() -> bool:
    """True while the current CUDA stream records a CUDA graph (eager capture; inside torch.compile the
    seed conversion is traced into the graph instead, so this is False there)."""
    if torch.compiler.is_compiling():
        return False
    return torch.cuda.is_current_stream_capturing()


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
