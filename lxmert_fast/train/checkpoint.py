"""Checkpoints that resume exactly: DeepSpeed's model and optimizer state plus the job's client state.

A checkpoint is the tag directory DeepSpeed writes (model + ZeRO optimizer shards + client state).
The client state holds the step, epoch, sampler position, every rank's RNG states and what the run
must agree on to continue (world size, batch, schedule length, seed). `latest` names the newest
complete tag and is replaced atomically only after every rank has finished writing; the last K
tags are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from lxmert_fast.train.process import barrier
from lxmert_fast.utils import atomic_write_text

_TAG_RE = re.compile(r"^step(\d+)$")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad checkpoint...); the message says why."""


# ---------------------------------------------------------------------------------------------- RNG
def rng_state(extra: Optional[dict[str, torch.Generator]] = None) -> dict:
    """Every RNG this process draws from: python, numpy, torch (CPU and CUDA), named generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, gen in (extra or {}).items():
        if gen is not None:
            state["gen:" + name] = gen.get_state()
    return state


def set_rng_state(state: dict, extra: Optional[dict[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


# ---------------------------------------------------------------------------------------------- checkpoints
def tag_for(step: int) -> str:
    return f"step{step:08d}"


class CheckpointManager:
    """Save / resume DeepSpeed checkpoints under `directory`, keeping the last `keep`."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = max(1, int(keep))

    def latest_tag(self) -> Optional[str]:
        path = os.path.join(self.directory, "latest")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fh:
            tag = fh.read().strip()
        return tag or None

    def tags(self) -> list[str]:
        if not os.path.isdir(self.directory):
            return []
        found = [(int(m.group(1)), name) for name in os.listdir(self.directory)
                 for m in [_TAG_RE.match(name)] if m and os.path.isdir(os.path.join(self.directory, name))]
        return [name for _, name in sorted(found)]

    def save(self, engine, step: int, client_state: dict, rank: int) -> str:
        tag = tag_for(step)
        target = os.path.join(self.directory, tag)
        if rank == 0 and os.path.isdir(target):
            # A partial save of the same tag from an earlier, interrupted run: it is not `latest`.
            if self.latest_tag() != tag:
                shutil.rmtree(target)
        barrier()
        engine.save_checkpoint(self.directory, tag=tag, client_state=client_state, save_latest=False)
        barrier()
        if rank == 0:
            atomic_write_text(os.path.join(self.directory, "latest"), tag)
            self._prune(tag)
        barrier()
        return tag

    def _prune(self, current: str) -> None:
        tags = self.tags()
        keep = set(tags[-self.keep:]) | {current}
        for tag in tags:
            if tag not in keep:
                shutil.rmtree(os.path.join(self.directory, tag), ignore_errors=True)

    def load(self, engine, tag: Optional[str] = None) -> dict:
        """Load the tag (default: `latest`) into the engine; returns the client state."""
        tag = tag or self.latest_tag()
        if tag is None:
            raise TrainingError(f"--resume: no checkpoint in {self.directory} (no 'latest' file)")
        if not os.path.isdir(os.path.join(self.directory, tag)):
            raise TrainingError(f"--resume: {self.directory}/latest names {tag!r}, which does not exist")
        path, client_state = engine.load_checkpoint(self.directory, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise TrainingError(f"--resume: DeepSpeed could not load checkpoint {tag!r} from {self.directory}")
        return client_state or {}


def check_resumable(state: dict, now: dict[str, Any], tag: str) -> None:
    """A checkpoint written by another run shape cannot continue this one: the mismatches, by name."""
    what = {"world_size": "processes", "train_batch_size": "train_batch_size", "total_steps": "schedule steps",
            "seed": "seed"}
    problems = [f"{what.get(key, key)} {state.get(key)} then, {value} now" for key, value in now.items()
                if state.get(key) != value]
    if problems:
        raise TrainingError(f"--resume: checkpoint {tag} does not fit this run: " + "; ".join(problems)
                            + " (the same world size, batch, --max_steps/--epochs and --seed are needed)")
