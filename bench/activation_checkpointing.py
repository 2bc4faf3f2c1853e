"""Activation checkpointing on and off: samples/s and peak memory of a pre-training step.

    python bench/activation_checkpointing.py [--preset base] [--batch 8] [--warmup 2] [--pairs 6]
                                             [--mem_steps 3] [--threads 1] [--backend sdpa] [--json OUT]

A step is what pre-training runs: forward of the summed pre-training loss (every task, 20 tokens, 36
objects, 15% of the words and objects masked, the static row budget of the batch's shape, dropout on),
backward, and torch's fused AdamW step (cpu.json's optimizer), fp32, on the CPU.

Speed: one child process runs both variants on one model, interleaved step by step (after `--warmup`
steps of each, `--pairs` pairs, the order inside a pair alternating: off-on, on-off, ...), so a change of
machine load hits both; reported: the median step time of each and the median of the pairs' ratios.

Memory: one child process per variant (off, then on), so that each one's high-water mark is its own:
- the resident set (RSS), from /proc/self/status: before each of `--mem_steps` steps (after the warm-up)
  the high-water mark is reset (`/proc/self/clear_refs` <- 5) and the step's peak is VmHWM after it
  (median over the steps): what the machine holds, the Python process, libraries and allocator slack
  included;
- torch's memory profiler (`torch.profiler.profile(profile_memory=True)`, `export_memory_timeline` on the
  CPU) over one more step: the peak of the live tensor bytes over the whole step and over its forward
  and backward alone (the optimizer step holds parameters, gradients and both AdamW moments at once), and
  the peak of the bytes it files as activations.
The first step's loss of each child is printed: checkpointing recomputes, it must not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from bench.step_vs_hf import pretraining_batch
    from lxmert_fast import LxmertConfig, LxmertForPreTraining
    from lxmert_fast.model.rows import RowBudget

    torch.manual_seed(0)
    config = LxmertConfig.preset(args.preset)
    model = LxmertForPreTraining(config).train()
    model.set_attention_backend(args.backend)
    batch = pretraining_batch(config, args.batch)
    budget = RowBudget.for_batch(args.batch, 20, 36)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def forward_backward():
        loss = model(**batch, row_budget=budget).loss
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return model, step, forward_backward


def time_child(args) -> dict:
    """Both variants in one process, interleaved step by step."""
    import torch

    model, step, _ = _setup(args)
    times: dict[bool, list[float]] = {False: [], True: []}
    first_loss = {}
    seed = 100
    for i in range(args.warmup + args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for on in order:
            model.set_activation_checkpointing(on)
            torch.manual_seed(seed)
            seed += 1
            start = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - start
            first_loss.setdefault(on, float(loss))
            if i >= args.warmup:
                times[on].append(elapsed)
    ratios = [off / on for off, on in zip(times[False], times[True])]  # samples/s on / off, per pair
    return {"kind": "time", "step_s_off": statistics.median(times[False]), "step_s_on": statistics.median(times[True]),
            "samples_per_s_off": args.batch / statistics.median(times[False]),
            "samples_per_s_on": args.batch / statistics.median(times[True]),
            "speed_ratio_on_off": statistics.median(ratios), "pair_ratios": ratios, "step_times_s": times,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def memory_child(args) -> dict:
    """One variant: RSS high-water per step and torch's memory profiler over one step."""
    import torch

    model, step, forward_backward = _setup(args)
    model.set_activation_checkpointing(args.checkpointing)
    peaks, first_loss = [], None
    for i in range(args.warmup + args.mem_steps):
        torch.manual_seed(100 + i)
        _reset_high_water()
        loss = step()
        first_loss = float(loss) if first_loss is None else first_loss
        if i >= args.warmup:
            peaks.append(_status_kib("VmHWM"))
    whole = tensor_memory(step, args.timeline + ".step.json")
    fwd_bwd = tensor_memory(forward_backward, args.timeline + ".fwd_bwd.json")
    model.zero_grad(set_to_none=True)
    return {"kind": "memory", "checkpointing": args.checkpointing, "peak_rss_mib": statistics.median(peaks) / 1024,
            "tensor_peak_step_mib": whole["tensor_peak_mib"], "tensor_peak_fwd_bwd_mib": fwd_bwd["tensor_peak_mib"],
            "activations_peak_mib": whole["activations_peak_mib"], "first_loss": first_loss,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def tensor_memory(fn, timeline_path) -> dict:
    """Torch's memory profiler over ``fn()``: the peak of the live CPU tensor bytes and of the activations (MiB)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA's snapshots
        prof.export_memory_timeline(timeline_path, device="cpu")
    with open(timeline_path, encoding="utf-8") as fh:
        _, sizes = json.load(fh)  # per time: [unused, one column per category (its index + 1)]
    act = _CATEGORY_TO_INDEX[Category.ACTIVATION] + 1
    mib = 1 / 2**20
    return {"tensor_peak_mib": max(sum(row) for row in sizes) * mib,
            "activations_peak_mib": max(row[act] for row in sizes) * mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--mem_steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--json", default=None, help="append the JSON rows here")
    p.add_argument("--child", choices=("time", "memory"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timeline", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        row = time_child(args) if args.child == "time" else memory_child(args)
        print(json.dumps(row), flush=True)
        return

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    common = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--batch", str(args.batch),
              "--warmup", str(args.warmup), "--pairs", str(args.pairs), "--mem_steps", str(args.mem_steps),
              "--threads", str(args.threads), "--backend", args.backend]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
    tmp = tempfile.mkdtemp(prefix="ac_bench_")
    rows = {}
    for name, extra in (("time", ["--child", "time"]),
                        ("memory_off", ["--child", "memory", "--timeline", os.path.join(tmp, "off")]),
                        ("memory_on", ["--child", "memory", "--checkpointing", "--timeline", os.path.join(tmp, "on")])):
        load = os.getloadavg()[0]
        proc = subprocess.run(common + extra, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"child {name} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(commit=commit, preset=args.preset, batch=args.batch, backend=args.backend,
                   load_1min_before=load, load_1min_after=os.getloadavg()[0])
        rows[name] = row
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k not in ('step_times_s', 'pair_ratios')})}",
              flush=True)

    t, off, on = rows["time"], rows["memory_off"], rows["memory_on"]
    print(f"\n{'checkpointing':<14}{'samples/s':>10}{'peak RSS MiB':>14}{'tensors step':>14}{'tensors fwd+bwd':>17}"
          f"{'activations':>13}")
    for label, sps, mem in (("off", t["samples_per_s_off"], off), ("on", t["samples_per_s_on"], on)):
        print(f"{label:<14}{sps:>10.2f}{mem['peak_rss_mib']:>14.0f}{mem['tensor_peak_step_mib']:>14.0f}"
              f"{mem['tensor_peak_fwd_bwd_mib']:>17.0f}{mem['activations_peak_mib']:>13.0f}")
    print(f"on / off: samples/s x{t['speed_ratio_on_off']:.3f} (median of {len(t['pair_ratios'])} interleaved pairs), "
          f"first losses {off['first_loss']:.6f} / {on['first_loss']:.6f} "
          f"[{args.preset}, batch {args.batch}, {args.backend}, {args.threads} thread(s), commit {commit}]")


if __name__ == "__main__":
    main()
