"""Every RNG a training process draws from: its state for a checkpoint, set back at resume, seeded, preserved.

`rng_state` / `set_rng_state`: python, numpy, torch (CPU and CUDA) and named generators, as tensors and plain
values only, so that a checkpoint holding them loads with ``weights_only=True``. `preserved_rng`: work outside
the training path leaves every global RNG as it found it.
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


def rng_state(extra: Optional[dict[str, torch.Generator]] = None) -> dict:
    """Every RNG this process draws from: python, numpy, torch (CPU and CUDA), named generators. Tensors and
    plain values only (numpy's key as a tensor), so a checkpoint holding it loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, gen in (extra or {}).items():
        if gen is not None:
            state["gen:" + name] = gen.get_state()
    return state


def set_rng_state(state: dict, extra: Optional[dict[str, torch.Generator]] = None) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # older checkpoints: an array
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, gen in (extra or {}).items():
        key = "gen:" + name
        if gen is not None and key in state:
            gen.set_state(state[key])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class preserved_rng:
    """Work outside the training path (validation, checkpoints, loader start-up) leaves every global RNG
    as it found it, so that it never shifts the training's dropout stream."""

    def __enter__(self):
        self._state = rng_state()
        return self

    def __exit__(self, *exc):
        set_rng_state(self._state)
        return False
