"""The orchestrator behind bench/gpu_check.sh (read that file first: how to run it, what comes back).

    python3 bench/gpu_check.py --out DIR [--dry] [--parts env,correctness,kernels,e2e,report]

Stdlib only (it never imports torch, so it cannot touch the device itself). It runs the parts of
bench/_gpu_plan.py in order, each as child processes in their own session under the part's time
limit (SIGTERM, then SIGKILL after a grace period), and writes every row into DIR/rows.jsonl the
moment it is measured (the children append there themselves). After each part, every row the plan
expects and that is missing becomes a "no figure" row saying why.

Overlap: the end-to-end workers start right after the environment part and build and compile in
the background through the correctness pass; they are stopped (SIGSTOP) for the whole kernel
benchmark, and in the end-to-end part each warm worker times its steps alone, every other worker
stopped (bench/_quiet.py). So the compilations share the time box without sharing a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _gpu_plan  # noqa: E402
from _common import append_row, read_rows  # noqa: E402
from _quiet import QuietCoordinator, signal_group  # noqa: E402


# ---------------------------------------------------------------------------------------------- rows
def no_figure_row(key: str, kind: str, detail: str, **extra) -> dict:
    part, _, name = key.partition(":")
    row = {"part": part, "key": key, "figure": False, "no_figure": kind, "status": f"no figure ({kind}): {detail}"}
    if part == "e2e":
        row["variant"] = name
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the orchestrator dies (it starts the children in their own
    sessions, which the device machine would otherwise leave running, holding the GPU, after the command
    ends). Linux prctl(PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001
        pass


class Child:
    """One child process in its own session (so its whole process group can be stopped or killed)."""

    def __init__(self, name: str, part: str, argv: list[str], env: dict, log_dir: Path, keys: list[str]):
        self.name, self.part, self.keys = name, part, keys
        self.log_path = log_dir / f"{part}.{name.replace(' ', '_').replace('|', '').replace('+', 'plus')}.log"
        self.log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid
        self.rc = None
        self.t_end = None

    def poll(self):
        if self.rc is None:
            rc = self.popen.poll()
            if rc is not None:
                self.rc = rc
                self.t_end = time.monotonic()
                self.log.close()
        return self.rc

    @property
    def running(self) -> bool:
        return self.poll() is None

    def tail(self, n: int = 12) -> list[str]:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    def last_line(self) -> str:
        t = self.tail(40)
        for line in reversed(t):  # the exception line of a traceback, else the last line
            if "Error" in line or "error" in line or "Exception" in line:
                return line.strip()[:300]
        return t[-1].strip()[:300] if t else "(no output)"


def kill_group(children: list["Child"], grace: float) -> None:
    """SIGCONT (a stopped process ignores SIGTERM) + SIGTERM, then SIGKILL after `grace` seconds."""
    live = [c for c in children if c.running]
    for c in live:
        signal_group(c.pid, signal.SIGCONT)
        signal_group(c.pid, signal.SIGTERM)
    t_end = time.monotonic() + grace
    while time.monotonic() < t_end and any(c.running for c in live):
        time.sleep(0.05)
    for c in live:
        if c.running:
            signal_group(c.pid, signal.SIGKILL)
    for c in live:
        try:
            c.popen.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        c.poll()


# ---------------------------------------------------------------------------------------------- the run
class Check:
    def __init__(self, a):
        self.a = a
        self.dry = a.dry
        self.out = Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.out / "rows.jsonl"
        # not under OUT: only a few files come back from there
        self.work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="lxmert_gpu_check_"))
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.quiet_dir = self.work / "quiet"
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())  # the shell's start: install included
        self.budget = a.budget or (_gpu_plan.DRY_BUDGET_S if self.dry else _gpu_plan.BUDGET_S)
        self.caps = _gpu_plan.DRY_CAPS if self.dry else _gpu_plan.CAPS
        self.parts = [p.strip() for p in a.parts.split(",") if p.strip()]
        bad = [p for p in self.parts if p not in _gpu_plan.PARTS]
        if bad:
            raise SystemExit(f"gpu_check: unknown parts {bad}; known: {list(_gpu_plan.PARTS)}")
        self.timings: list[dict] = []
        self.e2e_workers: list[Child] = []
        self.e2e_pending: list[dict] = []
        self.paused = False  # the end-to-end workers are stopped (kernel timing)
        self.coord = QuietCoordinator(self.quiet_dir, settle_s=0.05 if self.dry else 0.3,
                                      priority=[v["key"] for v in _gpu_plan.E2E_VARIANTS], log=self.say)
        self.env = self._child_env()

    # -- output
    def say(self, *args) -> None:
        print(f"[{time.time() - self.t0:6.1f}s]", *args, flush=True)

    def row(self, row: dict) -> None:
        append_row(self.rows_path, row)

    def have(self) -> set[str]:
        return {r.get("key") for r in read_rows(self.rows_path)}

    # -- environment of the children
    def _child_env(self) -> dict:
        env = dict(os.environ)
        paths = [str(REPO), str(REPO / "kernels"), str(BENCH)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   GPU_CHECK_ROWS=str(self.rows_path), GPU_CHECK_QUIET=str(self.quiet_dir),
                   GPU_CHECK_T0=str(self.t0))
        if self.dry:
            # CPU only, even on a machine with a GPU; the Triton kernels in the interpreter
            env.update(GPU_CHECK_DRY="1", CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", DS_ACCELERATOR="cpu",
                       OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        else:
            env.pop("GPU_CHECK_DRY", None)
            env.pop("TRITON_INTERPRET", None)
        return env

    def spawn(self, name: str, part: str, argv: list[str], keys: list[str], env: dict | None = None) -> Child:
        return Child(name, part, [sys.executable, *argv], env or self.env, self.logs, keys)

    # -- time
    def elapsed(self) -> float:
        return time.time() - self.t0

    def limit_for(self, part: str) -> float:
        later = self.parts[self.parts.index(part) + 1:]
        reserved = sum(_gpu_plan.RESERVE[p] + _gpu_plan.GRACE_S for p in later) + _gpu_plan.GRACE_S
        left = self.budget - 3 - self.elapsed() - reserved
        return max(0.0, min(self.caps[part], left))

    # -- parts
    def run(self) -> int:
        self.say(f"gpu_check{' (dry run: CPU, tiny shapes)' if self.dry else ''}: parts {','.join(self.parts)}; "
                 f"budget {self.budget} s from the script's start ({self.elapsed():.0f} s ago); rows -> {self.rows_path}")
        self.install_row()
        try:
            for part in self.parts:
                getattr(self, f"part_{part}")()
        finally:
            self.coord.release({c.name: c.pid for c in self.e2e_workers if c.running})
            kill_group(self.e2e_workers, 1.0)
            child = getattr(self, "report_child", None)
            if child is not None and child.rc == 0:
                self.report_text = child.log_path.read_text(encoding="utf-8", errors="replace")
            self.pack_logs()
            if not self.a.work:
                shutil.rmtree(self.work, ignore_errors=True)
        self.print_last()
        return 0

    def timed_part(self, part: str, children_fn, expected: list[str], e2e: bool = False) -> None:
        """Run the children `children_fn(deadline)` starts, under the part's limit; then write a "no
        figure" row for every expected key still missing. e2e: also watch the end-to-end workers, start
        the pending ones and serve their requests for the quiet device."""
        limit = self.limit_for(part)
        t_start = time.monotonic()
        if limit < 5:
            self.say(f"== {part}: skipped, the budget is spent ({self.elapsed():.0f} s of {self.budget})")
            for key in sorted(set(expected) - self.have()):
                self.row(no_figure_row(key, "budget", f"part '{part}' not run: the {self.budget} s budget was spent"))
            self.timings.append({"part": part, "seconds": 0.0, "limit_s": 0, "outcome": "skipped (budget)"})
            return
        self.say(f"== {part} (limit {limit:.0f} s)")
        deadline = t_start + limit
        children = children_fn(deadline) or []
        watch = children + (self.e2e_workers if e2e else [])
        while (any(c.running for c in watch) or (e2e and self.e2e_pending)) and time.monotonic() < deadline:
            if e2e:
                self.serve_e2e()
            self.start_e2e_pending()  # workers waiting for a free slot (never while the kernels are timed)
            if e2e:
                watch = children + self.e2e_workers
            time.sleep(0.05)
        timed_out = [c for c in watch if c.running]
        if timed_out:
            self.say(f"   {part}: limit of {limit:.0f} s reached; stopping {', '.join(c.name for c in timed_out)}")
            phases = {c.name: self.coord.phase_of(c.name) for c in timed_out}
            self.coord.release({c.name: c.pid for c in self.e2e_workers if c.running})
            kill_group(timed_out, _gpu_plan.GRACE_S)
        else:
            phases = {}
        have = self.have()
        for key in expected:
            if key in have:
                continue
            owner = next((c for c in watch if key in c.keys), None)
            if owner is None and any(p["key"] == key for p in self.e2e_pending):
                self.row(no_figure_row(key, "timeout", f"not started: part '{part}' reached its limit of {limit:.0f} s "
                                                        f"while the worker waited for a free slot"))
            elif owner is None:
                self.row(no_figure_row(key, "error", f"no process of part '{part}' measures it"))
            elif owner in timed_out:
                phase, since = phases.get(owner.name, ("?", None))
                extra = {}
                detail = f"part '{part}' reached its limit of {limit:.0f} s"
                if part == "e2e":
                    paused = self.coord.paused_s.get(owner.name, 0.0)
                    detail += (f"; the worker was {phase}" + (f" (for {since:.0f} s)" if since is not None else "")
                               + f", {time.monotonic() - owner.t0:.0f} s after its start, {paused:.0f} s of them "
                               f"stopped while others timed")
                    extra = {"phase": phase, "worker_s": round(time.monotonic() - owner.t0, 1), "paused_s": round(paused, 1)}
                self.row(no_figure_row(key, "timeout", detail, **extra))
            else:
                self.row(no_figure_row(key, "error", f"{owner.name} exited with rc {owner.rc} without this row: "
                                                      f"{owner.last_line()}", log=owner.log_path.name))
        for c in watch:
            if c.rc not in (0, None) and not (c in timed_out):
                self.say(f"   {c.name}: rc {c.rc}; last lines of {c.log_path.name}:")
                for line in c.tail(8):
                    print(f"      {line}", flush=True)
        seconds = time.monotonic() - t_start
        with_figure = {r.get("key") for r in read_rows(self.rows_path) if r.get("figure") is not False}
        figures = sum(1 for k in expected if k in with_figure)
        outcome = (f"{figures} of {len(expected)} rows with a figure" if expected else
                   ("ok" if all(c.rc == 0 for c in children) else "errors"))
        if timed_out:
            outcome += ", limit reached"
        elif any(c.rc not in (0, None) for c in children):
            outcome += f", {sum(1 for c in children if c.rc not in (0, None))} process(es) failed"
        self.timings.append({"part": part, "seconds": round(seconds, 1), "limit_s": round(limit), "outcome": outcome})
        self.row({"part": "timing", "key": f"timing:{part}", "seconds": round(seconds, 1), "limit_s": round(limit),
                  "outcome": outcome, "at_s": round(self.elapsed(), 1)})
        self.say(f"== {part}: {outcome}, {seconds:.1f} s")

    def install_row(self) -> None:
        rc = os.environ.get("GPU_CHECK_INSTALL_RC")
        secs = os.environ.get("GPU_CHECK_INSTALL_S")
        note = os.environ.get("GPU_CHECK_INSTALL_NOTE", "")
        base = {"part": "env", "key": "env:install", "seconds": float(secs) if secs else None}
        if rc is None:
            self.row(no_figure_row("env:install", "skipped", note or "no wheel install (not run through gpu_check.sh)",
                                   seconds=base["seconds"]))
        elif rc == "0":
            self.row({**base, "figure": True, "status": "ok", "note": note})
        elif rc == "skipped":
            self.row(no_figure_row("env:install", "skipped", note, seconds=base["seconds"]))
        else:
            self.row(no_figure_row("env:install", "timeout" if rc in ("124", "137") else "error",
                                   f"pip install of .whl/ exited {rc}: {note}", seconds=base["seconds"]))

    def part_env(self) -> None:
        self.timed_part("env", lambda d: [self.spawn("env", "env", [str(BENCH / "gpu_env.py")],
                                                     [k for k in _gpu_plan.ENV_KEYS if k != "env:install"])],
                        _gpu_plan.expected_keys("env", self.dry))

    def part_correctness(self) -> None:
        if "e2e" in self.parts:
            self.start_e2e_workers()  # they build and compile through this part

        def start(deadline):
            return [self.spawn(f"correctness {g}", "correctness", [str(BENCH / "gpu_correctness.py"), "--group", g],
                               [f"correctness:{c}" for c in checks])
                    for g, checks in _gpu_plan.CORRECTNESS.items()]

        self.timed_part("correctness", start, _gpu_plan.expected_keys("correctness", self.dry))

    def part_kernels(self) -> None:
        live = {c.name: c.pid for c in self.e2e_workers if c.running}
        if live:
            self.say(f"   stopping {len(live)} end-to-end workers while the kernels are timed")
            self.coord.pause_all(live)
        self.paused = True
        try:
            batches = _gpu_plan.DRY_KERNEL_BATCHES if self.dry else _gpu_plan.KERNEL_BATCHES
            self.timed_part("kernels", lambda d: [self.spawn("kernels", "kernels", [
                str(BENCH / "bench_kernels.py"), "--gpu-check", "--batches", ",".join(map(str, batches))],
                _gpu_plan.kernel_groups(self.dry))], _gpu_plan.expected_keys("kernels", self.dry))
        finally:
            self.paused = False
            self.coord.resume_all({c.name: c.pid for c in self.e2e_workers if c.running})

    # -- e2e workers
    def start_e2e_workers(self) -> None:
        if self.e2e_workers or self.e2e_pending:
            return
        env_rows = [r for r in read_rows(self.rows_path) if r.get("key") in ("env:versions", "env:peak_matmul")]
        versions = next((r for r in env_rows if r["key"] == "env:versions"), {})
        peak = next((r for r in env_rows if r["key"] == "env:peak_matmul" and r.get("figure")), {})
        if versions.get("deepspeed_importable") is False:
            self.say(f"   deepspeed does not import ({versions.get('deepspeed_error')}): the DeepSpeed variants run in "
                     f"the plain loop with torch's fused AdamW, labelled so")
        for spec in _gpu_plan.E2E_VARIANTS:
            key = f"e2e:{spec['key']}"
            argv = [str(BENCH / "e2e_worker.py"), "--spec", json.dumps(spec), "--nice", "5"]
            if peak.get("peak_tflops"):
                argv += ["--peak-tflops", str(peak["peak_tflops"])]
            self.e2e_pending.append({"key": key, "name": spec["key"], "argv": argv})
        self.say(f"   starting {len(self.e2e_pending)} end-to-end workers in the background "
                 f"(at most {self.max_concurrent()} at a time)")
        self.start_e2e_pending()

    def max_concurrent(self) -> int:
        return _gpu_plan.DRY_E2E_CONCURRENT if self.dry else _gpu_plan.E2E_CONCURRENT

    def start_e2e_pending(self) -> None:
        if self.paused or not self.e2e_pending:
            return
        # a worker that is warm and waiting holds little; the ones still building count against the limit
        busy = [c for c in self.e2e_workers if c.running and self.coord.phase_of(c.name)[0] not in
                ("waiting for the device", "timing", "timed")]
        while self.e2e_pending and len(busy) < self.max_concurrent():
            p = self.e2e_pending.pop(0)
            env = dict(self.env)
            if not self.dry:
                env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")  # several compilations share 16 cores
            c = self.spawn(p["name"], "e2e", p["argv"], [p["key"]], env)
            self.e2e_workers.append(c)
            busy.append(c)

    def serve_e2e(self) -> None:
        self.coord.serve({c.name: c.pid for c in self.e2e_workers if c.running}, allow_grants=True)
        for c in self.e2e_workers:  # a worker whose row is written but that hangs on its way out (NCCL, ...)
            phase, since = self.coord.phase_of(c.name)
            if phase == "row written" and since is not None and since > 15 and c.running:
                self.say(f"   {c.name}: row written {since:.0f} s ago but still running; killed")
                kill_group([c], 1.0)

    def part_e2e(self) -> None:
        self.start_e2e_workers()  # when the correctness part was not run
        # the workers already run; the pending ones start as others finish building (inside the loop)
        self.timed_part("e2e", lambda d: [], _gpu_plan.expected_keys("e2e", self.dry), e2e=True)
        self.e2e_pending.clear()

    def part_report(self) -> None:
        self.report_child = None

        def start(deadline):
            self.report_child = self.spawn("report", "report", [str(BENCH / "gpu_report.py"), "--out", str(self.out),
                                                                "--timings", json.dumps(self.timings)], [])
            return [self.report_child]

        self.timed_part("report", start, [])

    # -- the end
    def pack_logs(self) -> None:
        try:
            with tarfile.open(self.out / "logs.tgz", "w:gz") as tar:
                tar.add(self.logs, arcname="logs")
        except OSError as err:
            self.say(f"logs.tgz not written: {err}")

    def print_last(self) -> None:
        """Each part's time, then the report's tables (the end-to-end table last)."""
        print("\nparts (seconds, limit, outcome):", flush=True)
        for t in self.timings:
            print(f"  {t['part']:<12} {t['seconds']:>6.1f} s  (limit {t['limit_s']:>4} s)  {t['outcome']}")
        print(f"  total        {self.elapsed():>6.1f} s of the {self.budget} s budget (install included)", flush=True)
        text = getattr(self, "report_text", "")
        if "end-to-end pre-training" in text:
            print(text[text.index("\n== tables"):] if "\n== tables" in text else text, flush=True)
        else:
            print("\n(the report part gave no tables; a plain listing of the rows follows)")
            fallback_table(read_rows(self.rows_path))


def fallback_table(rows: list[dict]) -> None:
    """Without the report (it failed or timed out): the end-to-end rows as plain text."""
    for r in rows:
        if r.get("part") == "correctness":
            print(f"  correctness {r.get('key', '')[12:]:<34} {r.get('status')}")
    print("\nend-to-end pre-training (fallback listing)")
    for r in rows:
        if r.get("part") == "e2e":
            fig = f"{r['samples_per_s']:.1f} samples/s" if r.get("samples_per_s") else ""
            print(f"  {r.get('variant', '?'):<30} {fig:<20} {str(r.get('status'))[:110]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/lxmert_gpu_check", help="folder for what comes back")
    ap.add_argument("--work", default=None, help="folder for logs and protocol files (default OUT/.work)")
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="the plumbing on CPU at tiny shapes (GPU_CHECK_DRY=1)")
    ap.add_argument("--parts", default=os.environ.get("GPU_CHECK_PARTS") or ",".join(_gpu_plan.PARTS))
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET") or 0),
                    help="seconds from the script's start (default 360; dry 600)")
    a = ap.parse_args(argv)

    def stop(signum, frame):  # the outer `timeout`: clean up the children (their own sessions) on the way out
        raise SystemExit(f"gpu_check: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    return Check(a).run()


if __name__ == "__main__":
    sys.exit(main())
