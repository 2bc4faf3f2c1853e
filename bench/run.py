"""The lxmert-fast benchmark: end-to-end pre-training against transformers' model, the kernels against
their PyTorch peers, the data pipeline; one table of targets. See bench/README.md.

    python -m bench.run [--out DIR] [--quick] [--parts env,tests,e2e,kernels,data] [--variants ours,hf]
                        [--preset base] [--batch N] [--micro-batch N] [--steps N] [--budget SECONDS]
    bash bench/gpu_check.sh                  # on a GPU machine: install, caches, this with the GPU plan

On a CPU the end-to-end contenders are built in this process and timed in interleaved rounds (base,
batch 16, fp32 by default). On a GPU, and with --dry on a CPU (the same plumbing at tiny shapes), each
end-to-end variant runs in its own worker process: the planner starts as many at once as the GPU's free
memory holds (each variant's estimate, `e2e.Variant.estimate_gb`), they build and compile in the
background, and each times its steps alone, every other worker stopped (SIGSTOP) meanwhile. The GPU part
of the test suite (`pytest -m gpu`) runs first, under a time limit; the kernel groups come after the first
two end-to-end variants. Every planned row ends with a figure or the reason it has none.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from bench import common, e2e, ops, pipeline, report

PARTS = ("env", "tests", "e2e", "kernels", "data")
BENCH = Path(__file__).resolve().parent
# Seconds each part may take at most on a GPU (a dry run: Triton's interpreter on a CPU, looser), and what is
# kept back at the end.
CAPS = {"env": 40, "tests": 180, "kernels": 45, "data": 40}
DRY_CAPS = {"env": 120, "tests": 300, "kernels": 400, "data": 120}
RESERVE_S = 15  # the report and the packing at the end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"), help="where rows.jsonl, results.json, summary.md go")
    p.add_argument("--parts", default=None, help=f"a subset of {','.join(PARTS)} (default: all; tests on a GPU only)")
    p.add_argument("--variants", default=None, help="end-to-end variants by name (default: the plan of the device)")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a smoke test of the harness")
    p.add_argument("--dry", action="store_true", help="the GPU plan's plumbing on a CPU at tiny shapes")
    p.add_argument("--preset", default=None, choices=("base", "tiny"))
    p.add_argument("--batch", type=int, default=None, help="samples per optimizer step (GPU 256, CPU 16)")
    p.add_argument("--micro-batch", type=int, default=None, help="per micro-batch (default: the whole batch)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (the first compiles)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--kernel-batches", default=None, help="kernel part batches (GPU 64,256)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (GPU plan)")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GB the planner may fill (default: the GPU's free memory; a dry run: 40)")
    p.add_argument("--plan-only", action="store_true", help="print the GPU plan (which variants at once) and stop")
    p.add_argument("--simulate-oom", default=None, metavar="VARIANT:PHASE",
                   help="dry runs: that variant runs out of memory while building|warming up|timing")
    p.add_argument("--world", default=None, help="where the bench world is built (default: DIR/.world)")
    p.add_argument("--work", default=None, help="scratch: runs, worker logs and signals (default: DIR/.work)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one end-to-end variant (the GPU plan)
    p.add_argument("--peak-tflops", type=float, default=None, help=argparse.SUPPRESS)
    return p


def settings(a, cuda: bool) -> e2e.Settings:
    small = a.quick or a.dry
    preset = a.preset or ("tiny" if small else "base")
    # 16 at the tiny sizes: transformers' pre-training loss is NaN on a micro-batch without a QA label (its
    # cross-entropy's mean over no item), which micro-batches of 8 of the bench world can be
    batch = a.batch or (16 if small else (256 if cuda else 16))
    out = Path(a.out).resolve()
    return e2e.Settings(preset=preset, batch=batch, micro_batch=a.micro_batch,
                        steps=a.steps or (2 if small else (10 if cuda else 5)), warmup=a.warmup or (1 if small else 3),
                        compile_backend="eager" if not cuda else "inductor",
                        engine="deepspeed" if common.import_error("deepspeed") is None else "torch",
                        threads=a.threads or (1 if small and not cuda else None),
                        world=Path(a.world).resolve() if a.world else out / ".world",
                        work=Path(a.work).resolve() if a.work else out / ".work")


def variants(a, gpu_plan: bool) -> list[e2e.Variant]:
    plan = list(e2e.GPU_VARIANTS if gpu_plan else e2e.CPU_VARIANTS)
    if a.variants:
        known = {v.key: v for v in e2e.GPU_VARIANTS + e2e.CPU_VARIANTS}
        wanted = [w.strip() for w in a.variants.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(known)}")
        plan = [known[w] for w in wanted]
    return plan


def slug(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)


# ---------------------------------------------------------------------------------------------- parts
def compile_cache_row() -> dict:
    """The compile-cache probe: one tiny inductor compile, a hit when the restored cache holds it."""
    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    x = torch.randn(64, device="cuda" if torch.cuda.is_available() else "cpu")
    torch.compile(lambda t: torch.sin(t) * 2 + 1, backend="inductor")(x)
    hit, miss = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return {"part": "env", "key": "env:compile_cache", "status": f"inductor's graph cache: {hit} hit(s), {miss} miss(es)",
            "seconds": time.perf_counter() - t0, "fxgraph_cache_hit": hit, "fxgraph_cache_miss": miss,
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "(torch's default)")}


def tests_row(dry: bool, limit: float, log_path: Path) -> dict:
    """The GPU part of the suite (`pytest -m gpu`) under ``limit`` seconds; a dry run lists its selection."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations=20"]
    if dry:
        cmd.append("--collect-only")
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            rc = subprocess.run(cmd, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = None
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    row = {"part": "tests", "key": "tests:gpu", "command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0,
           "summary": summary, "log": log_path.name}
    if dry:
        selected = [ln for ln in lines if "::" in ln]
        return dict(row, status=f"plan: {len(selected)} tests selected (a dry run collects, runs nothing)",
                    plan=selected)
    if rc is None:
        return dict(row, status=f"no figure (timeout): the GPU tests passed their limit of {limit:.0f} s")
    if rc == 5:
        return dict(row, status="no figure (error): no test carries the gpu marker")
    return dict(row, status="ok" if rc == 0 else f"no figure (error): pytest exited {rc}: {summary}")


# ---------------------------------------------------------------------------------------------- CPU
def cpu_run(a, out: Path, rows_path: Path, parts: list[str], s: e2e.Settings) -> None:
    """Everything in this process: the end-to-end contenders interleaved, then kernels and data."""
    peak = None
    if "env" in parts:
        row = common.peak_row(a.quick)
        common.append_row(rows_path, row)
        peak = row["peak_tflops"]
    if "e2e" in parts:
        for row in e2e.measure_together(variants(a, False), s, peak):
            common.append_row(rows_path, row)
    if "kernels" in parts:
        ops.main([str(rows_path), "2", "dry"])  # the interpreter: a smoke test of the part
    if "data" in parts:
        for row in pipeline.run(s.world, a.quick or a.dry, cuda=False):
            common.append_row(rows_path, row)


# ---------------------------------------------------------------------------------------------- the GPU plan
class Worker:
    def __init__(self, v: e2e.Variant, est: float, proc: subprocess.Popen, log):
        self.v, self.est, self.proc, self.log, self.t0 = v, est, proc, log, time.monotonic()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def plan_params(preset: str) -> int:
    """Parameters of the model a variant holds on the GPU (base: the recipe's, 9500 answers, 30522 words)."""
    from lxmert_fast import LxmertConfig, LxmertForPreTraining

    config = LxmertConfig.preset(preset, vocab_size=e2e.BASE_VOCAB, num_qa_labels=e2e.BASE_ANSWERS)
    with torch.device("meta"):
        return sum(p.numel() for p in LxmertForPreTraining(config).parameters())


def plan(vs: list[e2e.Variant], usable_gb: float, params: int, batch: int) -> dict:
    """Admission in priority order while the resident estimates fit ``usable_gb`` (one always runs): the
    most workers resident at once, each variant's estimate."""
    est = {v.key: round(v.estimate_gb(params, batch), 1) for v in vs}
    resident, most = [], 0
    for v in vs:  # every worker holds its memory until it is timed, in the same order
        while resident and sum(est[k] for k in resident) + est[v.key] > usable_gb:
            resident.pop(0)
        resident.append(v.key)
        most = max(most, len(resident))
    return {"usable_gb": round(usable_gb, 1), "estimates_gb": est, "most_at_once": most}


class Coordinator:
    def __init__(self, a, out: Path, rows_path: Path, parts: list[str], s: e2e.Settings, env: dict):
        self.a, self.out, self.rows_path, self.parts, self.s = a, out, rows_path, parts, s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (a.budget or 10**9)
        self.caps = DRY_CAPS if a.dry else CAPS
        self.work = s.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.vs = variants(a, True)
        self.refused = {v.key: why for v in self.vs if (why := e2e.refusal(v, s))}
        self.pending = [v for v in self.vs if v.key not in self.refused]
        self.workers: dict[str, Worker] = {}
        self.done: set[str] = set()
        self.peak = None
        self.most_resident = 0
        free = a.gpu_memory or (40.0 if a.dry else env.get("gpu_free_gb", 0.0))
        self.usable = 0.9 * free - (2.0 if "tests" in parts else 0.0)
        self.params = plan_params("base")  # a dry run plans for the GPU's shapes too
        self.plan_batch = a.batch if (a.batch and not a.dry) else 256

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def left(self, reserve: float = RESERVE_S) -> float:
        return self.deadline - time.monotonic() - reserve

    def row(self, row: dict) -> None:
        common.append_row(self.rows_path, row)

    # -- workers
    def admit(self) -> None:
        """Start pending workers in priority order while their estimates fit beside the resident ones."""
        while self.pending:
            v = self.pending[0]
            est = v.estimate_gb(self.params, self.plan_batch)
            resident = sum(w.est for w in self.workers.values())
            if self.workers and resident + est > self.usable:
                return
            self.pending.pop(0)
            log = open(self.logs / f"e2e.{slug(v.key)}.log", "wb")
            # niced: a worker compiling must not slow the one timing (which the others' SIGSTOP leaves alone)
            argv = ["nice", "-n", "5", sys.executable, "-m", "bench.run", "--worker", v.key] + self.worker_args()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=common.REPO,
                                    start_new_session=True)
            self.workers[v.key] = Worker(v, est, proc, log)
            self.most_resident = max(self.most_resident, len(self.workers))
            self.say(f"e2e worker started: {v.key} (estimate {est:.1f} GB; {len(self.workers)} resident)")

    def worker_args(self) -> list[str]:
        a = self.a
        args = ["--out", str(self.out), "--world", str(self.s.world), "--work", str(self.s.work)]
        for flag, value in (("--preset", a.preset), ("--batch", a.batch), ("--micro-batch", a.micro_batch),
                            ("--steps", a.steps), ("--warmup", a.warmup), ("--threads", a.threads),
                            ("--simulate-oom", a.simulate_oom), ("--peak-tflops", self.peak)):
            if value is not None:
                args += [flag, str(value)]
        return args + (["--dry"] if a.dry else []) + (["--quick"] if a.quick else [])

    def reap(self) -> None:
        for key, w in list(self.workers.items()):
            if w.proc.poll() is not None:
                w.log.close()
                del self.workers[key]
                self.done.add(key)
                if not any(r.get("key") == f"e2e:{key}" for r in common.read_rows(self.rows_path)):
                    tail = (self.logs / f"e2e.{slug(key)}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    self.row({**e2e.base_row(w.v, self.s), "status": f"no figure (error): the worker exited "
                                                                     f"{w.proc.returncode}: {' '.join(tail)[:200]}"})

    def ready(self, key: str) -> bool:
        return (self.work / f"{slug(key)}.ready").exists()

    def time_one(self, key: str) -> None:
        """Let worker ``key`` time its steps alone: every other worker stopped until it exits."""
        others = [w for k, w in self.workers.items() if k != key]
        for w in others:
            w.signal(signal.SIGSTOP)
        (self.work / f"{slug(key)}.go").touch()
        self.say(f"timing {key} ({len(others)} other worker(s) stopped)")
        try:
            self.workers[key].proc.wait(timeout=max(1.0, self.left()))
        except subprocess.TimeoutExpired:
            pass
        for w in others:
            w.signal(signal.SIGCONT)
        self.reap()

    def serve(self, keys: list[str], until: float) -> None:
        """Time the workers of ``keys`` in priority order as each is ready, starting pending ones as memory
        frees, until all of them are done or ``until``."""
        while time.monotonic() < until:
            self.reap()
            self.admit()
            todo = [k for k in keys if k not in self.done]
            if not todo:
                return
            ready = [k for k in todo if k in self.workers and self.ready(k)]
            if ready:
                self.time_one(ready[0])
            else:
                time.sleep(0.05)

    def stop_all(self, why: str) -> None:
        for key, w in list(self.workers.items()):
            phase_file = self.work / f"{slug(key)}.phase"
            phase = phase_file.read_text().strip() if phase_file.exists() else "starting"
            w.signal(signal.SIGCONT)
            w.signal(signal.SIGKILL)
            w.proc.wait()
            w.log.close()
            del self.workers[key]
            self.row({**e2e.base_row(w.v, self.s), "status": f"no figure (timeout): {why} while it was {phase}, "
                                                             f"{time.monotonic() - w.t0:.0f} s after its start"})
        for v in self.pending:
            self.row({**e2e.base_row(v, self.s), "status": f"no figure (timeout): {why} before it could start "
                                                           f"(memory plan: {self.usable:.0f} GB usable)"})
        self.pending.clear()

    # -- the run
    def run(self) -> None:
        small = self.a.quick or self.a.dry
        if "env" in self.parts:  # the peak first, on an idle device
            row = common.peak_row(small)
            self.row(row)
            self.peak = row["peak_tflops"]
        if "e2e" in self.parts:
            e2e.ensure_world(self.s.world, self.s.preset)  # once, before the workers share it
            for v in self.vs:
                if v.key in self.refused:  # no worker: the row says why
                    self.row({**e2e.base_row(v, self.s), "phase": "planning",
                              "status": f"no figure (unavailable): refused before building: {self.refused[v.key]}"})
                    self.done.add(v.key)
            p = plan(self.pending, self.usable, self.params, self.plan_batch)
            self.row({"part": "plan", "key": "plan:e2e", "status": f"at most {p['most_at_once']} variants at once in "
                      f"{p['usable_gb']} GB", "gpu_memory_gb": self.a.gpu_memory, "order": [v.key for v in self.vs],
                      **p})
            self.say(f"plan: {p}")
            self.admit()
        if "env" in self.parts:
            self.row(compile_cache_row())
        if "tests" in self.parts:
            limit = min(self.caps["tests"], self.left())
            self.say(f"tests: pytest -m gpu (limit {limit:.0f} s)")
            self.row(tests_row(self.a.dry, limit, self.out / "gpu_tests.log"))
        if "e2e" in self.parts:
            self.serve([k for k in e2e.HEAD_OF_LINE if any(v.key == k for v in self.vs)], self.deadline - RESERVE_S
                       - (self.caps["kernels"] if "kernels" in self.parts else 0))
        if "kernels" in self.parts:
            for w in self.workers.values():
                w.signal(signal.SIGSTOP)
            self.say("kernels (end-to-end workers stopped)")
            cmd = [sys.executable, "-m", "bench.ops", str(self.rows_path),
                   self.a.kernel_batches or ("2" if self.a.dry else "64,256"), "dry" if self.a.dry else "gpu"]
            try:
                subprocess.run(cmd, cwd=common.REPO, timeout=max(1.0, min(self.caps["kernels"], self.left())))
            except subprocess.TimeoutExpired:
                self.row({"part": "kernels", "key": "kernels:timeout", "status": "no figure (timeout): the kernel "
                                                                                 "part passed its limit"})
            for w in self.workers.values():
                w.signal(signal.SIGCONT)
        if "e2e" in self.parts:
            self.serve([v.key for v in self.vs], self.deadline - RESERVE_S)
            self.stop_all("the run's budget was spent")
            self.row({"part": "plan", "key": "plan:observed", "status": f"{self.most_resident} variants were "
                      f"resident at once at most", "most_resident": self.most_resident})
        if "data" in self.parts:
            if self.left() < self.caps["data"]:
                self.row({"part": "data", "key": "data:budget", "status": "no figure (timeout): the budget was spent"})
            else:
                for row in pipeline.run(self.s.world, small, cuda=self.s.cuda):
                    self.row(row)
        with tarfile.open(self.out / "logs.tgz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")


def worker_main(a) -> int:
    """One end-to-end variant in this process (started by the coordinator)."""
    s = settings(a, torch.cuda.is_available())
    v = next(v for v in e2e.GPU_VARIANTS if v.key == a.worker)
    base = slug(v.key)

    def on_phase(phase: str) -> None:
        (s.work / f"{base}.phase").write_text(phase)
        if a.simulate_oom == f"{v.key}:{phase}":
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated by --simulate-oom {a.simulate_oom})")

    def wait_turn(_phase: str) -> None:
        (s.work / f"{base}.ready").touch()
        while not (s.work / f"{base}.go").exists():
            time.sleep(0.02)

    row = e2e.measure_alone(v, s, a.peak_tflops, wait_turn, on_phase=on_phase)
    common.append_row(Path(a.out) / "rows.jsonl", row)
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.dry and cuda:
        raise SystemExit("python -m bench.run --dry is the GPU plan on a CPU: hide the GPU (CUDA_VISIBLE_DEVICES=)")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the kernels run in Triton's interpreter
    if a.worker:
        return worker_main(a)
    gpu_plan = cuda or a.dry
    parts = [p.strip() for p in (a.parts or ",".join(PARTS)).split(",") if p.strip()]
    if not gpu_plan and "tests" in parts:
        parts.remove("tests")  # the GPU part of the suite needs a GPU (or a dry run's plan)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; known: {','.join(PARTS)}")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = settings(a, cuda)
    if a.plan_only:
        usable = 0.9 * (a.gpu_memory or 80.0) - 2.0
        print(json.dumps(plan(variants(a, True), usable, plan_params("base"), a.batch or 256)))
        return 0
    rows_path = out / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    env = common.environment()
    common.append_row(rows_path, {"part": "env", "key": "env:record", "status": "ok", "environment": env})
    print(f"lxmert-fast benchmark: {env['hardware']}, torch {env['torch']}, commit {env['commit'][:12]}; parts "
          f"{','.join(parts)}; {'GPU plan' + (' (dry run)' if a.dry else '') if gpu_plan else 'CPU'}; out {out}",
          flush=True)
    if s.engine == "torch":
        print(f"deepspeed does not import ({env['deepspeed_error']}): our recipe runs with --engine torch", flush=True)
    if gpu_plan:
        Coordinator(a, out, rows_path, parts, s, env).run()
    else:
        cpu_run(a, out, rows_path, parts, s)
    print(report.write(out, env, common.read_rows(rows_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
