"""The DeepSpeed config: found, filled, fitted to the hardware, and turned into an engine.

- The config owns batch size, precision, optimizer, scheduler, clipping and ZeRO. A job fills only
  its "auto" entries (the batch split, the schedule's length, monitor paths, and values its own
  flags give, such as fine-tuning's --lr) and reads the rest back from the engine (`OptimSettings`).
- The configs live in the repository's top-level `ds_configs/` and ship in the wheel as the package
  `lxmert_fast.ds_configs`: `--deepspeed_config zero2.json` (or `ds_configs/zero2.json`, the path in a
  checkout) finds them from any install and any directory.
- Without CUDA a GPU config runs as a try-out (`fit_to_cpu`): the choices bound to the hardware
  change, each named in one logged line; the recipe (batch, lr, schedule, ZeRO, clipping) stays.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from lxmert_fast.train.ds_auto import AUTO, DSConfigError
from lxmert_fast.train.monitors import fill_monitor_sections
from lxmert_fast.train.profiler import fill_flops_profiler


# ---------------------------------------------------------------------------------------------- finding
def packaged_dir() -> str:
    """The folder of the packaged configs: ``lxmert_fast/ds_configs`` in an installed wheel (setup.py maps the
    repository's ``ds_configs/`` there), else the checkout's ``ds_configs/`` beside the ``lxmert_fast`` folder
    (a checkout, installed editable or not)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = os.path.join(package, "ds_configs")
    checkout = os.path.join(os.path.dirname(package), "ds_configs")
    if os.path.isdir(installed):
        return installed
    if os.path.isfile(os.path.join(os.path.dirname(package), "setup.py")) and os.path.isdir(checkout):
        return checkout
    raise DSConfigError(f"the packaged DeepSpeed configs are missing: neither {installed} (an install) nor "
                        f"{checkout} (a checkout) exists; reinstall lxmert-fast")


def packaged_config(name: str) -> str:
    """The path of a config that ships with the package (e.g. ``"cpu.json"``)."""
    return os.path.join(packaged_dir(), name)


def default_config_name(job: str, on_gpu: bool) -> str:
    """zero2.json / cpu.json for pre-training, finetune_zero2.json / finetune_cpu.json for fine-tuning."""
    prefix = "finetune_" if job == "finetune" else ""
    return prefix + ("zero2.json" if on_gpu else "cpu.json")


def resolve_config_path(path: str | os.PathLike) -> str:
    """``path`` if it exists, else the packaged config of that file name (``ds_configs/zero2.json`` works
    from any directory and any install)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    packaged = packaged_config(os.path.basename(path))
    if os.path.isfile(packaged):
        return packaged
    shipped = ", ".join(sorted(n for n in os.listdir(packaged_dir()) if n.endswith(".json")))
    raise DSConfigError(f"DeepSpeed config {path!r}: no such file, and no packaged config of that name "
                        f"(shipped: {shipped})")


def load_ds_config(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = resolve_config_path(path_or_dict)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DSConfigError(f"DeepSpeed config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None


# ---------------------------------------------------------------------------------------------- reading
def precision_of(cfg: dict) -> str:
    """'bf16', 'fp16' or 'fp32' from a DeepSpeed config."""
    if cfg.get("bf16", {}).get("enabled", False) or cfg.get("bfloat16", {}).get("enabled", False):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"


def zero_stage_of(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def _is_auto(value: Any) -> bool:
    return value is None or value == AUTO


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DSConfigError(f"DeepSpeed config: {name} = {value!r}: expected a positive integer or \"auto\"")
    return value


# ---------------------------------------------------------------------------------------------- filling
def resolve_batch_size(cfg: dict, world_size: int, micro_batch_size: Optional[int] = None) -> tuple[int, int, int]:
    """(train_batch_size, micro batch per device, gradient accumulation steps), filling "auto" values.

    `micro_batch_size` (the command line's) fills an "auto" micro batch; with the micro batch and
    accumulation both "auto", the accumulation is 1 and the micro batch is the total / world size.
    Raises DSConfigError when train_batch_size != micro x accumulation x world size.
    """
    total = cfg.get("train_batch_size", AUTO)
    micro = cfg.get("train_micro_batch_size_per_gpu", AUTO)
    accum = cfg.get("gradient_accumulation_steps", AUTO)
    total = None if _is_auto(total) else _positive_int(total, "train_batch_size")
    micro = None if _is_auto(micro) else _positive_int(micro, "train_micro_batch_size_per_gpu")
    accum = None if _is_auto(accum) else _positive_int(accum, "gradient_accumulation_steps")
    if micro is None and micro_batch_size is not None:
        micro = _positive_int(micro_batch_size, "--micro_batch_size")

    def split_error(what: str) -> DSConfigError:
        return DSConfigError(
            f"DeepSpeed config: train_batch_size {total} cannot be split into micro batch x gradient accumulation "
            f"x world size {world_size} ({what}); change train_batch_size, train_micro_batch_size_per_gpu or "
            f"gradient_accumulation_steps, or the number of processes"
        )

    if total is None:
        micro = micro if micro is not None else 32
        accum = accum if accum is not None else 1
        total = micro * accum * world_size
    elif micro is None:
        accum = accum if accum is not None else 1
        if total % (accum * world_size):
            raise split_error(f"{total} is not a multiple of gradient_accumulation_steps {accum} x world size")
        micro = total // (accum * world_size)
    elif accum is None:
        if total % (micro * world_size):
            raise split_error(f"{total} is not a multiple of micro batch {micro} x world size")
        accum = total // (micro * world_size)
    if total != micro * accum * world_size:
        raise DSConfigError(
            f"DeepSpeed config: train_batch_size ({total}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x world size ({world_size}) = {micro * accum * world_size}"
        )
    return total, micro, accum


def keep_checkpoint_batch(cfg: dict, world_size: int, micro_batch_size: Optional[int], then: dict,
                          tag: str) -> tuple[dict, list[str]]:
    """For a resume from ``tag`` (``then``: its run.json): the config with its "auto" batch entries filled so
    that the run keeps the checkpoint's total batch and micro-batch, the accumulation making up for another
    number of processes. (The config, one line per choice worth logging.)

    - ``train_batch_size`` "auto": the checkpoint's (a fixed one must equal it: `plan_resume` says so).
    - the micro-batch "auto" and no ``--micro_batch_size``: the checkpoint's, so each micro-batch and its
      random draws are those of the uninterrupted run. A micro-batch given (flag or config) other than the
      checkpoint's is taken, with a note: each step's samples stay the same, cut into other micro-batches.
    - ``gradient_accumulation_steps`` "auto": total / (micro-batch x processes).
    What cannot be kept raises DSConfigError naming the setting to change.
    """
    total_then, micro_then = then.get("train_batch_size"), then.get("micro_batch_size")
    if not isinstance(total_then, int) or not isinstance(micro_then, int):
        return cfg, []  # an earlier version's run.json: the checkpoint's own world size only (plan_resume)
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    if _is_auto(cfg.get("train_batch_size", AUTO)):
        cfg["train_batch_size"] = total_then
    total = _positive_int(cfg["train_batch_size"], "train_batch_size")
    micro_cfg = cfg.get("train_micro_batch_size_per_gpu", AUTO)
    accum_cfg = cfg.get("gradient_accumulation_steps", AUTO)
    if total % world_size:
        raise DSConfigError(f"--resume from {tag}: its total batch {total} does not divide over {world_size} processes: "
                            f"resume on a number of processes that divides {total}")
    per_rank = total // world_size
    if _is_auto(micro_cfg) and micro_batch_size is None:
        if per_rank % micro_then:
            choices = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
            raise DSConfigError(
                f"--resume from {tag} on {world_size} processes: the checkpoint's micro-batch {micro_then} does not "
                f"divide the {per_rank} samples per process of a step (total batch {total}); give --micro_batch_size "
                f"one of {choices} (each step keeps its samples, cut into other micro-batches whose random draws "
                f"differ from an uninterrupted run's)")
        cfg["train_micro_batch_size_per_gpu"] = micro_then
    else:
        micro = micro_batch_size if _is_auto(micro_cfg) else micro_cfg
        what = "--micro_batch_size" if _is_auto(micro_cfg) else "the DeepSpeed config's train_micro_batch_size_per_gpu"
        if micro != micro_then:
            notes.append(f"micro-batch {micro} ({what}) instead of the checkpoint's {micro_then}: each step keeps its "
                         f"samples, cut into other micro-batches, whose random draws differ from an uninterrupted "
                         f"run's")
    micro = cfg.get("train_micro_batch_size_per_gpu") if not _is_auto(cfg.get("train_micro_batch_size_per_gpu", AUTO)) \
        else micro_batch_size
    if not _is_auto(accum_cfg) and micro is not None and total != micro * accum_cfg * world_size:
        need = total / (micro * world_size)
        raise DSConfigError(
            f"--resume from {tag} on {world_size} processes: the DeepSpeed config fixes gradient_accumulation_steps at "
            f"{accum_cfg}, but keeping the total batch {total} with micro-batch {micro} needs "
            f"{need:g}: set gradient_accumulation_steps to \"auto\" in the config"
            + ("" if need == int(need) else " and give a --micro_batch_size that divides the samples per process"))
    return cfg, notes


def fill_from_flags(cfg: dict, values: dict[str, tuple[str, Any]], explicit: set[str]) -> dict:
    """Fill "auto" entries from a job's flags: ``values`` maps a flag to (dotted config key, value).

    A flag the user gave (in ``explicit``) against a value the config fixes is an error: the config owns it.
    """
    cfg = copy.deepcopy(cfg)
    for flag, (key, value) in values.items():
        *parents, leaf = key.split(".")
        holder = cfg
        for part in parents:
            holder = holder.setdefault(part, {})
        current = holder.get(leaf, AUTO)
        if _is_auto(current):
            holder[leaf] = value
        elif flag in explicit and float(current) != float(value):
            raise DSConfigError(f"{flag} {value:g} contradicts the DeepSpeed config's {key} = {current}; "
                                f"set it to \"auto\" there or drop the flag")
    return cfg


def _find_auto(obj: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _find_auto(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += _find_auto(value, f"{path}[{i}]")
    elif obj == AUTO:
        found.append(path)
    return found


def prepare_ds_config(cfg: dict, *, world_size: int, total_steps: int, output_dir: str,
                      micro_batch_size: Optional[int] = None, warmup_ratio: float = 0.05,
                      job_name: str = "pretrain", flops_profile_step: Optional[int] = None,
                      activation_checkpointing: bool = False, engine: str = "deepspeed") -> dict:
    """A copy of `cfg` with every "auto" filled; raises DSConfigError on what cannot be filled or fit.

    The monitor sections: `lxmert_fast.train.monitors.fill_monitor_sections`; the FLOPs profiler
    (`flops_profile_step`, the --flops_profile_step flag): `lxmert_fast.train.profiler.fill_flops_profiler`.
    """
    cfg = copy.deepcopy(cfg)
    total, micro, accum = resolve_batch_size(cfg, world_size, micro_batch_size)
    cfg["train_batch_size"] = total
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    if total_steps <= 0:
        raise DSConfigError(f"total optimizer steps = {total_steps}: expected > 0 (is the training set empty?)")
    sched = cfg.get("scheduler")
    if sched:
        params = sched.setdefault("params", {})
        if _is_auto(params.get("total_num_steps", AUTO)) and "total_num_steps" in params:
            params["total_num_steps"] = int(total_steps)
        if params.get("warmup_num_steps") == AUTO:
            params["warmup_num_steps"] = max(1, int(round(warmup_ratio * total_steps)))
        if params.get("warmup_max_lr") == AUTO:
            lr = cfg.get("optimizer", {}).get("params", {}).get("lr")
            if _is_auto(lr):
                raise DSConfigError("DeepSpeed config: scheduler.params.warmup_max_lr is \"auto\" but optimizer.params.lr "
                                    "is not set")
            params["warmup_max_lr"] = lr
        if params.get("warmup_min_lr") == AUTO:
            params["warmup_min_lr"] = 0.0
        if sched.get("type") == "WarmupDecayLR" and "total_num_steps" not in params:
            params["total_num_steps"] = int(total_steps)
    fill_monitor_sections(cfg, output_dir=output_dir, job_name=job_name, engine=engine)
    fill_flops_profiler(cfg, profile_step=flops_profile_step, output_dir=output_dir,
                        activation_checkpointing=activation_checkpointing)
    left = _find_auto(cfg)
    if left:
        raise DSConfigError(f"DeepSpeed config: cannot fill \"auto\" for {left}")
    return cfg


def fit_to_cpu(cfg: dict) -> tuple[dict, list[str]]:
    """A GPU config as a CPU try-out: (the config, one line per change). Only what cannot run without
    CUDA changes; batch, learning rate, schedule, clipping and ZeRO stay."""
    cfg = copy.deepcopy(cfg)
    changes: list[str] = []
    opt = cfg.get("optimizer", {})
    params = opt.setdefault("params", {}) if opt else {}
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if opt.get("type", "").lower() in ("adam", "adamw") and offload in (None, "none"):
        if not params.get("torch_adam"):
            params["torch_adam"] = True
            changes.append("optimizer: DeepSpeed's FusedAdam needs CUDA -> torch's AdamW (optimizer.params.torch_adam "
                           "true)")
        if "fused" not in params and "foreach" not in params:
            # torch's CPU default is the per-tensor loop, which streams several model-sized temporaries
            # over ZeRO's flat partition (measured 5.2 s of a 6.6 s step, base model, 1 thread)
            params["fused"] = True
            changes.append("optimizer: torch's fused CPU AdamW (optimizer.params.fused true): one pass over the "
                           "parameters instead of the per-tensor loop")
    if precision_of(cfg) == "fp16":
        cfg["fp16"] = dict(cfg["fp16"], enabled=False)
        cfg["bf16"] = {"enabled": True}
        changes.append("precision: fp16 with loss scaling needs CUDA -> bf16 (fp16.enabled false, bf16.enabled true)")
    return cfg, changes


# ---------------------------------------------------------------------------------------------- the engine
def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: with weight decay (the config's) and without (biases, LayerNorm weights).

    The decayed group carries no "weight_decay" key, so the optimizer config's value applies.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            for p in module.parameters(recurse=False):
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in no_decay_ids or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def no_decay_names(model: nn.Module) -> list[str]:
    ids = {id(p) for g in param_groups(model) if g.get("weight_decay") == 0.0 for p in g["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def initialize(model: nn.Module, ds_config: dict):
    """deepspeed.initialize with the no-decay parameter groups; returns the engine."""
    import deepspeed  # heavy: about 0.5 s on top of torch, only for the deepspeed engine

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)
    if not engine.zero_optimization() and engine.dp_world_size == 1 and not engine.has_moe_layers:
        # Without ZeRO, DeepSpeed averages the gradients at the accumulation boundary by flattening them all
        # into one buffer, all-reducing it and copying it back (buffered_allreduce_fallback), even in a
        # single process, where that is the identity: measured 2.5 s of a 3.0 s boundary overhead (base
        # model, CPU, 1 thread). With one data-parallel rank there is nothing to average.
        engine.enable_backward_allreduce = False
    return engine


@dataclass
class OptimSettings:
    """What the engine actually runs with, read back from it (never from our own arguments)."""

    train_batch_size: int
    micro_batch_size: int
    grad_accum: int
    lr: float
    betas: tuple
    eps: float
    weight_decay: float
    gradient_clipping: float
    precision: str
    zero_stage: int
    scheduler: str

    def describe(self) -> str:
        return (f"batch {self.train_batch_size} = micro {self.micro_batch_size} x accum {self.grad_accum} x world; "
                f"{self.precision}, ZeRO-{self.zero_stage}; AdamW lr {self.lr:g} betas {tuple(self.betas)} "
                f"eps {self.eps:g} wd {self.weight_decay:g}; clip {self.gradient_clipping:g}; {self.scheduler}")


def optim_settings(engine) -> OptimSettings:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    group = inner.param_groups[0]
    sched = engine.lr_scheduler
    sched_name = getattr(sched, "name", type(sched).__name__) if sched is not None else "constant"
    if sched is not None and hasattr(sched, "total_num_steps"):
        sched_name += f"(warmup {getattr(sched, 'warmup_num_steps', '?')} / total {sched.total_num_steps})"
    precision = "bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32")
    base_lr = getattr(sched, "max_lrs", [group.get("initial_lr", group["lr"])])[0] if sched is not None \
        else group["lr"]
    return OptimSettings(
        train_batch_size=engine.train_batch_size(),
        micro_batch_size=engine.train_micro_batch_size_per_gpu(),
        grad_accum=engine.gradient_accumulation_steps(),
        lr=float(base_lr),
        betas=tuple(group.get("betas", (float("nan"), float("nan")))),
        eps=float(group.get("eps", float("nan"))),
        weight_decay=float(group.get("weight_decay", float("nan"))),
        gradient_clipping=float(engine.gradient_clipping()),
        precision=precision,
        zero_stage=int(engine.zero_optimization_stage()),
        scheduler=sched_name,
    )
