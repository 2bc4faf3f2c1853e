"""DeepSpeed plumbing shared by the training scripts.

- `init_distributed`: single-process defaults for RANK/WORLD_SIZE/MASTER_* so that a plain
  `python -m lxmert_fast.pretrain` works, then `deepspeed.init_distributed`.
- `prepare_ds_config`: the DeepSpeed config owns batch size, precision, optimizer, scheduler,
  clipping and ZeRO; the script only fills the values marked "auto" (batch split, scheduler step
  counts, monitor paths) and checks that the batch fits the world size. Without a GPU it requires
  `torch_adam` and, unless the config chooses "fused" / "foreach" itself, asks for torch's fused
  AdamW (see bench/RESULTS.md for the optimizer-step figures behind that).
- `param_groups`: no weight decay on biases and LayerNorm weights.
- `CheckpointManager`: DeepSpeed checkpoints with client state (step, epoch, sampler position,
  per-rank RNG states), `latest` written atomically after the tag is complete, last K kept.
- `export_hf`: full fp32 weights (ZeRO shards consolidated) -> an HF directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

AUTO = "auto"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIG_DIR = os.path.join(REPO_ROOT, "ds_configs")


class DSConfigError(ValueError):
    """The DeepSpeed config does not fit the run (the message names the values involved)."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad checkpoint...); the message says why."""


# ---------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_accelerator() -> str:
    """'cuda' when a GPU is visible, else 'cpu'; sets DS_ACCELERATOR=cpu (before DeepSpeed picks one)."""
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def set_single_process_env() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for a single process, where a launcher has not set them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size, device)."""
    kind = select_accelerator()
    set_single_process_env()
    import deepspeed
    import deepspeed.comm as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------- config
def default_ds_config_path() -> str:
    """ds_configs/zero2.json with a GPU, ds_configs/cpu.json without."""
    name = "zero2.json" if torch.cuda.is_available() else "cpu.json"
    return os.path.join(DS_CONFIG_DIR, name)


def load_ds_config(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        alt = os.path.join(DS_CONFIG_DIR, path)
        if os.path.isfile(alt):
            path = alt
        else:
            raise DSConfigError(f"DeepSpeed config {path!r}: no such file (configs shipped in {DS_CONFIG_DIR})")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DSConfigError(f"DeepSpeed config {path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def _is_auto(value: Any) -> bool:
    return value is None or value == AUTO


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DSConfigError(f"DeepSpeed config: {name} = {value!r}: expected a positive integer or \"auto\"")
    return value


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


def precision_of(cfg: dict) -> str:
    """'bf16', 'fp16' or 'fp32' from a DeepSpeed config."""
    if cfg.get("bf16", {}).get("enabled", False) or cfg.get("bfloat16", {}).get("enabled", False):
        return "bf16"
    if cfg.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"


def zero_stage_of(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def prepare_ds_config(
    cfg: dict,
    *,
    world_size: int,
    total_steps: int,
    output_dir: str,
    micro_batch_size: Optional[int] = None,
    warmup_ratio: float = 0.05,
    job_name: str = "pretrain",
    on_gpu: Optional[bool] = None,
) -> dict:
    """A copy of `cfg` with every "auto" filled; raises DSConfigError on what cannot be filled or fit.

    `on_gpu` (default: whether CUDA is available) decides the CPU checks and defaults."""
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
    for section in ("tensorboard", "csv_monitor"):
        mon = cfg.get(section)
        if isinstance(mon, dict):
            if mon.get("output_path") == AUTO:
                mon["output_path"] = os.path.join(output_dir, "logs")
            if mon.get("job_name") == AUTO:
                mon["job_name"] = job_name
    left = _find_auto(cfg)
    if left:
        raise DSConfigError(f"DeepSpeed config: cannot fill \"auto\" for {left}")
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if not on_gpu:
        opt = cfg.get("optimizer", {})
        offload = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if opt.get("type", "").lower() in ("adam", "adamw") and not opt.get("params", {}).get("torch_adam") \
                and offload in (None, "none"):
            raise DSConfigError(
                "DeepSpeed config: optimizer.params.torch_adam must be true without a GPU (FusedAdam needs CUDA); "
                f"use {os.path.join(DS_CONFIG_DIR, 'cpu.json')}"
            )
        if precision_of(cfg) == "fp16":
            raise DSConfigError("DeepSpeed config: fp16 needs a GPU; on CPU use fp32 or bf16")
        params = opt.get("params", {})
        if params.get("torch_adam") and "fused" not in params and "foreach" not in params:
            # DeepSpeed hands these on to torch.optim.AdamW, whose CPU default is the per-tensor loop:
            # on ZeRO's flat fp32 partition that loop allocates and streams several model-sized
            # temporaries (measured 5.2 s of a 6.6 s step, base model, 1 thread); the fused CPU kernel
            # updates in one pass. A config that names "fused" or "foreach" keeps its choice.
            params["fused"] = True
    return cfg


# ---------------------------------------------------------------------------------------------- model
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
    import deepspeed

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
    sched_name = type(sched).__name__ if sched is not None else "constant"
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


# ---------------------------------------------------------------------------------------------- checkpoints
_TAG_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


class CheckpointManager:
    """Save / resume DeepSpeed checkpoints under `directory`, keeping the last `keep`.

    A checkpoint is the tag directory DeepSpeed writes (model + ZeRO optimizer shards + client
    state) plus our per-rank RNG states inside the client state. `latest` names the newest
    complete tag and is replaced atomically only after every rank has finished writing.
    """

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
        from lxmert_fast.utils import atomic_write_text

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


# ---------------------------------------------------------------------------------------------- export
def full_fp32_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """The model's full fp32 weights on CPU, on rank 0 (None elsewhere). Collective: call on every rank.

    ZeRO-1/2 and the bf16/fp16 optimizers: the fp32 master copy (`safe_get_full_fp32_param`);
    ZeRO-3: the partitions gathered; plain fp32: the module's parameters.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().clone()
            else:
                full = param.detach()
        if rank == 0:
            out[name] = full.detach().to("cpu", torch.float32).clone()
    for name, buf in module.named_buffers():
        if rank == 0:
            out[name] = buf.detach().to("cpu").clone()
    return out if rank == 0 else None


def export_hf(engine, build_model: Callable[[], nn.Module], directory: str) -> Optional[str]:
    """Write an HF directory (config.json + model.safetensors) from the engine's fp32 weights.

    Collective (all ranks call it); rank 0 writes. `build_model()` makes a CPU model of the same config.
    """
    state = full_fp32_state_dict(engine)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        model = build_model()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TrainingError(f"export: state dict does not fit the model: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(directory)
    barrier()
    return directory if rank == 0 else None


def grad_norm(parameters: Iterable[nn.Parameter]) -> Optional[float]:
    """The global L2 norm of the gradients (all ranks hold the same ones without ZeRO); None if there are none."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def atomic_write_json(path: str, obj: Any) -> None:
    from lxmert_fast.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def finite_or_raise(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise TrainingError(f"{what} is not finite ({value})")


def chunks(seq: Iterable, size: int):
    buf = []
    for x in seq:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
