"""The process: accelerator, torch.distributed through DeepSpeed, device, CPU threads, collectives.

Nothing here runs at import. `start_process` is called by a job's `main()` (or a test): it picks
the accelerator (DS_ACCELERATOR=cpu without a GPU, before DeepSpeed is imported), fills the
single-process launcher variables where no launcher set them (so `python -m ...` works), and
initialises torch.distributed. The collectives below are no-ops in a single process.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as tdist
from torch.distributed import distributed_c10d as c10d

from lxmert_fast.utils import usable_cores


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_accelerator() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (and DS_ACCELERATOR=cpu, before DeepSpeed picks one)."""
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


def start_process(engine: str = "deepspeed", timeout_s: Optional[float] = None) -> Process:
    """The rank, world size and device: torch.distributed initialised through DeepSpeed (``engine``
    "deepspeed"), or, for the one-process torch engine, no process group at all (a launcher's world size
    above 1 is then an error naming it).

    ``timeout_s`` (``--dist_timeout``): how long a collective waits for a peer before it fails (None:
    DeepSpeed's default, 10 minutes or ``DEEPSPEED_TIMEOUT`` minutes). It applies where this call creates
    the process group: a process that already has one (a job run again in the same process) keeps its own."""
    kind = select_accelerator()
    set_single_process_env()
    if engine == "torch":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ValueError(f"--engine torch runs one process; the launcher started {world} (WORLD_SIZE): "
                             f"use --engine deepspeed for several")
        rank = 0
    else:
        import deepspeed  # heavy, and absent where the torch engine is used
        import deepspeed.comm as dist

        if not dist.is_initialized():
            kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            deepspeed.init_distributed(verbose=False, **kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Process(rank, world, device)


def set_collective_timeout(timeout_s: float) -> int:
    """``timeout_s`` on every process group that exists now (returns how many).

    ``init_process_group``'s timeout covers the world group only: DeepSpeed's engine reduces gradients in
    groups of its own (a clone of the world group for data parallelism), which ``new_group`` gives torch's
    default (30 minutes on gloo, 10 on NCCL). Measured: with the world group at 20 s, a rank blocked in
    DeepSpeed's gradient all-reduce behind a stopped peer was still waiting after 60 s. torch has no public
    call for an existing group's timeout; ``_set_pg_timeout`` (torch >= 2.3) is the one it provides."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return 0
    if not hasattr(c10d, "_set_pg_timeout") or not hasattr(c10d, "_world"):
        raise RuntimeError(f"--dist_timeout: torch {torch.__version__} cannot change an existing process group's "
                           f"timeout (torch.distributed.distributed_c10d._set_pg_timeout, torch >= 2.3)")
    groups = [g for g in c10d._world.pg_map if not c10d._rank_not_in_group(g)]
    for group in groups:
        c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
    return len(groups)


class ThreadsError(ValueError):
    """A bad --cpu_threads or OMP_NUM_THREADS (the message names it)."""


def cpu_threads(requested: Optional[int], environ: Optional[Mapping[str, str]] = None) -> int:
    """Torch threads for a CPU process: --cpu_threads, else OMP_NUM_THREADS (as torch reads it), else the
    cores divided among the node's processes (two 2-thread runs on 2 cores crawl at 1/30 speed)."""
    if requested is not None:
        if requested < 1:
            raise ThreadsError(f"--cpu_threads must be at least 1, got {requested}")
        return requested
    omp = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ThreadsError(f"OMP_NUM_THREADS={omp!r}: expected a positive integer (or pass --cpu_threads N)")
        return int(omp)
    cores = usable_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the launcher's: processes on this node
    return max(1, cores // max(1, local))


def leave_process_group(wait: bool = True) -> None:
    """Before a job's script exits after success (or after a stop every rank agreed on): wait for every
    rank (``wait``), then take the process group down.

    Without it the rank hosting the rendezvous store (rank 0) can exit while another rank is still
    finishing, and that rank's communication threads, left running into interpreter shutdown, abort
    it ("terminate called without an active exception", rc -6: seen once in a two-node CPU run).
    Only for a process about to exit: DeepSpeed caches its groups, so a job run again in the same
    process (as the tests run them, through ``main()``) needs its group kept."""
    if tdist.is_available() and tdist.is_initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t

