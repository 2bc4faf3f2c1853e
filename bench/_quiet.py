"""The quiet-device protocol of bench/gpu_check.py: a worker times only while every other
worker is stopped.

The GPU check builds and compiles its end-to-end variants in parallel worker processes (the
compilations are CPU work that would not fit the time box one after another), but a timing is
only worth having on an otherwise idle device and CPU. So a worker that is warm asks for the
device, the coordinator (the orchestrator) stops every other worker's process group with SIGSTOP
(its queued GPU work drains within the settle time), grants the device, and continues the others
(SIGCONT) when the worker says it is done.

The messages are files in one folder, named by the worker's key (stdlib only, no sockets):
  <key>.req    the worker asks for the device (its content: the time it asked)
  <key>.go     the coordinator grants it (the others are stopped)
  <key>.done   the worker has finished timing
  <key>.phase  the worker's current phase ("building", "warming up", ...), for the timeout rows
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- worker side
class QuietClient:
    """The worker's side: `phase(text)` records what it is doing; `with client.device(): ...` waits
    for the grant and holds the device for the block. `waited_s` / `granted` say how it went.

    With no folder (a worker run by hand) every call is a no-op and the device counts as granted."""

    def __init__(self, folder: str | os.PathLike | None, key: str, wait_limit_s: float = 900.0):
        self.folder = Path(folder) if folder else None
        self.key = _safe(key)
        self.wait_limit_s = wait_limit_s
        self.waited_s = 0.0
        self.granted = self.folder is None

    def _path(self, suffix: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.key}.{suffix}"

    def phase(self, text: str) -> None:
        if self.folder is not None:
            _write_atomic(self._path("phase"), f"{time.time():.3f} {text}")

    def device(self):
        return _Grant(self)


class _Grant:
    def __init__(self, client: QuietClient):
        self.c = client

    def __enter__(self):
        c = self.c
        if c.folder is None:
            return c
        c.phase("waiting for the device")
        t0 = time.monotonic()
        _write_atomic(c._path("req"), f"{time.time():.3f}")
        go = c._path("go")
        while not go.exists():
            if time.monotonic() - t0 > c.wait_limit_s:  # the coordinator is gone: time anyway, and say so
                c.granted = False
                break
            time.sleep(0.01)
        else:
            c.granted = True
        c.waited_s = time.monotonic() - t0
        c.phase("timing")
        return c

    def __exit__(self, *exc):
        c = self.c
        if c.folder is not None:
            _write_atomic(c._path("done"), f"{time.time():.3f}")
            c.phase("timed")
        return False


# ---------------------------------------------------------------------------------------------- coordinator side
def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid` (workers start in their own session)."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class QuietCoordinator:
    """The orchestrator's side. `serve(workers, allow_grants)` is called in its polling loop with
    the live workers {key: pid}; `pause_all` / `resume_all` stop and continue them around a part
    that times things itself (the kernel benchmark). `priority` orders waiting workers."""

    def __init__(self, folder: str | os.PathLike, settle_s: float, priority: list[str], log=print):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settle_s = settle_s
        self.rank = {_safe(k): i for i, k in enumerate(priority)}
        self.holder: str | None = None
        self.stopped: set[int] = set()
        self.paused_s: dict[str, float] = {}  # key -> seconds spent stopped
        self._stop_t: dict[str, float] = {}
        self.log = log

    def phase_of(self, key: str) -> tuple[str, float | None]:
        """(the worker's last phase, seconds since it entered it)."""
        p = self.folder / f"{_safe(key)}.phase"
        try:
            stamp, _, text = p.read_text(encoding="utf-8").partition(" ")
            return text, time.time() - float(stamp)
        except (OSError, ValueError):
            return "starting (no phase reported)", None

    def _stop(self, workers: dict[str, int], keep: str | None) -> None:
        now = time.monotonic()
        for key, pid in workers.items():
            if _safe(key) == keep or pid in self.stopped:
                continue
            if signal_group(pid, signal.SIGSTOP):
                self.stopped.add(pid)
                self._stop_t[key] = now

    def _continue(self, workers: dict[str, int]) -> None:
        now = time.monotonic()
        pid_key = {pid: key for key, pid in workers.items()}
        for pid in list(self.stopped):
            signal_group(pid, signal.SIGCONT)
            key = pid_key.get(pid)
            if key is not None and key in self._stop_t:
                self.paused_s[key] = self.paused_s.get(key, 0.0) + now - self._stop_t.pop(key)
        self.stopped.clear()

    def pause_all(self, workers: dict[str, int]) -> None:
        self._stop(workers, keep=None)
        if self.stopped:
            time.sleep(self.settle_s)

    def resume_all(self, workers: dict[str, int]) -> None:
        self._continue(workers)

    def serve(self, workers: dict[str, int], allow_grants: bool) -> None:
        """One polling round: end a finished grant, start the next one."""
        if self.holder is not None:
            done = (self.folder / f"{self.holder}.done").exists()
            alive = any(_safe(k) == self.holder for k in workers)
            if done or not alive:
                self._continue(workers)
                self.holder = None
        if self.holder is not None or not allow_grants:
            return
        waiting = [k for k in workers if (self.folder / f"{_safe(k)}.req").exists()
                   and not (self.folder / f"{_safe(k)}.go").exists()]
        if not waiting:
            return
        key = min(waiting, key=lambda k: self.rank.get(_safe(k), len(self.rank)))
        self._stop(workers, keep=_safe(key))
        if self.stopped:
            time.sleep(self.settle_s)  # the stopped workers' queued device work drains
        self.holder = _safe(key)
        _write_atomic(self.folder / f"{_safe(key)}.go", f"{time.time():.3f}")

    def release(self, workers: dict[str, int]) -> None:
        """Continue everything (before killing: a stopped process ignores SIGTERM until continued)."""
        self._continue(workers)
        self.holder = None
