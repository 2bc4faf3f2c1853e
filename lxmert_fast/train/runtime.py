"""The one training runtime pre-training and fine-tuning share; a job is a `Recipe` plugged into it.

The `Trainer` owns the process (rank, device, CPU threads), the DeepSpeed config (found, fitted to
the hardware, "auto" entries filled) and engine, precision, the schedule (epochs x steps, resume),
the loop (micro-batches, accumulation, the optimizer step), logging (DeepSpeed's monitor, a progress
bar, the mean of every loss, samples/s without evaluation time, TFLOP/s, MFU, data wait), the
non-finite policy, evaluation and checkpoint points, and checkpoints that resume exactly.

A recipe supplies only what is its own: data and loaders, the model, the loss of a micro-batch, the
evaluation, what to keep of each evaluation (fine-tuning keeps the best model) and what to do at the
end (exports, predictions). See `Recipe` for the hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as tdist
from torch import nn
from tqdm.auto import tqdm

from lxmert_fast.checkpoints.training import (RUN_FILE, UNIVERSAL_SUFFIX, CheckpointManager, check_resumable,
                                              convert_to_universal, plan_resume, read_run_file, step_of)
from lxmert_fast.data.demo import DEFAULT_OBJECTS, ensure_demo_data
from lxmert_fast.flops import device_name, peak_tflops_for
from lxmert_fast.train import ds_config as ds_cfg
from lxmert_fast.train.compile import (COMPILE_BACKENDS, COMPILE_MODES, CompileModeError, check_compile_mode,
                                       compile_model, eager_forward, step_begins)
from lxmert_fast.train.errors import TrainingError
from lxmert_fast.train.host_memory import ScheduledGC, keep_freed_host_memory
from lxmert_fast.train import monitors
from lxmert_fast.train.meter import IntervalMeter
from lxmert_fast.train.preemption import StopAgreement, StopSignals, stop_signals_blocked
from lxmert_fast.train.profiler import FlopsProbe
from lxmert_fast.train.process import (ThreadsError, all_gather_object, barrier, cpu_threads,
                                      set_collective_timeout, start_process)
from lxmert_fast.train.rng import preserved_rng, rng_state, seed_everything, set_rng_state
from lxmert_fast.train.torch_engine import ENGINES, TorchEngine, unsupported_reasons
from lxmert_fast.utils import atomic_write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(ValueError):
    """A bad command line or a data/model mismatch found before training starts (exit code 2)."""


def default_cache_dir() -> str:
    """Where the demo world (and, on request, converted stores) go: $LXMERT_FAST_CACHE or ~/.cache/lxmert_fast."""
    return os.environ.get("LXMERT_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lxmert_fast")


def add_runtime_arguments(p: argparse.ArgumentParser, *, save_every: int, log_every: int) -> None:
    """The flags every job shares (a recipe adds its own)."""
    r = p.add_argument_group("run")
    r.add_argument("--epochs", type=int, default=None, help="epochs (default: the job's)")
    r.add_argument("--max_steps", type=int, default=None, help="optimizer steps (sets the LR schedule's length)")
    r.add_argument("--stop_at_step", type=int, default=None,
                   help="stop (after a checkpoint) at this step, keeping the full run's schedule; resume later")
    r.add_argument("--micro_batch_size", type=int, default=None,
                   help="fills an \"auto\" train_micro_batch_size_per_gpu of the DeepSpeed config")
    r.add_argument("--warmup_ratio", type=float, default=None, help="fills an \"auto\" warmup_num_steps")
    r.add_argument("--output_dir", "--output", default=None, help="where checkpoints, logs and exports go")
    r.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run (its checkpoints and logs are deleted)")
    r.add_argument("--seed", type=int, default=9595)
    r.add_argument("--log_every", type=int, default=log_every)
    r.add_argument("--eval_every", type=int, default=None,
                   help="steps between evaluations (default: the job's; 0 = at the end only)")
    r.add_argument("--save_every", type=int, default=save_every,
                   help="steps between checkpoints (also at epoch ends and where the run stops; 0 = only there)")
    r.add_argument("--keep_checkpoints", type=int, default=3)
    r.add_argument("--dist_timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a collective waits for a peer process before the job fails (the process group's "
                        "timeout; default: DeepSpeed's, 10 minutes). It must cover the longest wait of a healthy run "
                        "(a first run's feature conversion, a checkpoint save); docs/training.md")
    r.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: a table by GPU name)")
    r.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop when the loss has been non-finite this many steps in a row")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    r.add_argument("--cpu_threads", type=int, default=None,
                   help="torch threads per process on CPU (default: OMP_NUM_THREADS when set, else the cores "
                        "divided among the local processes; 1 is far faster on a CPU shared with other jobs)")
    r.add_argument("--gc_every", type=int, default=50,
                   help="Python's cyclic garbage collector runs every N steps of the training loop instead of when "
                        "it decides (0: when it decides; docs/training.md)")
    r.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the model's forward and backward as whole static graphs (reduce-overhead: "
                        "with CUDA graphs, GPU only); none = eager")
    r.add_argument("--compile_backend", default="inductor", choices=COMPILE_BACKENDS,
                   help="torch.compile's backend for --compile: inductor (the one that makes code faster); eager "
                        "(TorchDynamo alone: seconds instead of minutes, to check that the step captures whole)")
    r.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each encoder layer (language, vision, cross) in backward instead of keeping its "
                        "activations: less memory for about one more forward per step, the same gradients")
    r.add_argument("--flops_profile_step", type=int, default=None,
                   help="run DeepSpeed's FLOPs profiler on this optimizer step's forward (fills the config's "
                        "flops_profiler section) and log its count beside lxmert_fast/flops.py's")
    r.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="deepspeed", choices=ENGINES,
                   help="deepspeed: DeepSpeed's engine (any number of processes, ZeRO); torch: the same config run "
                        "by plain PyTorch in one process, for machines without DeepSpeed (ZeRO-0/1/2, bf16 or fp32; "
                        "docs/training.md)")
    e.add_argument("--deepspeed_config", default=None,
                   help="the DeepSpeed config: a path, or the name of a packaged one (zero2.json, cpu.json, ...)")
    e.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's launchers (always on)")


class Recipe:
    """A job: what the runtime cannot know. Override the hooks; the defaults do nothing.

    Attributes a recipe sets in `build_data` / `build_model`: `train_loader` (None: nothing to train:
    `finish` alone runs), `config` (the model's LxmertConfig), `model`.
    """

    job = "train"                      # finds the default DeepSpeed config (`ds_config.default_config_name`)
    job_name = "train"                 # the monitor's job name and the progress bar's label
    loss_names: tuple[str, ...] = ()   # parts of the loss logged beside the total
    eval_at_epoch_end = False          # evaluate at every epoch end (fine-tuning) or only every --eval_every
    outputs: tuple[str, ...] = ()      # what the job writes in --output_dir besides checkpoints/ and logs/
    train_loader = None
    model: Optional[nn.Module] = None

    def fill_config(self, raw: dict) -> dict:
        """The DeepSpeed config before its "auto" batch entries are resolved (fill the job's own)."""
        return raw

    def build_data(self, trainer: "Trainer", micro_batch_size: int, accumulation: int) -> None:
        """Data and loaders; the training loader deals micro-batches of ``micro_batch_size`` from whole
        optimizer steps (``accumulation`` per rank: ``make_pretrain_loader(..., accumulation=...)``), so that
        its micro-batches and their seeds are the same on any world size."""
        raise NotImplementedError

    def schedule(self, steps_per_epoch: int) -> tuple[Optional[int], Optional[int]]:
        """(max_steps, epochs) when the command line gives neither."""
        return None, 1

    def warmup_ratio(self) -> float:
        return 0.05

    def default_eval_every(self, total_steps: int) -> int:
        return 0

    def build_model(self, trainer: "Trainer", ds_config: dict) -> nn.Module:
        raise NotImplementedError

    def describe(self, trainer: "Trainer") -> list[str]:
        return []

    def flops_per_sample(self) -> Optional[float]:
        return None

    def generators(self) -> dict[str, torch.Generator]:
        """Generators the recipe draws from, saved in checkpoints (per rank)."""
        return {}

    def epoch_begins(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def micro_step(self, trainer: "Trainer", raw: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch through `trainer.engine`: (the loss to backward, its logged parts)."""
        raise NotImplementedError

    def evaluate(self, trainer: "Trainer") -> dict[str, float]:
        """Collective: every rank calls it. Runs with the model eager and in eval mode."""
        return {}

    def evaluated(self, trainer: "Trainer", step: int, epoch: int, result: dict, epoch_end: bool) -> None:
        """What to keep of an evaluation (fine-tuning: the best model). ``epoch_end``: at the end of an epoch
        (or of the training, which may stop inside one)."""

    def client_state(self) -> dict:
        return {}

    def load_client_state(self, state: dict) -> None:
        pass

    def finish(self, trainer: "Trainer", result: dict) -> dict:
        return result


class Trainer:
    def __init__(self, args: argparse.Namespace, recipe: Recipe):
        self.args = args
        self.recipe = recipe
        timeout = getattr(args, "dist_timeout", None)
        if timeout is not None and not timeout > 0:
            raise UsageError(f"--dist_timeout must be a positive number of seconds, got {timeout:g}")
        try:
            self.gc_schedule = ScheduledGC(args.gc_every)
        except ValueError as err:
            raise UsageError(str(err)) from None
        try:
            self.process = start_process(args.engine, timeout_s=timeout)
        except ValueError as err:
            raise UsageError(str(err)) from None
        self.rank, self.world, self.device = self.process.rank, self.process.world, self.process.device
        self.is_main = self.process.is_main
        self.bar = None
        self.engine = None
        self.signals = StopSignals(rank=self.rank)  # installed by run(), for the whole job
        self.log_lines: list[str] = []
        self.host_memory_note: Optional[str] = None
        if self.device.type == "cpu":
            try:
                torch.set_num_threads(cpu_threads(args.cpu_threads))
            except ThreadsError as err:
                raise UsageError(str(err)) from None
            self.host_memory_note = keep_freed_host_memory()

    # -- output ---------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def data_root(self, data_root: Optional[str], *, cache_dir: str, demo_images: int,
                  demo_objects: Optional[tuple[int, int]]) -> tuple[str, bool]:
        """(the data root, whether it is the demo world): ``data_root`` as given, or the demo world under
        ``cache_dir``, built on first use by rank 0, then found (shared storage) or built (a node's own disk) by
        the first process of each other node (`node_first`)."""
        if data_root is not None:
            if demo_objects is not None:
                raise UsageError("--demo_objects shapes the demo world; it does not apply with --data_root")
            root = os.path.abspath(data_root)
            if not os.path.isdir(root):
                raise UsageError(f"--data_root {root}: no such directory (expected the original data/ folder)")
            return root, False

        root = self.node_first(lambda: ensure_demo_data(cache_dir, images=demo_images, seed=0, log=self.log,
                                                        objects=demo_objects or DEFAULT_OBJECTS))
        return root, True

    def node_first(self, build):
        """``build()`` in every process, in three turns: rank 0 (it writes the caches: the demo world, converted
        stores, tokenised sentences); then the first process of every other node (on shared storage it finds
        rank 0's caches; on a node's own disk it makes that node's); then the others, which read their node's.
        Caches are written aside and renamed into place, so no process ever reads a half-written one."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        result = None
        for mine in (self.is_main, not self.is_main and local_rank == 0, local_rank != 0):
            if mine:
                result = build()
            barrier()
        return result

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        args, recipe = self.args, self.recipe
        seed_everything(args.seed)
        raw = self._load_ds_config()
        self.out_dir = os.path.abspath(args.output_dir)
        self.ckpt = CheckpointManager(os.path.join(self.out_dir, "checkpoints"), keep=args.keep_checkpoints)
        self.resume_choice = None
        if args.resume:
            raw = self._choose_resume(raw)
        _, micro, accum = ds_cfg.resolve_batch_size(raw, self.world, args.micro_batch_size)
        self.accum = accum
        recipe.build_data(self, micro, accum)
        if recipe.train_loader is None:  # nothing to train: the recipe's finish alone
            seed_everything(args.seed)
            self.model = recipe.build_model(self, raw)
            return
        micro_per_epoch = len(recipe.train_loader)
        self.steps_per_epoch = micro_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise UsageError(f"the training set ({micro_per_epoch} micro-batches of {micro} per process) is smaller "
                             f"than one optimizer step ({micro} x {accum} x {self.world} samples)")
        self._schedule()
        self._check_output_dir()
        self.resume_plan = None
        if args.resume:  # decided before the engine exists: a universal checkpoint is a config setting
            raw = self._plan_resume(raw)
        warmup = args.warmup_ratio if args.warmup_ratio is not None else recipe.warmup_ratio()
        self.ds_config = ds_cfg.prepare_ds_config(raw, world_size=self.world, total_steps=self.total_steps,
                                             output_dir=self.out_dir, micro_batch_size=args.micro_batch_size,
                                             warmup_ratio=warmup, job_name=recipe.job_name,
                                             flops_profile_step=args.flops_profile_step,
                                             activation_checkpointing=args.activation_checkpointing,
                                             engine=args.engine)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_json(os.path.join(self.out_dir, "ds_config.json"), self.ds_config)
        seed_everything(args.seed)
        model = recipe.build_model(self, self.ds_config)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        if args.activation_checkpointing:
            model.set_activation_checkpointing(True)
        compile_model(model, args.compile, args.compile_backend)
        self._start_engine(model)
        seed_everything(args.seed + 1_000_003 * self.rank)  # the same init everywhere, per-rank dropout streams
        self.settings = ds_cfg.optim_settings(self.engine)
        self.dtype = DTYPES[self.settings.precision]
        self.peak = args.peak_tflops or (peak_tflops_for(device_name()) if self.device.type == "cuda" else None)
        self._log_setup(n_params)
        flops = recipe.flops_per_sample()
        self.log(f"schedule: {self.epochs} epoch(s) x {self.steps_per_epoch} steps, {self.total_steps} steps in all"
                 + (f"; {flops / 1e9:.2f} GFLOP per sample" if flops else ""))
        self.flops_probe = (FlopsProbe(self.engine, micro_batch_size=self.settings.micro_batch_size,
                                       flops_per_sample=flops, compile_mode=args.compile, log=self.log)
                            if args.engine == "deepspeed" else None)
        self._start_step_state()

    def _load_ds_config(self) -> dict:
        """The job's DeepSpeed config (``--deepspeed_config`` or the packaged default), checked against
        ``--compile`` and ``--engine``, fitted to a CPU when there is no GPU, filled by the recipe."""
        args = self.args
        ds_path = args.deepspeed_config or ds_cfg.default_config_name(self.recipe.job, self.device.type == "cuda")
        raw = ds_cfg.load_ds_config(ds_path)
        self.ds_path = ds_cfg.resolve_config_path(ds_path)
        try:
            check_compile_mode(args.compile, self.device, ds_cfg.zero_stage_of(raw), args.compile_backend)
        except CompileModeError as err:
            raise UsageError(str(err)) from None
        self.hardware_changes: list[str] = []
        if self.device.type != "cuda":
            raw, self.hardware_changes = ds_cfg.fit_to_cpu(raw)
        raw = self.recipe.fill_config(raw)
        if args.engine == "torch":
            reasons = unsupported_reasons(raw, self.world) + (
                ["the FLOPs profiler is DeepSpeed's (--flops_profile_step)"] if args.flops_profile_step else [])
            if reasons:
                raise UsageError(f"--engine torch cannot run {os.path.basename(ds_path)}: " + "; ".join(reasons))
        return raw

    def _choose_resume(self, raw: dict) -> dict:
        """``--resume``: the checkpoint to continue from (the same in every process); the config keeps the
        batch size it was written with."""
        if not self.ckpt.tags():
            raise UsageError(f"--resume: no checkpoint in {self.ckpt.directory}")
        self.resume_choice = self.ckpt.choose_resume_tag_everywhere(self.rank, self.log)
        then = (read_run_file(self.ckpt.directory, self.resume_choice.tag)
                if os.path.isfile(os.path.join(self.ckpt.directory, self.resume_choice.tag, RUN_FILE)) else {})
        raw, notes = ds_cfg.keep_checkpoint_batch(raw, self.world, self.args.micro_batch_size, then,
                                                  self.resume_choice.tag)
        for note in notes:
            self.log(f"--resume: {note}")
        return raw

    def _plan_resume(self, raw: dict) -> dict:
        """How the chosen checkpoint is loaded; one written by another topology is converted to a universal
        checkpoint first (rank 0) and the config then loads that."""
        args = self.args
        self.resume_plan = plan_resume(self.ckpt, self.world, ds_cfg.zero_stage_of(raw),
                                       ds_cfg.resolve_batch_size(raw, self.world, args.micro_batch_size)[0],
                                       engine=args.engine, tag=self.resume_choice.tag)
        if self.resume_plan.universal:
            if self.is_main:
                convert_to_universal(self.ckpt.directory, self.resume_plan.tag, self.log)
            barrier()
            raw = dict(raw, checkpoint=dict(raw.get("checkpoint", {}), load_universal=True))
        return raw

    def _start_engine(self, model: nn.Module) -> None:
        """``self.engine``: the plain PyTorch engine or DeepSpeed's (with its monitors and ``--dist_timeout``)."""
        args = self.args
        if args.engine == "torch":
            self.engine = TorchEngine(model, self.ds_config)
            self.hardware_changes += self.engine.changes()
            return
        with monitors.monitor_environment(self.ds_config, self.out_dir, self.log):
            self.engine = ds_cfg.initialize(model, self.ds_config)
        monitors.adapt_monitors(self.engine)
        if args.dist_timeout is not None and self.world > 1:
            try:
                groups = set_collective_timeout(args.dist_timeout)
            except RuntimeError as err:
                raise UsageError(str(err)) from None
            self.log(f"--dist_timeout: a collective fails after {args.dist_timeout:g} s without its peers "
                     f"({groups} process groups)")

    def _log_setup(self, n_params: int) -> None:
        """The recipe's description, the model, the engine and its settings, the changes made for the hardware."""
        args = self.args
        for line in self.recipe.describe(self):
            self.log(line)
        if self.host_memory_note:
            self.log(f"host memory: glibc's policy kept ({self.host_memory_note}): a CPU step returns its large "
                     "blocks to the kernel and faults them in again")
        self.log(f"model {n_params / 1e6:.2f}M parameters; {self.world} process(es) on {device_name()}"
                 + (f"; compiled ({args.compile}" + (f", backend {args.compile_backend}"
                                                     if args.compile_backend != "inductor" else "") + ")"
                    if args.compile != "none" else "")
                 + ("; activation checkpointing (every encoder layer recomputed in backward)"
                    if args.activation_checkpointing else ""))
        shown = os.path.relpath(self.ds_path) if not self.ds_path.startswith(ds_cfg.packaged_dir()) else \
            f"{os.path.basename(self.ds_path)}, packaged"
        engine_name = "DeepSpeed" if args.engine == "deepspeed" else "plain PyTorch engine"
        self.log(f"{engine_name} ({shown}): {self.settings.describe()}")
        for change in self.hardware_changes:
            self.log(f"CPU try-out of a GPU config: {change}" if not change.startswith("engine:") else change)

    def _schedule(self) -> None:
        args = self.args
        if args.max_steps is None and args.epochs is None:
            max_steps, epochs = self.recipe.schedule(self.steps_per_epoch)
        else:
            max_steps, epochs = args.max_steps, args.epochs
        if max_steps is not None:
            self.epochs = math.ceil(max_steps / self.steps_per_epoch) if epochs is None else epochs
            self.total_steps = min(max_steps, self.epochs * self.steps_per_epoch)
            self.epochs = min(self.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        else:
            self.epochs = epochs
            self.total_steps = epochs * self.steps_per_epoch

    def _check_output_dir(self) -> None:
        args = self.args
        earlier = self.ckpt.latest_tag() is not None or bool(self.ckpt.tags())
        if args.resume:  # the tag to continue from was chosen (and verified) in setup
            return
        if earlier and not args.overwrite:
            raise UsageError(f"--output_dir {self.out_dir} holds checkpoints of an earlier run: pass --resume to "
                             f"continue it, --overwrite to start afresh there, or another --output_dir")
        barrier()
        if earlier and self.is_main:
            for sub in ("checkpoints", "logs") + tuple(self.recipe.outputs):
                path = os.path.join(self.out_dir, sub)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.exists(path):
                    os.unlink(path)
        barrier()

    # -- checkpoints ------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return self.recipe.generators()

    def _client_state(self, step: int, epoch: int, sampler_state: dict) -> dict:
        return {
            "step": step, "epoch": epoch, "sampler": sampler_state,
            "rng": all_gather_object(rng_state(self._generators())),
            "world_size": self.world, "seed": self.args.seed, "total_steps": self.total_steps,
            "train_batch_size": self.settings.train_batch_size, "recipe": self.recipe.client_state(),
        }

    def save(self, step: int, epoch: int, sampler_state: dict) -> Optional[str]:
        if not self._finite_since_last_save():
            self.log(f"step {step}: not saving a checkpoint: the loss was non-finite since the last one")
            return None
        with preserved_rng():
            tag = self.ckpt.save(self.engine, step, self._client_state(step, epoch, sampler_state), self.rank,
                                 run={"engine": self.args.engine, "world_size": self.world,
                                      "zero_stage": self.settings.zero_stage,
                                      "train_batch_size": self.settings.train_batch_size,
                                      "micro_batch_size": self.settings.micro_batch_size,
                                      "total_steps": self.total_steps, "seed": self.args.seed,
                                      "precision": self.settings.precision})
        self.bad_since_save.zero_()
        t = self.ckpt.timings
        self.log(f"checkpoint {tag}: written in {t['write']:.2f} s, flushed and its manifest in {t['manifest']:.2f} s")
        return tag

    def restore(self) -> tuple[int, int]:
        plan = self.resume_plan
        tag = plan.tag + (UNIVERSAL_SUFFIX if plan.universal else "")
        t0 = time.perf_counter()
        state = self.ckpt.load(self.engine, tag, legacy=self.resume_choice.legacy)
        load_s = time.perf_counter() - t0
        check_resumable(state, {"train_batch_size": self.settings.train_batch_size, "total_steps": self.total_steps,
                                "seed": self.args.seed}, plan.tag)
        same_world = state.get("world_size") == self.world
        if not same_world and not plan.then:  # an earlier version's checkpoint: no run.json, no world change
            raise TrainingError(f"--resume: checkpoint {plan.tag} was written by {state.get('world_size')} processes "
                                f"(an earlier version, without {RUN_FILE}): resume it with that many")
        try:
            self.recipe.train_loader.load_state_dict(state["sampler"])
        except ValueError as err:
            raise TrainingError(f"--resume: checkpoint {plan.tag}'s data position does not fit this run: {err}") from None
        if same_world:
            set_rng_state(state["rng"][self.rank], self._generators())
        # else: the training path reseeds every micro-batch from its own seed (`_reseed`), the same on any world size
        self.recipe.load_client_state(state.get("recipe", {}))
        if plan.note:
            self.log(f"resuming on another run shape ({plan.note})")
        self.log(f"resumed from {self.ckpt.directory}/{tag}: step {state['step']}, epoch {state['epoch']}, "
                 f"sample {state['sampler'].get('sample', '?')} of the epoch (loaded in {load_s:.2f} s)")
        return int(state["step"]), int(state["epoch"])

    def _reseed(self, micro_seed: int) -> None:
        """Every random number of a micro-batch (dropout, the recipe's generators: masking) from its own seed,
        which is the same whichever rank computes it: a run continued on another number of processes draws
        what an uninterrupted one would."""
        torch.manual_seed(micro_seed)
        for i, (name, gen) in enumerate(sorted(self._generators().items())):
            gen.manual_seed((micro_seed + 0x9E3779B97F4A7C15 * (i + 1)) % (1 << 63))

    # -- non-finite losses ----------------------------------------------------------------------
    def _nonfinite_status(self) -> tuple[int, int]:
        t = torch.stack([self.streak, self.bad_since_save]).to(torch.float64)

        if tdist.is_initialized() and self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t[0].item()), int(t[1].item())

    def _finite_since_last_save(self) -> bool:
        streak, bad = self._nonfinite_status()
        if self.settings.precision == "fp16":
            return streak == 0  # the loss scaler skipped the overflowing steps: the weights are intact
        return bad == 0

    def _check_nonfinite(self, step: int) -> None:
        streak, _ = self._nonfinite_status()
        if streak >= self.args.max_nonfinite_steps:
            last = self.ckpt.latest_tag()
            where = (f"the last good checkpoint, {os.path.join(self.ckpt.directory, last)}, is intact "
                     f"(continue from it with --resume, e.g. with a lower learning rate)") if last else \
                "no checkpoint had been written"
            raise TrainingError(
                f"the training loss has been non-finite (NaN/inf) for {streak} steps in a row, up to step {step}; "
                f"stopping. {where}")

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int, epoch: int, epoch_end: bool = False) -> dict:
        """The recipe's evaluation (eager, eval mode, global RNG untouched); the time it takes is not training."""
        t0 = time.perf_counter()
        self.engine.eval()
        try:
            with preserved_rng(), eager_forward(self.args.compile), torch.no_grad():
                res = self.recipe.evaluate(self)
        finally:
            self.engine.train()
        scalars = {k: v for k, v in res.items() if isinstance(v, (int, float))}
        if scalars:
            self.engine.monitor.write_events([(f"Valid/{k}", v, step) for k, v in scalars.items()])
            self.log(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        self.recipe.evaluated(self, step, epoch, res, epoch_end)
        self.meter.exclude(time.perf_counter() - t0)
        self.last_eval_step = step
        return res

    # -- the step -----------------------------------------------------------------------------------
    def _start_step_state(self) -> None:
        """What `train_step` keeps across steps: the non-finite counters (device scalars, read at log and
        save points only) and the logging interval's meter."""
        self.streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_since_save = torch.zeros((), dtype=torch.int64, device=self.device)
        # Without ZeRO and in fp32 DeepSpeed computes no gradient norm: measure it on logging steps.
        self.own_grad_norm = (self.args.engine == "deepspeed" and ds_cfg.zero_stage_of(self.ds_config) == 0
                              and self.settings.precision == "fp32")
        self.last_grad_norm: Optional[float] = None
        self.meter = IntervalMeter(("total",) + tuple(self.recipe.loss_names), self.device,
                                   self.settings.train_batch_size, self.recipe.flops_per_sample(), self.world,
                                   self.peak)

    def train_step(self, micro_batches: Iterator[tuple[Any, int]], measure_grad_norm: bool = False) -> torch.Tensor:
        """One optimizer step: ``self.accum`` micro-batches from ``micro_batches``, each a (raw batch, seed) pair
        (the seed: the loader's ``micro_seed()`` for that micro-batch). For each: every RNG of the micro-batch
        reseeded from its seed, the recipe's forward (``Recipe.micro_step``), the engine's backward and step
        (the optimizer steps at the last one); the losses and the non-finite counters kept on the device.
        ``measure_grad_norm``: read the gradient norm before the optimizer step where the engine does not compute
        one (a host sync: logging steps only). Returns the last micro-batch's loss (a device scalar).

        The training loop calls it once per step; ``bench/`` times it as it is."""
        engine = self.engine
        loss = None
        for i in range(self.accum):
            try:
                raw, seed = next(micro_batches)
            except StopIteration:
                raise TrainingError(f"the data ran out after {i} of the {self.accum} micro-batches of a step") from None
            self._reseed(seed)
            step_begins(self.args.compile)
            with self.flops_probe.step(engine) if self.flops_probe is not None else contextlib.nullcontext():
                loss, parts = self.recipe.micro_step(self, raw)
            engine.backward(loss)
            if measure_grad_norm and self.own_grad_norm and i == self.accum - 1:
                self.last_grad_norm = grad_norm(engine.module.parameters())  # before step() clips and zeroes
            engine.step()
            finite = torch.isfinite(loss.detach())
            self.meter.add_micro({"total": loss, **parts}, finite)
            self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
            self.bad_since_save += (~finite).to(torch.int64)
        self.meter.steps += 1
        return loss

    def _micro_batches(self, it: Iterator[Any]) -> Iterator[tuple[Any, int]]:
        """The loader's micro-batches with their seeds; the time spent waiting for each counts as data wait.
        The loader's worker processes start at the first one: they start with SIGTERM / SIGUSR1 blocked
        (`stop_signals_blocked`), so that a notice sent to every process (SLURM, a launcher's process tree)
        does not kill a worker under the step it must let finish."""
        loader = self.recipe.train_loader
        first = True
        while True:
            t_wait = time.perf_counter()
            try:
                with stop_signals_blocked() if first else contextlib.nullcontext():
                    raw = next(it)
            except StopIteration:
                return
            first = False
            self.meter.add_data_wait(time.perf_counter() - t_wait)
            yield raw, loader.micro_seed()

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> dict:
        """The schedule around `train_step`: epochs, logging, evaluation, checkpoints, the non-finite policy, and
        a stop on SIGTERM / SIGUSR1 (`lxmert_fast.train.preemption`): every rank finishes the step in progress,
        they agree on the step to stop after (`StopAgreement`, between steps, never inside `train_step`), a
        checkpoint is written there and the result says ``stopped_by``."""
        args, recipe = self.args, self.recipe
        loader = recipe.train_loader
        step, start_epoch = 0, 0
        if args.resume:
            step, start_epoch = self.restore()
        eval_every = args.eval_every if args.eval_every is not None else recipe.default_eval_every(self.total_steps)
        stop_at = min(self.total_steps, args.stop_at_step) if args.stop_at_step else self.total_steps
        self.meter.reset()
        self.last_eval_step = -1
        self.trained_steps, self.train_seconds = 0, 0.0  # in this process's run (after a resume: since it)
        history: list[dict] = []
        evals: list[dict] = []
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not self.is_main or args.no_progress,
                        desc=recipe.job_name, dynamic_ncols=True, mininterval=1.0)
        cap = self.steps_per_epoch * self.accum
        epoch = start_epoch
        agree = StopAgreement(self.device, self.world)
        self.last_saved: Optional[str] = None
        stop = False
        self.signals.deferred = True  # a signal from here on: stop after the step in progress
        try:
            self.gc_schedule.start()
            for epoch in range(start_epoch, self.epochs):
                if step >= stop_at or stop:
                    break
                loader.set_epoch(epoch)
                recipe.epoch_begins(self, epoch)
                with preserved_rng():  # a loader iterator draws its workers' seed from the global RNG
                    micro_batches = self._micro_batches(iter(loader))
                while loader.consumed < cap and step < stop_at:
                    logs = (step + 1) % args.log_every == 0 or step + 1 == stop_at
                    self.train_step(micro_batches, measure_grad_norm=logs)
                    step += 1
                    self.gc_schedule.step(step)
                    self.bar.update(1)
                    end_of_epoch = loader.consumed >= cap
                    stop = agree(self.signals.received is not None)
                    self._after_step(step, epoch, stop_at, eval_every, end_of_epoch, history, evals, stop)
                    if stop:
                        break
                del micro_batches
            # a signal after the last agreement (in the last step's save, or in flight on a GPU): the checkpoint
            # of the last step is written; the job stops before its final evaluation and export
            stop = stop or agree(self.signals.received is not None, wait=True)
        finally:
            self.gc_schedule.stop()
            self.signals.deferred = False
            self.bar.close()
            self.bar = None
        trained = self.trained_steps * self.settings.train_batch_size
        result: dict[str, Any] = {"step": step, "log": history, "evaluations": evals, "train_samples": trained,
                                  "train_seconds": self.train_seconds,
                                  "train_samples_per_s": trained / max(self.train_seconds, 1e-9)}
        if stop:
            result["stopped_by"] = self.signals.name or "a signal to another rank"
            kept = self.last_saved or self.ckpt.latest_tag()
            result["checkpoint"] = os.path.join(self.ckpt.directory, kept) if kept else None
            result["checkpoint_step"] = step_of(kept) if kept else 0
            result["completed"] = False
            self.log(f"stopped by {result['stopped_by']} after step {step} of {self.total_steps}; checkpoint "
                     f"{result['checkpoint']}")
            return result
        if step >= self.total_steps:
            if self.last_eval_step != step:
                evals.append({"step": step, "epoch": self.epochs, **self.evaluate(step, self.epochs, True)})
            result["eval"] = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")} if evals else {}
        else:
            self.log(f"stopped at step {step} of {self.total_steps} (--stop_at_step); continue with --resume")
        result["completed"] = step >= self.total_steps
        return result

    def _after_step(self, step: int, epoch: int, stop_at: int, eval_every: int, end_of_epoch: bool,
                    history: list[dict], evals: list[dict], stop: bool = False) -> None:
        """What the schedule does after an optimizer step: the non-finite check, logging, evaluation, saving.
        ``stop`` (a signal): the interval is logged and a checkpoint written here (an evaluation due at this
        step runs first, so that a resumed run keeps what it decided, e.g. fine-tuning's best model)."""
        args, recipe, loader = self.args, self.recipe, self.recipe.train_loader
        if self.device.type == "cpu" or step % args.log_every == 0:
            self._check_nonfinite(step)
        if step % args.log_every == 0 or step == stop_at or stop:
            row = self._log_interval(step, epoch)
            history.append(row)
            self.trained_steps += self.meter.steps
            self.train_seconds += row["train_seconds"]
            self.meter.reset()
        if eval_every and step % eval_every == 0 and step != self.total_steps and not (
                end_of_epoch and recipe.eval_at_epoch_end):
            evals.append({"step": step, "epoch": epoch, **self.evaluate(step, epoch)})
        if end_of_epoch and recipe.eval_at_epoch_end:
            evals.append({"step": step, "epoch": epoch + 1, **self.evaluate(step, epoch + 1, True)})
        if step == stop_at or (args.save_every and step % args.save_every == 0) or end_of_epoch or stop:
            t0 = time.perf_counter()
            if end_of_epoch:
                self.last_saved = self.save(step, epoch + 1, dict(loader.state_dict(), epoch=epoch + 1, position=0))
            else:
                self.last_saved = self.save(step, epoch, loader.state_dict())
            self.meter.exclude(time.perf_counter() - t0)

    def _log_interval(self, step: int, epoch: int) -> dict:
        m = self.meter.read()
        means = m["means"]
        grad = self.engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (no ZeRO, fp32)
        grad = float(grad) if grad is not None else self.last_grad_norm
        lr = self.engine.get_lr()[0]
        parts = [n for n in self.recipe.loss_names]
        row = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad, "samples_per_s": m["samples_per_s"],
               "tflops": m["tflops"], "mfu": m["mfu"], "data_wait": m["data_wait"], "train_seconds": m["train_seconds"],
               **{f"loss_{n}": means[n] for n in ("total", *parts)}}
        if self.settings.precision == "fp16":
            row["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        events = [(f"Train/loss/{n}", means[n], step) for n in ("total", *parts)]
        if grad is not None:
            events.append(("Train/grad_norm", grad, step))
        events += [("Train/lr", lr, step), ("Train/samples_per_s", m["samples_per_s"], step),
                   ("Train/data_wait_share", m["data_wait"], step)]
        if m["tflops"] is not None:
            events.append(("Train/tflops_per_device", m["tflops"], step))
        if m["mfu"] is not None:
            events.append(("Train/mfu", m["mfu"], step))
        self.engine.monitor.write_events(events)
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        tflops = f" | TFLOP/s {m['tflops']:.3f} | MFU {mfu}" if m["tflops"] is not None else ""
        detail = " (" + " ".join(f"{n} {means[n]:.3f}" for n in parts) + ")" if parts else ""
        self.log(f"step {step}/{self.total_steps} ep {epoch} | loss {means['total']:.4f}{detail} | lr {lr:.2e} | "
                 f"gnorm {'n/a' if grad is None else f'{grad:.3f}'} | {m['samples_per_s']:.1f} samples/s{tflops}"
                 f" | data wait {100 * m['data_wait']:.1f}%")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['total']:.3f}", refresh=False)
        return row

    # -- the whole job ----------------------------------------------------------------------------
    def run(self) -> dict:
        """The whole job, with SIGTERM / SIGUSR1 handled throughout (`StopSignals`): inside the training loop
        they stop it after a checkpoint; before or after it they raise `StopRequested` at once."""
        with self.signals:
            if not self.signals.active:
                self.log(f"SIGTERM / SIGUSR1 are not handled ({self.signals.reason}): they end the job at once")
            return self._run()

    def _run(self) -> dict:
        self.setup()
        result: dict[str, Any] = {}
        if self.engine is not None:
            result.update(self.train())
            result["settings"] = vars(self.settings)
            if self.flops_probe is not None and self.flops_probe.result is not None:
                result["flops_profile"] = self.flops_probe.result
        if not result.get("stopped_by"):  # a stopped run finishes when it is resumed
            result = self.recipe.finish(self, result)
        if self.engine is not None:
            monitors.close_monitors(self.engine)
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            atomic_write_json(os.path.join(self.out_dir, "result.json"), result)
        barrier()
        return result


def grad_norm(parameters) -> Optional[float]:
    """The global L2 norm of the gradients (all ranks hold the same ones without ZeRO); None if there are none."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
