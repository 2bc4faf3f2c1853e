"""The lxmert-fast benchmark suite.

    python bench/run.py [--out DIR] [--quick] [--parts peak,e2e,kernels,data] [--batch 256]
                        [--micro-batch M] [--variants "hf,ours sdpa"] [--ablations auto|on|off]
    deepspeed --num_gpus N bench/run.py ...      # N devices, with scaling efficiency

Parts (each writes JSON lines into DIR as it goes, so a part cut short keeps what it measured):
  peak     the device's measured dense matrix rate (bf16 8192^3 on GPU, fp32 2048^3 on CPU), median
           of several runs: the denominator of every MFU figure      -> peak.jsonl
  e2e      end-to-end pre-training throughput of LXMERT (base config, 20 tokens, 36 objects, masking
           per step on the device): transformers' LxmertForPreTraining (the peer; bf16 autocast on
           GPU, fp32 on CPU), the same under torch.compile, and ours with each attention backend
           under DeepSpeed (zero2.json: ZeRO-2, bf16 on GPU; cpu.json: no ZeRO, fp32, torch's fused AdamW
           on CPU); then the ablations of the speed work.
           Per variant: samples/s, TFLOP/s, MFU, peak memory, ratio to the peer of this run, the
           20-epoch recipe's wall time on 1 and N devices and the ratio to the 4x Titan Xp rate.
           Warm-up steps, CUDA-event (GPU) or synchronised perf_counter (CPU) timing, medians -> e2e.jsonl
  kernels  bench/bench_kernels.py (GPU; on CPU an interpreter smoke test)  -> bench_kernels.jsonl
  data     bench/bench_data.py on the demo world: conversion, loader, masking -> data.jsonl
Then: results.json (environment + every row), summary.md, throughput.png and kernel_speedups.png
(when matplotlib is importable), and a table printed last.

Defaults: on a GPU batch 256 per optimizer step, micro-batch 256 / N per device, 5 warm-up steps,
median of 20. Without a GPU (a 256-sample step of the base model takes minutes on a few cores):
steps of 2 micro-batches of 8, 1 warm-up step, median of 3, reported as the recipe's 256-sample
step composed from the measured micro-steps (--compose-batch 256). On a shared, loaded CPU use
--threads 1 and --interleave (see bench/RESULTS.md). --quick: the tiny preset, batch 4 (micro 2),
1 + 2 steps, every part at its smallest (CI runs it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO), str(REPO / "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton decides interpreter vs compiled when @triton.jit functions are defined (DeepSpeed and
    # transformers import triton too): without a GPU the kernel part needs the interpreter, set first.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import _common  # noqa: E402
import _report  # noqa: E402

PARTS = ("peak", "e2e", "kernels", "data")
PART_FILES = {"peak": "peak.jsonl", "e2e": "e2e.jsonl", "kernels": "bench_kernels.jsonl", "data": "data.jsonl"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"), help="output folder (default bench/results)")
    p.add_argument("--quick", action="store_true", help="every part at tiny sizes (a smoke test, seconds)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--preset", default=None, choices=["base", "small", "tiny"],
                   help="model size (default base; tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="global samples per optimizer step (GPU default 256)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-device micro-batch (default batch / devices)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    p.add_argument("--variants", default=None,
                   help="comma-separated main variants to run (hf, hf+compile, ours eager, ours sdpa, "
                        "ours triton, ours flash_attn); default all")
    p.add_argument("--ablations", default="auto", choices=["auto", "on", "off", "only"],
                   help="the speed-work ablations (auto: on with a GPU or --quick; only: just them, added to the "
                        "e2e rows already in DIR, against their best backend)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager, i.e. dynamo only, with --quick on CPU)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the variants round-robin this many times (each round rebuilds them); the "
                        "median pools every round's steps: spreads slow drifts in a shared machine's load")
    p.add_argument("--interleave", action="store_true",
                   help="build the variants side by side and time them one step each in turn (robust ratios on "
                        "a loaded machine; needs the memory of all of them; no per-variant peak memory)")
    p.add_argument("--compose-batch", type=int, default=None,
                   help="also report a step of this batch (e.g. the recipe's 256) composed from the measured "
                        "micro-steps (n-1 forward+backward ones + the boundary one with the optimizer): for CPUs, "
                        "where timing full 256-sample steps repeatedly takes too long. Needs --batch >= 2 micro-batches")
    p.add_argument("--variant-timeout", type=float, default=None, help="seconds per e2e variant (failed row after)")
    p.add_argument("--project-devices", type=int, default=None,
                   help="N for the recipe wall-time projection (default: the devices of this run, or 8)")
    p.add_argument("--kernel-batches", default=None,
                   help="kernel part, GPU: comma-separated batch sizes (default 32,128,512; 32 with --quick)")
    p.add_argument("--kernel-no-compile", action="store_true",
                   help="kernel part: leave out the torch.compile peers (each shape costs a compilation)")
    p.add_argument("--data-workers", type=int, default=None, help="loader / converter workers of the data part")
    p.add_argument("--no-scaling-reference", action="store_true",
                   help="with N > 1 devices: skip the 1-device run that scaling efficiency needs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick on CPU, where a shared, loaded "
                        "CPU makes multi-threaded tiny ops erratic)")
    p.add_argument("--report-only", action="store_true", help="rebuild results.json / summary / plots from DIR")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve_defaults(a, world: int) -> None:
    cuda = torch.cuda.is_available()
    if a.preset is None:
        a.preset = "tiny" if a.quick else "base"
    cpu_full = not cuda and not a.quick
    if a.batch is None:
        # CPU: 2 micro-batches of 8 per measured step, reported as the recipe's 256 (composed)
        a.batch = 4 * world if a.quick else (256 if cuda else 16 * world)
        if cpu_full and a.compose_batch is None and a.micro_batch is None:
            a.compose_batch = 256
    if a.micro_batch is None:
        a.micro_batch = max(1, (a.batch // world) // (1 if (cuda and not a.quick) else 2))
    if a.warmup is None:
        a.warmup = 1 if (a.quick or not cuda) else 5
    if a.steps is None:
        a.steps = 2 if a.quick else (20 if cuda else 3)
    if a.compile_backend is None:
        a.compile_backend = "eager" if (a.quick and not cuda) else "inductor"
    if a.threads is None and a.quick and not cuda:
        a.threads = 1
    if a.project_devices is None:
        a.project_devices = world if world > 1 else 8


def log0(rank: int):
    def log(*args):
        if rank == 0:
            print(*args, flush=True)
    return log


# ---------------------------------------------------------------------------------------------- parts
def run_peak(out: Path, env: dict, quick: bool, rank: int) -> dict:
    row = {**env, **_common.measured_matmul_peak(quick)}
    if rank == 0:
        (out / PART_FILES["peak"]).unlink(missing_ok=True)
        _common.append_row(out / PART_FILES["peak"], row)
    return row


def run_e2e(a, out: Path, env: dict, peak: dict | None, world: int, rank: int, single: dict[str, float],
            notes: list[str], log) -> list[dict]:
    import _e2e

    cuda = torch.cuda.is_available()
    s = _e2e.Settings(preset=a.preset, batch=a.batch, micro_batch=a.micro_batch, warmup=a.warmup, steps=a.steps,
                      device="cuda" if cuda else "cpu", world_size=world, rank=rank,
                      variant_timeout=a.variant_timeout, quick=a.quick, compile_mode=a.compile_mode,
                      compile_backend=a.compile_backend, compose_batch=a.compose_batch)
    if cuda:
        s.device = f"cuda:{torch.cuda.current_device()}"
    path = out / PART_FILES["e2e"]
    only = a.ablations == "only"
    # --ablations only: add to the rows already in DIR (their peer and best backend), keep them
    earlier = [r for r in _common.read_rows(path) if r.get("group") == "main"] if only else []
    if rank == 0:
        path.unlink(missing_ok=True)
        for r in earlier:
            _common.append_row(path, r)
    peak_tflops = peak["peak_tflops"] if peak else None
    variants = _e2e.main_variants()
    if getattr(a, "deepspeed_error", None):
        variants = [_e2e.without_deepspeed(v) if v.kind == "ours" else v for v in variants]
    if a.variants:
        wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
        known = {v.name: v for v in variants}
        for b in _e2e.BACKENDS:  # ablations can be asked for by name too ("ours sdpa | torch.compile")
            known.update({v.name: replace(v, group="main") for v in _e2e.ablation_variants(b) if v.name not in known})
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {list(known)}")
        variants = [known[w] for w in wanted]
    ablate = a.ablations in ("on", "only") or (a.ablations == "auto" and (cuda or a.quick))
    rows: list[dict] = list(earlier)

    def record(row: dict) -> None:
        """Add a finished variant's row: scaling against the single-device run, ratios, the JSONL file."""
        ref = single.get(row["variant"])
        if ref and row.get("status") == "ok":
            row["single_device_samples_per_s"] = ref
            row["scaling_efficiency"] = row["samples_per_s"] / (world * ref)
        rows.append(row)
        _e2e.add_ratios(rows)
        if rank == 0:
            _common.append_row(path, row)

    def measure_all(vs) -> None:
        """Each variant's row is written as soon as it is done, so a part killed by a timeout keeps every
        finished variant. Interleaved: the variants alternate step by step; else round-robin over `vs`,
        each variant's rounds merged."""
        if a.interleave:
            for row in _e2e.measure_interleaved(vs, s, peak_tflops, log):
                row = {**env, **row}
                record(row)
                log(f"[e2e] {row['variant']}: " + (f"{row['samples_per_s']:.4g} samples/s (median step "
                                                   f"{row['step_s']:.4g} s)" if row["status"] == "ok"
                                                   else row["status"]))
            return
        per: dict[str, list[dict]] = {v.name: [] for v in vs}
        for rnd in range(a.rounds):
            last_round = rnd == a.rounds - 1
            for v in vs:
                done = per[v.name]
                if not (done and done[-1].get("status") != "ok"):  # failed / unavailable: once is enough
                    log(f"[e2e] {v.name} ..." + (f" (round {rnd + 1}/{a.rounds})" if a.rounds > 1 else ""))
                    t0 = time.perf_counter()
                    row = {**env, **_e2e.measure(v, s, peak_tflops, log)}
                    row["wall_s"] = round(time.perf_counter() - t0, 1)
                    done.append(row)
                    if row["status"] == "ok":
                        log(f"[e2e] {v.name}: {row['samples_per_s']:.4g} samples/s (median step "
                            f"{row['step_s']:.4g} s; {row['wall_s']} s with build and warm-up)")
                    else:
                        log(f"[e2e] {v.name}: {row['status']}")
                if last_round:
                    record(_e2e.merge_rounds(done))

    if not only:
        # the most important first (a part cut short by its timeout keeps them): the peer, ours, then
        # the compiled peer, whose compilation takes the longest; rows are written in the usual order below
        first = [v for v in variants if not v.compile] + [v for v in variants if v.compile]
        measure_all(first)
    if ablate:
        best = _e2e.best_backend(rows, cuda)
        log(f"[e2e] ablations against ours {best}")
        abl = _e2e.ablation_variants(best)
        if a.quick:
            abl = [v for v in abl if not v.compile]
            notes.append("--quick leaves out the 'torch.compile of ours' ablation (recompiles for every new count "
                         "of masked tokens: tens of seconds even at the tiny size)")
        measure_all(abl)
    _e2e.add_ratios(rows)
    order = {v.name: i for i, v in enumerate(_e2e.main_variants())}
    rows.sort(key=lambda r: (r.get("group") != "main", order.get(r["variant"], len(order))))
    if rank == 0:  # rewrite with the final ratios
        path.unlink(missing_ok=True)
        for r in rows:
            _common.append_row(path, r)
    if not cuda:
        notes.append(f"CPU run: batch {a.batch} per optimizer step (the recipe's 256 would take minutes per step "
                     f"here); fp32; triton / flash_attn variants are unavailable without CUDA.")
    if a.compose_batch:
        notes.append(f"steps of {a.compose_batch} samples composed from measured micro-steps (micro-batch "
                     f"{a.micro_batch}; measured steps of {a.batch}): n-1 forward+backward micro-steps + the boundary "
                     f"one with the optimizer step, medians; the measured batch-{a.batch} figures are in measured_*")
    if a.quick:
        notes.append(f"--quick: preset {a.preset}, batch {a.batch}; a smoke test, not a measurement"
                     + ("; torch.compile variants use the 'eager' backend (dynamo only)" if a.compile_backend == "eager"
                        else ""))
    return rows


def scaling_reference(a, out: Path, log) -> dict[str, float]:
    """N > 1 devices: the same ours variants on one device (a child process on rank 0's device,
    same micro-batch, so the same work per device per micro-step); {variant: samples/s}."""
    import _e2e

    names = [v.name for v in _e2e.main_variants() if v.kind == "ours"]
    if a.variants:
        names = [n for n in names if n in a.variants.split(",")]
    ref_out = out / "single_device"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "CROSS_RANK",
                        "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = vis.split(",")[0] if vis else "0"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--parts", "e2e", "--out", str(ref_out),
           "--variants", ",".join(names), "--ablations", "off", "--preset", a.preset, "--batch", str(a.batch),
           "--micro-batch", str(a.micro_batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--compile-backend", a.compile_backend, "--project-devices", "1", "--rounds", str(a.rounds)]
    if a.interleave:
        cmd.append("--interleave")
    if a.compose_batch:
        cmd += ["--compose-batch", str(a.compose_batch)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.variant_timeout:
        cmd += ["--variant-timeout", str(a.variant_timeout)]
    log(f"[e2e] scaling reference on one device: {' '.join(cmd)}")
    try:
        subprocess.run(cmd, env=env, check=False, timeout=(a.variant_timeout or 1800) * (len(names) + 1),
                       stdout=subprocess.DEVNULL if a.quick else None)
    except subprocess.TimeoutExpired:
        log("[e2e] scaling reference timed out")
    return {r["variant"]: r.get("samples_per_s") for r in _common.read_rows(ref_out / PART_FILES["e2e"])
            if r.get("status") == "ok"}


# ---------------------------------------------------------------------------------------------- report
def collect(out: Path) -> list[dict]:
    rows = []
    for part in PARTS:
        for r in _common.read_rows(out / PART_FILES[part]):
            r.setdefault("part", part)
            rows.append(r)
    return rows


def report(a, out: Path, env: dict, notes: list[str]) -> list[dict]:
    rows = collect(out)
    if a.report_only:
        # the environment the rows were measured in (the first e2e / peak row's), not this process's
        first = next((r for r in rows if r.get("part") in ("e2e", "peak")), None)
        if first:
            env = {**env, **{k: first[k] for k in env if k in first and k not in ("loadavg_1m_end",)}}
        if not a.project_devices_given:
            a.project_devices = max([r.get("devices", 1) for r in rows if r.get("part") == "e2e"] + [1])
            a.project_devices = a.project_devices if a.project_devices > 1 else 8
    # notes of the runs that wrote the rows (each part may run in its own process), then this one's
    notes_file = out / "notes.txt"
    earlier = notes_file.read_text(encoding="utf-8").splitlines() if notes_file.is_file() else []
    if not a.report_only and notes:
        with open(notes_file, "a", encoding="utf-8") as fh:
            fh.write("".join(n + "\n" for n in notes))
    notes[:] = list(dict.fromkeys([n for n in earlier + notes if n.strip()]))
    _report.add_projections(rows, a.project_devices)
    notes.extend(_report.sanity_notes(rows))
    pngs, why = _report.plots(out, rows, env)
    if why:
        notes.append(why)
    load = env.get("loadavg_1m"), env.get("loadavg_1m_end")
    if env.get("device_kind") == "cpu" and any(x is not None and x > 0.75 * (env.get("cpu_cores") or 1)
                                               for x in load):
        notes.append(f"load average {load[0]} at start, {load[1]} at end on {env.get('cpu_cores')} cores: other "
                     f"processes share this CPU, so the timings are noisy (ratios from the same run are firmer).")
    settings = {k: v for k, v in vars(a).items() if k not in ("local_rank", "project_devices_given", "deepspeed_error")}
    _report.write_results_json(out / "results.json", env, rows, notes, settings)
    _report.write_markdown(out / "summary.md", env, rows, notes, a.project_devices)
    for n in notes:
        print(f"note: {n}")
    print(f"\nrows: {out / 'results.json'}; summary: {out / 'summary.md'}"
          + (f"; plots: {', '.join(pngs)}" if pngs else ""))
    ks = _report.kernel_summary(rows)
    if ks:
        kind = next((r.get("measurement") for r in rows if r.get("part") == "kernels"), "")
        print(f"\nkernels ({kind}): ours vs the fastest peer")
        print(_report.format_table(("op", "mode", "shape", "dtype", "dropout", "ours ms", "fastest peer", "peer ms",
                                    "speed-up"), ks))
    ds = _report.data_summary(rows)
    if ds:
        print("\ndata pipeline")
        print(_report.format_table(("what", "figure", "details"), ds))
        head = _report.loader_headroom(rows)
        if head:
            print(head)
    tg = _report.targets(rows, env)
    e2e = _report.e2e_table_rows(rows, a.project_devices)
    if e2e:
        s = next(r for r in rows if r.get("part") == "e2e")
        peak = next((r for r in rows if r.get("part") == "peak"), None)
        print(f"\nend-to-end pre-training, {s.get('preset')} {s.get('precision')}, batch {s.get('batch')} "
              f"(micro {s.get('micro_batch')}), {env.get('hardware')} x {env.get('num_devices')}, commit "
              f"{str(env.get('commit'))[:12]}" + (f"; peak {peak['peak_tflops']:.4g} TFLOP/s measured" if peak else ""))
        if tg:
            print("targets: " + "; ".join(f"{t}: {m} ({v})" for t, m, v in tg))
        print(f"baseline {BASELINE()}; recipe days for N = {a.project_devices}: {_report.e2e_basis(rows)}")
        print(_report.format_table(_report.e2e_cols(rows), e2e))
    else:
        print("\nend-to-end pre-training: no rows in " + str(out / PART_FILES["e2e"])
              + ("" if "e2e" not in a.parts else " (the part failed or was cut short: see its log)"))
    return rows


def BASELINE() -> str:  # noqa: N802
    return (f"{_common.BASELINE_NAME} = {_common.BASELINE_SAMPLES_PER_S} samples/s, "
            f"{_common.RECIPE_SAMPLES / _common.BASELINE_SAMPLES_PER_S / 86400:.1f} days for the recipe")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        raise SystemExit(f"--parts: unknown {sorted(bad)}; known: {list(PARTS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    a.project_devices_given = a.project_devices is not None
    resolve_defaults(a, world)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = log0(rank)
    notes: list[str] = []
    if not a.report_only and "e2e" in parts and a.ablations != "only" and rank == 0:
        (out / "notes.txt").unlink(missing_ok=True)  # a fresh measurement: the notes of older runs go
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t_start = time.perf_counter()

    single: dict[str, float] = {}
    a.deepspeed_error = None
    if not a.report_only and "e2e" in parts:
        import _e2e

        # DeepSpeed only for the variants that use it: without it (the GPU machine without the carried
        # wheels) the peer and ours still run, ours in the peer's plain loop with torch's fused AdamW
        a.deepspeed_error = _e2e.deepspeed_import_error()
        if a.deepspeed_error is None:
            from lxmert_fast.train.process import start_process

            if world > 1 and rank == 0 and not a.no_scaling_reference:
                single = scaling_reference(a, out, log)  # a child process, before this one joins the group
            proc = start_process()
            rank, world = proc.rank, proc.world
            log = log0(rank)
        elif world > 1:
            raise SystemExit(f"bench/run.py: {world} processes need DeepSpeed, which does not import here "
                             f"({a.deepspeed_error})")
        else:
            notes.append(f"deepspeed does not import ({a.deepspeed_error}): the 'ours' variants ran without it, in the "
                         f"peer's plain loop with torch's fused AdamW (their note says so); DeepSpeed-only ablations "
                         f"have 'unavailable' rows")
    if a.threads:
        torch.set_num_threads(a.threads)  # after DeepSpeed's initialisation, which may set its own
    env = _common.environment(world)
    if not a.report_only:
        log(f"lxmert-fast benchmark: {env['hardware']} x {world}, torch {env['torch']}, commit {env['commit'][:12]}, "
            f"load {env['loadavg_1m']}; parts {','.join(parts)}; out {out}")
        peak = None
        if "peak" in parts or "e2e" in parts:
            peak = run_peak(out, env, a.quick, rank)
            log(f"[peak] {peak['what']}: {peak['peak_tflops']:.4g} TFLOP/s")
        if "e2e" in parts:
            run_e2e(a, out, env, peak, world, rank, single, notes, log)
        if rank != 0:
            return 0
        if "kernels" in parts:
            log("[kernels] ...")
            try:
                from _parts import run_kernels

                batches = [int(b) for b in a.kernel_batches.split(",")] if a.kernel_batches else None
                run_kernels(out, a.quick, env, log, batches=batches, use_compile=not a.kernel_no_compile)
            except Exception as err:  # noqa: BLE001
                notes.append(f"kernels part failed: {_common.short_error(err)}")
                log(f"[kernels] failed: {_common.short_error(err)}")
        if "data" in parts:
            log("[data] ...")
            try:
                from _parts import run_data

                run_data(out, a.quick, env, a.data_workers, log=log)
            except Exception as err:  # noqa: BLE001
                notes.append(f"data part failed: {_common.short_error(err)}")
                log(f"[data] failed: {_common.short_error(err)}")
    env["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    env["suite_wall_s"] = round(time.perf_counter() - t_start, 1)
    report(a, out, env, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
