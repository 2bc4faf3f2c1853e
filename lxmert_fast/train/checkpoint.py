"""Checkpoints that resume exactly: DeepSpeed's model and optimizer state plus the job's client state.

A checkpoint is the tag directory DeepSpeed writes (model + ZeRO optimizer shards + client state).
The client state holds the step, epoch, sampler position, every rank's RNG states and what the run
must agree on to continue (world size, batch, schedule length, seed). `latest` names the newest
complete tag and is replaced atomically only after every rank has finished writing; the last K
tags are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lxmert_fast.train.process import barrier
from lxmert_fast.utils import atomic_write_text

_TAG_RE = re.compile(r"^step(\d+)$")
RUN_FILE = "run.json"           # beside DeepSpeed's files in a tag: the run shape that wrote it
UNIVERSAL_SUFFIX = "_universal"  # a tag converted to DeepSpeed's universal checkpoint (any world size)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad checkpoint...); the message says why."""


# ---------------------------------------------------------------------------------------------- RNG
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

    def save(self, engine, step: int, client_state: dict, rank: int, run: Optional[dict] = None) -> str:
        """Save a tag; ``run`` (the world size, ZeRO stage, batch... that wrote it) goes into its run.json,
        which a resume reads before it builds its engine."""
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
            if run is not None:
                atomic_write_text(os.path.join(target, RUN_FILE), json.dumps(run, indent=1) + "\n")
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
                shutil.rmtree(os.path.join(self.directory, tag + UNIVERSAL_SUFFIX), ignore_errors=True)

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
    """A checkpoint written by another recipe shape cannot continue this one: the mismatches, by name."""
    what = {"train_batch_size": "train_batch_size", "total_steps": "schedule steps", "seed": "seed"}
    problems = [f"{what.get(key, key)} {state.get(key)} then, {value} now" for key, value in now.items()
                if state.get(key) != value]
    if problems:
        raise TrainingError(f"--resume: checkpoint {tag} does not fit this run: " + "; ".join(problems)
                            + " (the same total batch, --max_steps/--epochs and --seed are needed; the number of "
                              "processes may change)")


@dataclass(frozen=True)
class ResumePlan:
    """How this run loads the latest checkpoint: the tag to load and whether it is a universal checkpoint."""

    tag: str
    universal: bool
    then: dict          # the run.json of the tag (world_size, zero_stage, ...)
    note: str = ""


def read_run_file(directory: str, tag: str) -> dict:
    path = os.path.join(directory, tag, RUN_FILE)
    if not os.path.isfile(path):
        raise TrainingError(f"--resume: {path} is missing: the checkpoint was written by an earlier version, which "
                            f"can only be resumed with its own number of processes and ZeRO stage")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def plan_resume(ckpt: CheckpointManager, world_size: int, zero_stage: int, train_batch_size: int,
                engine: str = "deepspeed") -> ResumePlan:
    """Read the latest tag's run shape and decide how to load it (before the engine is built: a universal
    checkpoint is a DeepSpeed config setting).

    - The same world size and ZeRO stage: the tag as written.
    - ZeRO-0 on another world size: the tag as written (every rank holds the whole optimizer state).
    - ZeRO-1/2 on another world size or another of these two stages: the tag converted once to DeepSpeed's
      universal checkpoint (``ds_to_universal``: the fp32 weights and the Adam moments by parameter),
      which any world size and either stage load.
    - Anything else (to or from ZeRO-0 or ZeRO-3 with a change, another total batch): a clear error here.
    """
    tag = ckpt.latest_tag()
    if tag is None:
        raise TrainingError(f"--resume: no checkpoint in {ckpt.directory} (no 'latest' file)")
    if not os.path.isfile(os.path.join(ckpt.directory, tag, RUN_FILE)):  # written by an earlier version
        return ResumePlan(tag, False, {})
    then = read_run_file(ckpt.directory, tag)
    if then.get("engine", "deepspeed") != engine:
        raise TrainingError(f"--resume: checkpoint {tag} was written by the {then.get('engine', 'deepspeed')} engine; "
                            f"this run uses --engine {engine}: resume with --engine {then.get('engine', 'deepspeed')}")
    if then.get("train_batch_size") != train_batch_size:
        raise TrainingError(f"--resume: checkpoint {tag} was written with train_batch_size {then.get('train_batch_size')}, "
                            f"this run has {train_batch_size}: the schedule and the sample position need the same "
                            f"total batch")
    same = then["world_size"] == world_size and then["zero_stage"] == zero_stage
    if same:
        return ResumePlan(tag, False, then)
    change = (f"{then['world_size']} process(es), ZeRO-{then['zero_stage']} then; {world_size} process(es), "
              f"ZeRO-{zero_stage} now")
    if then["zero_stage"] == 0 and zero_stage == 0:
        return ResumePlan(tag, False, then, f"{change}: the whole optimizer state is in every rank's checkpoint")
    if then["zero_stage"] in (1, 2) and zero_stage in (1, 2):
        return ResumePlan(tag, True, then, f"{change}: loading the universal checkpoint {tag}{UNIVERSAL_SUFFIX}")
    raise TrainingError(f"--resume: checkpoint {tag} cannot continue on this run ({change}): a change of world size "
                        f"or stage is supported within ZeRO-1/2 (DeepSpeed's universal checkpoint) and within ZeRO-0; "
                        f"resume with the checkpoint's own number of processes and ZeRO stage")


def convert_to_universal(directory: str, tag: str, log=print) -> str:
    """``<tag>_universal`` beside ``tag`` (DeepSpeed's ``ds_to_universal``), converted once; its name."""
    target = os.path.join(directory, tag + UNIVERSAL_SUFFIX)
    if os.path.isfile(os.path.join(target, "mp_rank_00_model_states.pt")):
        return tag + UNIVERSAL_SUFFIX
    tmp = target + f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(directory, tag), "--output_folder", tmp, "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if log:
        log(f"converting checkpoint {tag} to DeepSpeed's universal format (once) ...")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(os.path.join(tmp, "mp_rank_00_model_states.pt")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"--resume: converting {tag} to a universal checkpoint failed:\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return tag + UNIVERSAL_SUFFIX
