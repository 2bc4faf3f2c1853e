"""Stopping on a cluster's notice: SIGTERM / SIGUSR1 end a job after a checkpoint, with exit code 75.

SLURM (at the time limit with ``--signal``, on preemption, ``scancel``), Kubernetes and spot instances
send SIGTERM or SIGUSR1 some time before they take the machine. A job of this runtime then:

- during training: finishes the optimizer step in progress; every rank agrees on the step to stop at
  (`StopAgreement`), a checkpoint is written there, the job exits with `EXIT_PREEMPTED`; ``--resume``
  continues from it exactly;
- before training (setup, data conversion) or after it (the final evaluation, the export): stops at once
  with `EXIT_PREEMPTED` (`StopRequested`): nothing is lost (the caches and exports are written aside and
  renamed, the last checkpoint is complete); running the same command again (with ``--resume`` once a
  checkpoint exists) continues.

A second signal more than `REPEAT_WINDOW_S` after the first ends the process at once, by that signal's
default action (exit status 128 + the signal's number). One arriving sooner is the same notice delivered
twice (SLURM signals every process of a step and a launcher forwards what it receives) and is ignored.

75 is ``EX_TEMPFAIL`` of sysexits.h, "a temporary failure: the user is invited to retry later", distinct
from the job's errors (2 usage, 3 training) and from a process killed by a signal (128 + n): a batch
script requeues on it (README, *On a cluster*).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as tdist

EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0


class StopRequested(BaseException):
    """A stop signal outside the training loop: the job ends at once with `EXIT_PREEMPTED`. A BaseException,
    as KeyboardInterrupt, so that no library's ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The process's SIGTERM / SIGUSR1 handlers while a job runs (a context manager; the previous handlers
    come back on exit).

    ``deferred`` (inside the training loop): a signal is recorded in `received` and the loop stops at the
    next step boundary; otherwise the handler raises `StopRequested`. Handlers can only be installed by the
    main thread: elsewhere `active` stays False and `reason` says why. Processes forked from the job while
    they are installed (data loader workers) ignore these signals: SLURM signals every process of a step
    and a launcher may signal a rank's whole process tree, and a worker that died of it would fail the step
    in progress instead of letting it finish.
    """

    def __init__(self, rank: int = 0, signals: tuple[int, ...] = STOP_SIGNALS,
                 repeat_window_s: float = REPEAT_WINDOW_S):
        self.rank, self.signals, self.repeat_window_s = rank, signals, repeat_window_s
        self.received: Optional[int] = None
        self.received_at = 0.0
        self.deferred = False
        self.active = False
        self.reason = ""
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    @property
    def name(self) -> Optional[str]:
        return None if self.received is None else signal.Signals(self.received).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            self.reason = "not the main thread: Python delivers signals to the main thread only"
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.active = True
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.active = False
        return False

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a process forked from the job's (a data loader worker) inherits this handler: the notice is the
            # job's to act on; the worker ends with it (a worker killed mid-step would fail the step)
            return
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.received is not None:
            if now - self.received_at < self.repeat_window_s:
                return  # the same notice, delivered again (SLURM and a launcher both forward it)
            print(f"[rank {self.rank}] {name} again: exiting at once", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received, self.received_at = signum, now
        if not self.deferred:
            raise StopRequested(signum)
        print(f"[rank {self.rank}] {name}: finishing this optimizer step, then every rank saves a checkpoint and "
              f"exits with code {EXIT_PREEMPTED} (a second {name} exits at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_signals_blocked(signals: tuple[int, ...] = STOP_SIGNALS):
    """SIGTERM / SIGUSR1 blocked in this thread meanwhile: processes started inside (data loader workers) keep
    them blocked (a child inherits the signal mask, through fork and exec), and this process gets any that
    came meanwhile when the block ends. torch's loader workers otherwise die of a SIGTERM that is not their
    parent's ("DataLoader worker ... is killed by signal: Terminated", measured with a SIGTERM to the job's
    process group), failing the step in progress; blocked, they end when the job ends them."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopAgreement:
    """Whether every rank stops after this optimizer step: a stop seen by any rank is all-reduced (MAX of one
    int per step), so all ranks stop at the same step whichever of them got the signal.

    - ``lag`` 0 (CPU, gloo): a blocking all-reduce after every step, read at once: the stop comes after the step
      during which the signal arrived. It costs one small gloo collective per step (measured 1.2-1.4 ms with 2
      processes on a loaded 2-core CPU, against steps of a few tenths of a second for the tiny model and
      seconds for the base one; the loop reads host values every step on CPU anyway).
    - ``lag`` 1 (GPU, NCCL): the all-reduce is launched without waiting after step k, its result copied to
      pinned host memory behind a CUDA event, and read after step k+1, by when it has long finished: no
      host sync per step (the flag is set by a fill kernel, never copied from the host). The stop comes one
      step later than on CPU; nothing is lost (the checkpoint holds every step trained).
    One process: no collective, lag 0.
    """

    def __init__(self, device: torch.device, world: int, lag: Optional[int] = None):
        self.device, self.world = device, world
        self.lag = (0 if device.type == "cpu" else 1) if lag is None else lag
        self._pending: collections.deque = collections.deque()

    def __call__(self, requested: bool, wait: bool = False) -> bool:
        """Call once after every optimizer step, on every rank; True: stop now (every rank gets the same).
        ``wait``: decide now whatever the lag (after the loop: the flags in flight, then this one)."""
        if self.world == 1:
            return requested
        if wait:
            requested = self.drain() or requested
        flag = torch.full((1,), int(requested), dtype=torch.int32, device=self.device)
        if self.lag == 0 or wait:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            return bool(flag.item())
        work = tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # orders the copy after the all-reduce on the current stream; the host does not wait
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((None, host, done))
        else:
            self._pending.append((work, flag, None))
        if len(self._pending) <= self.lag:
            return False
        return self._read(*self._pending.popleft())

    @staticmethod
    def _read(work, host: torch.Tensor, done) -> bool:
        if work is not None:
            work.wait()
        if done is not None:
            done.synchronize()
        return bool(host.item())

    def drain(self) -> bool:
        """After the loop: wait for the flags still in flight; True if any of them asked to stop."""
        stop = False
        while self._pending:
            stop = self._read(*self._pending.popleft()) or stop
        return stop
