"""Checkpoints that resume exactly: DeepSpeed's model and optimizer state plus the job's client state.

A checkpoint is the tag directory the engine writes (DeepSpeed: model + ZeRO optimizer shards + client
state; the torch engine: one ``torch_engine_states.pt``), our ``run.json`` (the run shape that wrote it) and,
written last, ``manifest.json`` (`lxmert_fast.checkpoints.manifest`: every file's size and CRC-32s). The client
state holds the step, epoch, sampler position, every rank's RNG states and what the run must agree on to
continue (world size, batch, schedule length, seed).

- Saving: every rank writes its files; rank 0 writes run.json, flushes the tag to disk and writes the
  manifest; then `latest` is replaced atomically (it never names a tag without a manifest); the last K tags
  are kept. A save that fails on any rank (disk full, quota, permissions) removes its partial tag, leaves
  the earlier tags and `latest` as they were and stops the job (`SaveError`, naming the path and the cause).
- Resuming (`choose_resume_tag`): the tags, newest first; the first whose manifest verifies is taken. Each
  newer one (damaged, or a save that did not finish) is reported by name with what is wrong and moved
  aside to ``<tag>.damaged``, and `latest` is pointed at the tag taken. No complete tag: a `TrainingError`
  listing each tag's problem. Tags of earlier versions (no manifest) are trusted when they are not newer
  than `latest` (which those versions wrote after every rank had finished) and their files pass the zip
  archives' own CRC-32s (`manifest.verify_legacy`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from lxmert_fast.checkpoints import manifest
from lxmert_fast.train.errors import TrainingError
from lxmert_fast.train.process import all_gather_object, barrier, broadcast_object
from lxmert_fast.utils import atomic_write_text

_TAG_RE = re.compile(r"^step(\d+)$")
RUN_FILE = "run.json"           # beside DeepSpeed's files in a tag: the run shape that wrote it
UNIVERSAL_SUFFIX = "_universal"  # a tag converted to DeepSpeed's universal checkpoint (any world size)


class SaveError(TrainingError):
    """A checkpoint could not be written (the message names the path and the cause; the earlier ones are intact)."""


# ---------------------------------------------------------------------------------------------- checkpoints
def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (stepNNNNNNNN)")
    return int(m.group(1))


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


@dataclass(frozen=True)
class ResumeChoice:
    """The tag a resume loads, and the newer tags it passed over (each with what is wrong with it)."""

    tag: str
    passed_over: tuple[tuple[str, str], ...] = ()
    legacy: bool = False  # written by an earlier version (no manifest)


class CheckpointManager:
    """Save / resume checkpoints under `directory`, keeping the last `keep` (see the module docstring)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = max(1, int(keep))
        self.timings: dict[str, float] = {}  # the last save's / resume check's seconds, for the log

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

    # -- saving -------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, rank: int, run: Optional[dict] = None) -> str:
        """Save a tag (a collective: every rank calls it); ``run`` (the world size, ZeRO stage, batch... that
        wrote it) goes into its run.json, which a resume reads before it builds its engine. Raises `SaveError`
        on every rank when any rank's part failed, after removing the partial tag."""
        tag = tag_for(step)
        target = os.path.join(self.directory, tag)
        problem = None
        if rank == 0:
            try:
                os.makedirs(self.directory, exist_ok=True)
                if os.path.isdir(target) and self.latest_tag() != tag:
                    shutil.rmtree(target)  # a partial save of this tag by an interrupted run: it is not `latest`
            except OSError as err:
                problem = f"preparing {target}: {_describe(err)}"
        problem = broadcast_object(problem)
        if problem is not None:
            raise SaveError(self._failure(tag, [(0, problem)], removed=False))
        error = None
        t0 = time.perf_counter()
        try:
            engine.save_checkpoint(self.directory, tag=tag, client_state=client_state, save_latest=False)
        except Exception as err:  # noqa: BLE001 - any failure of this rank's writes (ENOSPC surfaces from torch.save as a RuntimeError)
            error = _describe(err)
            # DeepSpeed's save ends with a barrier, which the ranks whose writes succeeded are waiting at (its
            # only collectives before the writes are a barrier and the tag check, which every rank passed)
            barrier()
        t1 = time.perf_counter()
        if rank == 0 and error is None:
            try:
                if run is not None:
                    atomic_write_text(os.path.join(target, RUN_FILE), json.dumps(run, indent=1) + "\n")
                manifest.write_manifest(target, {"tag": tag, "step": step})
                atomic_write_text(os.path.join(self.directory, "latest"), tag)
            except Exception as err:  # noqa: BLE001 - the same: disk full, quota, permissions
                error = f"finishing the tag: {_describe(err)}"
        failures = [(r, e) for r, e in enumerate(all_gather_object(error)) if e is not None]
        if failures:
            removed = None
            if rank == 0:
                shutil.rmtree(target, ignore_errors=True)
                removed = not os.path.exists(target)
            removed = broadcast_object(removed)
            raise SaveError(self._failure(tag, failures, removed))
        t2 = time.perf_counter()
        if rank == 0:
            self._prune(tag)
        barrier()
        self.timings = {"write": t1 - t0, "manifest": t2 - t1}
        return tag

    def _failure(self, tag: str, failures: list[tuple[int, str]], removed: Optional[bool]) -> str:
        target = os.path.join(self.directory, tag)
        causes = "; ".join(f"rank {r}: {e}" for r, e in failures)
        free = _free_bytes(self.directory)
        latest = self.latest_tag()
        kept = (f"the earlier checkpoints and `latest` ({latest}) are intact: --resume continues from {latest} "
                f"once the cause is fixed") if latest else "no earlier checkpoint exists"
        where = {True: f"the partial {tag} was removed", False: f"{tag} was left as it was",
                 None: f"the partial {target} could not be removed: delete it"}[removed]
        return (f"could not save checkpoint {target} ({causes})"
                + (f"; {free / 1e9:.2f} GB free on its filesystem" if free is not None else "")
                + f"; {where}; {kept}. Stopping: training on without checkpoints would put every further step "
                  f"at risk")

    def _prune(self, current: str) -> None:
        tags = self.tags()
        keep = set(tags[-self.keep:]) | {current}
        for tag in tags:
            if tag not in keep:
                shutil.rmtree(os.path.join(self.directory, tag), ignore_errors=True)
                shutil.rmtree(os.path.join(self.directory, tag + UNIVERSAL_SUFFIX), ignore_errors=True)

    # -- resuming -----------------------------------------------------------------------------------
    def check_tag(self, tag: str) -> tuple[Optional[str], bool]:
        """(what is wrong with ``tag``, or None; whether it is an earlier version's tag without a manifest)."""
        path = os.path.join(self.directory, tag)
        if manifest.has_manifest(path):
            return manifest.verify(path), False
        latest = self.latest_tag()
        if latest is None or _TAG_RE.match(latest) is None or step_of(tag) > step_of(latest):
            return f"no {manifest.MANIFEST_FILE}: its save did not finish", False
        return manifest.verify_legacy(path), True

    def choose_resume_tag(self, log=print) -> ResumeChoice:
        """The newest tag that verifies (rank 0 only: it moves the tags it passes over aside and points
        `latest` at the one taken; `choose_resume_tag_everywhere` is the collective)."""
        tags = self.tags()
        if not tags:
            raise TrainingError(f"--resume: no checkpoint in {self.directory}")
        passed: list[tuple[str, str]] = []
        t0 = time.perf_counter()
        for tag in reversed(tags):
            problem, legacy = self.check_tag(tag)
            if problem is None:
                break
            passed.append((tag, problem))
        else:
            raise TrainingError(f"--resume: no complete checkpoint in {self.directory}: "
                                + "; ".join(f"{t}: {p}" for t, p in passed)
                                + " (a damaged tag is left as it is; copy back an intact one or start afresh with "
                                  "--overwrite)")
        for bad, problem in passed:
            aside = os.path.join(self.directory, bad + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(os.path.join(self.directory, bad), aside)
            shutil.rmtree(os.path.join(self.directory, bad + UNIVERSAL_SUFFIX), ignore_errors=True)
            if log:
                log(f"--resume: checkpoint {bad} is not usable ({problem}); moved aside to {aside}; trying the one "
                    f"before it")
        if self.latest_tag() != tag:
            atomic_write_text(os.path.join(self.directory, "latest"), tag)
        self.timings = {"verify": time.perf_counter() - t0}
        if log:
            log(f"--resume: checkpoint {tag} verified in {self.timings['verify']:.2f} s"
                + (" (written by an earlier version: its archives' own CRC-32s)" if legacy else ""))
        return ResumeChoice(tag, tuple(passed), legacy)

    def choose_resume_tag_everywhere(self, rank: int, log=print) -> ResumeChoice:
        """`choose_resume_tag` on rank 0, its answer (or its error) on every rank."""
        answer: Any = None
        if rank == 0:
            try:
                answer = self.choose_resume_tag(log)
            except (TrainingError, OSError) as err:
                answer = f"{err}"
        answer = broadcast_object(answer)
        if isinstance(answer, str):
            raise TrainingError(answer)
        return answer

    def load(self, engine, tag: Optional[str] = None, legacy: bool = False) -> dict:
        """Load the tag (default: `latest`) into the engine; returns the client state."""
        tag = tag or self.latest_tag()
        if tag is None:
            raise TrainingError(f"--resume: no checkpoint in {self.directory} (no 'latest' file)")
        if not os.path.isdir(os.path.join(self.directory, tag)):
            raise TrainingError(f"--resume: {self.directory}/latest names {tag!r}, which does not exist")
        try:
            path, client_state = engine.load_checkpoint(self.directory, tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
            hint = (" (written by an earlier version, without a manifest: move it aside to resume from the one "
                    "before it)") if legacy else ""
            raise TrainingError(f"--resume: checkpoint {tag} in {self.directory} cannot be loaded{hint}: "
                                f"{_describe(err)}") from None
        if path is None:
            raise TrainingError(f"--resume: the engine could not load checkpoint {tag!r} from {self.directory}")
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
                engine: str = "deepspeed", tag: Optional[str] = None) -> ResumePlan:
    """Read the run shape of ``tag`` (default: the latest; a resume passes the tag `choose_resume_tag` took)
    and decide how to load it (before the engine is built: a universal checkpoint is a DeepSpeed config
    setting).

    - The same world size and ZeRO stage: the tag as written.
    - ZeRO-0 on another world size: the tag as written (every rank holds the whole optimizer state).
    - ZeRO-1/2 on another world size or another of these two stages: the tag converted once to DeepSpeed's
      universal checkpoint (``ds_to_universal``: the fp32 weights and the Adam moments by parameter),
      which any world size and either stage load.
    - Anything else (to or from ZeRO-0 or ZeRO-3 with a change, another total batch): a clear error here.
    """
    tag = tag or ckpt.latest_tag()
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
                            f"total batch (set the DeepSpeed config's train_batch_size to "
                            f"{then.get('train_batch_size')}, or to \"auto\", which keeps the checkpoint's)")
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
    if os.path.isdir(target):  # converted before: reused if intact (an earlier version's has no manifest)
        problem = manifest.verify(target) if manifest.has_manifest(target) else manifest.verify_legacy(target)
        if problem is None:
            return tag + UNIVERSAL_SUFFIX
        if log:
            log(f"the universal checkpoint {target} is damaged ({problem}): converting again")
        shutil.rmtree(target)
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
    manifest.write_manifest(tmp, {"tag": tag + UNIVERSAL_SUFFIX, "converted_from": tag})
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return tag + UNIVERSAL_SUFFIX
