"""`--engine torch`: the DeepSpeed config's recipe run by plain PyTorch, in one process.

For a machine where DeepSpeed cannot be imported (or is not wanted) and one device is enough. It
runs a config the way DeepSpeed's engine runs it in one process without ZeRO:

- batch: ``train_micro_batch_size_per_gpu`` x ``gradient_accumulation_steps`` (one process);
- each micro-batch's loss is divided by ``gradient_accumulation_steps`` before its backward; at the
  accumulation boundary: gradient clipping (the global L2 norm, ``gradient_clipping``), the optimizer
  step, the scheduler step, the gradients zeroed;
- optimizer ``Adam`` / ``AdamW``: ``torch.optim.AdamW`` with the config's lr, betas, eps and weight decay,
  none on biases and LayerNorm (the DeepSpeed engine's parameter groups), ``fused`` / ``foreach`` when
  given; scheduler ``WarmupLR`` / ``WarmupDecayLR`` (DeepSpeed's formulas) or none;
- precision fp32, or bf16 as DeepSpeed's bf16 optimizer does it: the module in bf16, an fp32 master
  copy of every parameter in the optimizer, each micro-batch's gradients added to fp32 master gradients;
- monitors ``tensorboard`` and ``csv_monitor`` (DeepSpeed's file layout: ``<output_path>/<job_name>/``);
- checkpoints: one file per tag, ``torch_engine_states.pt`` (weights, optimizer, scheduler, client
  state), written atomically and loaded with ``weights_only=True``.

What it refuses, each with the reason (`TorchEngineError`): several processes, ZeRO-3 (its parameter
partitioning is DeepSpeed's), fp16 (dynamic loss scaling), optimizer offload, the wandb and comet
monitors, the FLOPs profiler. ZeRO stages 1 and 2 shard nothing in one process: they run as stage 0,
and `changes()` says so (the trainer logs it).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lxmert_fast.train.ds_config import param_groups, precision_of, zero_stage_of

STATES_FILE = "torch_engine_states.pt"
ENGINES = ("deepspeed", "torch")


class TorchEngineError(ValueError):
    """The config asks for what the torch engine cannot run; the message says what and what to do."""


def unsupported_reasons(cfg: dict, world_size: int) -> list[str]:
    """Why `TorchEngine` cannot run ``cfg`` on ``world_size`` processes (empty: it can)."""
    out = []
    if world_size != 1:
        out.append(f"{world_size} processes: the torch engine runs one (DeepSpeed runs several)")
    if zero_stage_of(cfg) == 3:
        out.append("ZeRO-3: parameter partitioning is DeepSpeed's (use a ZeRO-0/1/2 config)")
    if precision_of(cfg) == "fp16":
        out.append("fp16: dynamic loss scaling is DeepSpeed's (use a bf16 or fp32 config)")
    zero = cfg.get("zero_optimization", {})
    for what in ("offload_optimizer", "offload_param"):
        if zero.get(what, {}).get("device", "none") not in (None, "none"):
            out.append(f"zero_optimization.{what}: offloading is DeepSpeed's")
    opt = cfg.get("optimizer", {})
    if opt and opt.get("type", "").lower() not in ("adam", "adamw"):
        out.append(f"optimizer {opt.get('type')!r}: the torch engine runs Adam/AdamW")
    sched = cfg.get("scheduler", {})
    if sched and sched.get("type") not in ("WarmupLR", "WarmupDecayLR"):
        out.append(f"scheduler {sched.get('type')!r}: the torch engine runs WarmupLR and WarmupDecayLR")
    for section in ("wandb", "comet"):
        if cfg.get(section, {}).get("enabled"):
            out.append(f"the {section} monitor is DeepSpeed's (the torch engine writes tensorboard and csv_monitor)")
    if cfg.get("flops_profiler", {}).get("enabled"):
        out.append("the FLOPs profiler is DeepSpeed's")
    if cfg.get("activation_checkpointing", {}).get("partition_activations"):
        out.append("activation_checkpointing.partition_activations is DeepSpeed's")
    return out


class WarmupSchedule:
    """DeepSpeed's WarmupLR / WarmupDecayLR: lr = min + (max - min) * gamma(iteration), gamma rising over
    ``warmup_num_steps`` (linear or log) to 1, then (decay) falling linearly to 0 at ``total_num_steps``.
    The lr is set once at construction (iteration -1: the minimum) and after every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, params: dict):
        self.optimizer = optimizer
        self.name = kind
        self.decay = kind == "WarmupDecayLR"
        self.min_lr = float(params.get("warmup_min_lr", 0.0))
        self.max_lrs = [float(params.get("warmup_max_lr", optimizer.param_groups[0]["lr"]))]  # DeepSpeed's name
        self.warmup_num_steps = max(2, int(params.get("warmup_num_steps", 1000)))
        if self.decay:
            self.total_num_steps = int(params["total_num_steps"])
        self.log_warmup = params.get("warmup_type", "log") == "log"
        self.last_batch_iteration = -1
        self._apply()

    def gamma(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            return math.log(it + 1) / math.log(self.warmup_num_steps) if self.log_warmup else it / self.warmup_num_steps
        if not self.decay:
            return 1.0
        return max(0.0, (self.total_num_steps - it) / max(1.0, self.total_num_steps - self.warmup_num_steps))

    def _apply(self) -> None:
        lr = self.min_lr + (self.max_lrs[0] - self.min_lr) * self.gamma()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.last_batch_iteration += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        self._apply()


class FileMonitor:
    """The config's ``tensorboard`` and ``csv_monitor`` sections, written as DeepSpeed writes them."""

    def __init__(self, cfg: dict):
        self.enabled = False
        self.tensorboard = None
        self.csv_dir: Optional[str] = None
        self._csv_started: set[str] = set()
        tb = cfg.get("tensorboard", {})
        if tb.get("enabled"):
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

            self.tensorboard = SummaryWriter(log_dir=os.path.join(tb["output_path"], tb.get("job_name", "")))
        mon = cfg.get("csv_monitor", {})
        if mon.get("enabled"):
            self.csv_dir = os.path.join(mon["output_path"], mon.get("job_name", ""))
            os.makedirs(self.csv_dir, exist_ok=True)
        self.enabled = self.tensorboard is not None or self.csv_dir is not None

    def write_events(self, events: Iterable[tuple[str, Any, int]]) -> None:
        for name, value, step in events:
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(name, value, step)
            if self.csv_dir is not None:
                filename = name.replace("/", "_").replace(" ", "_")
                with open(os.path.join(self.csv_dir, filename + ".csv"), "a+", newline="") as fh:
                    writer = csv.writer(fh)
                    if filename not in self._csv_started:
                        self._csv_started.add(filename)
                        writer.writerow(["step", name.split("/")[-1]])
                    writer.writerow([step, value])
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class TorchEngine:
    """The subset of DeepSpeed's engine the trainer drives, in plain PyTorch (see the module's docstring)."""

    def __init__(self, model: nn.Module, cfg: dict):
        reasons = unsupported_reasons(cfg, world_size=1)
        if reasons:
            raise TorchEngineError("--engine torch cannot run this DeepSpeed config: " + "; ".join(reasons))
        self.config = cfg
        self.precision = precision_of(cfg)
        self.module = model.to(torch.bfloat16) if self.precision == "bf16" else model
        self.micro_batch_size = int(cfg["train_micro_batch_size_per_gpu"])
        self.accumulation = int(cfg["gradient_accumulation_steps"])
        self.clip = float(cfg.get("gradient_clipping", 0.0) or 0.0)
        groups = param_groups(self.module)
        self.params = [p for g in groups for p in g["params"]]
        if self.precision == "bf16":  # fp32 masters in the optimizer, as DeepSpeed's bf16 optimizer
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            by_id = {id(p): m for p, m in zip(self.params, self.masters)}
            groups = [dict(g, params=[by_id[id(p)] for p in g["params"]]) for g in groups]
        else:
            self.masters = self.params
        opt = cfg.get("optimizer", {}).get("params", {})
        kwargs = {k: opt[k] for k in ("fused", "foreach") if k in opt}
        self.optimizer = torch.optim.AdamW(groups, lr=float(opt.get("lr", 1e-3)),
                                           betas=tuple(opt.get("betas", (0.9, 0.999))), eps=float(opt.get("eps", 1e-8)),
                                           weight_decay=float(opt.get("weight_decay", 0.0)), **kwargs)
        sched = cfg.get("scheduler")
        self.lr_scheduler = WarmupSchedule(self.optimizer, sched["type"], sched.get("params", {})) if sched else None
        self.monitor = FileMonitor(cfg)
        self.global_steps = 0
        self.micro_steps = 0
        self._grad_norm: Optional[torch.Tensor] = None

    # -- what the trainer reads ---------------------------------------------------------------------
    def changes(self) -> list[str]:
        stage = zero_stage_of(self.config)
        out = [f"engine: plain PyTorch in one process ({self.precision}"
               + (", bf16 weights with fp32 master weights in torch's AdamW" if self.precision == "bf16" else "")
               + ")"]
        if stage in (1, 2):
            out.append(f"engine: ZeRO-{stage} shards nothing in one process: the torch engine runs it as ZeRO-0")
        return out

    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def gradient_clipping(self) -> float:
        return self.clip

    def bfloat16_enabled(self) -> bool:
        return self.precision == "bf16"

    def fp16_enabled(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """The last boundary's gradient norm before clipping (read back here: call it at log steps only)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    # -- the step -----------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "TorchEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "TorchEngine":
        return self.train(False)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()
        if self.masters is not self.params:  # bf16: accumulate in the fp32 master gradients
            for p, m in zip(self.params, self.masters):
                if p.grad is None:
                    continue
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    def step(self) -> None:
        """After each micro-batch's backward; the optimizer step at the accumulation boundary."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        grads = [m for m in self.masters if m.grad is not None]
        if self.clip > 0:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(grads, self.clip)
        else:
            self._grad_norm = torch.nn.utils.get_total_norm([m.grad for m in grads])
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        self.global_steps += 1

    # -- weights and checkpoints --------------------------------------------------------------------
    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights (the masters under bf16) and the buffers, on the CPU."""
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        out = {name: master_of.get(id(p), p).detach().to("cpu", torch.float32).clone()
               for name, p in self.module.named_parameters()}
        out.update({name: b.detach().to("cpu").clone() for name, b in self.module.named_buffers()})
        return out

    def save_checkpoint(self, save_dir: str, tag: str, client_state: Optional[dict] = None,
                        save_latest: bool = False) -> bool:
        directory = os.path.join(save_dir, tag)
        os.makedirs(directory, exist_ok=True)
        state = {"module": self.fp32_state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                 "global_steps": self.global_steps, "micro_steps": self.micro_steps,
                 "client_state": client_state or {}}
        path = os.path.join(directory, STATES_FILE)
        tmp = f"{path}.partial-{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if save_latest:
            with open(os.path.join(save_dir, "latest"), "w", encoding="utf-8") as fh:
                fh.write(tag)
        return True

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], dict]:
        path = os.path.join(load_dir, tag, STATES_FILE)
        if not os.path.isfile(path):
            return None, {}
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state["module"]
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(weights[name])
                master = master_of.get(id(p), p)
                if master is not p:
                    master.copy_(weights[name])
            for name, b in self.module.named_buffers():
                b.copy_(weights[name])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps = int(state["global_steps"])
        self.micro_steps = int(state["micro_steps"])
        return path, state["client_state"]

    def destroy(self) -> None:
        self.monitor.close()
