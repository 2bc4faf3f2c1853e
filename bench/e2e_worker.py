"""One end-to-end variant of the GPU check, in its own process (bench/gpu_check.py starts it).

    python bench/e2e_worker.py --spec '{"key": "ours+compile default", "model": "ours", ...}'
                               [--rows ROWS] [--quiet DIR] [--peak-tflops X] [--dry]

Builds the variant (bench/_e2e.py: model, optimizer or DeepSpeed engine, device-side masking),
warms it up (the first step compiles), frees the allocator's cache and waits for the quiet device
(bench/_quiet.py: every other worker stopped); then one untimed step and the timed steps (CUDA
events, median), and appends its row to ROWS at once. A failure is a row too: status "no figure (error): ..."
with the reason, the traceback in this process's log.

GPU: the base config, batch 256 (or the variant's "batch") in one micro-batch, bf16, 3 warm-up + 10
timed steps. Dry run (CPU): the tiny preset, batch 4 (2 for a variant with its own batch), dynamo only
(torch.compile backend "eager"), 1 + 2 steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(BENCH), str(REPO), str(REPO / "kernels")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import append_row  # noqa: E402
from _quiet import QuietClient  # noqa: E402

GPU = dict(preset="base", batch=256, micro_batch=256, warmup=3, steps=10)
DRY = dict(preset="tiny", batch=4, micro_batch=4, warmup=1, steps=2)
OOM_RETRIES = 3  # other workers may hold memory for a moment: retry a warm-up step that ran out


def variant_of(spec: dict, s, log):
    """(the _e2e.Variant for this spec, fields that say how it ran)."""
    import _e2e

    cuda = s.cuda
    key = spec["key"]
    note = spec.get("note", "")
    extra = {"spec": spec}
    if spec["model"] == "hf":
        v = _e2e.Variant(key, "hf", note=note or "transformers LxmertForPreTraining (peer)")
        setup = "transformers, autocast bf16, torch AdamW" if cuda else "transformers, fp32, torch AdamW"
    else:
        backend = spec.get("backend") or ("triton" if cuda else "sdpa")
        kernels = "triton" if backend == "triton" else "torch"
        precision = "autocast bf16" if cuda else "fp32"
        if spec["loop"] == "plain":  # the peer's loop and optimizer: the model against the model
            v = _e2e.Variant(key, "ours_plain", backend=backend, kernels=kernels, optimizer="torch", note=note)
            setup = f"ours ({backend}), the peer's plain loop: {precision}, torch AdamW"
        else:
            v = _e2e.Variant(key, "ours", backend=backend, kernels=kernels, optimizer="torch_fused", note=note)
            ds_err = _e2e.deepspeed_import_error()
            if ds_err:
                v = _e2e.without_deepspeed(v)
                extra["deepspeed_error"] = ds_err
                setup = (f"ours ({backend}), NO DeepSpeed (deepspeed not importable): plain loop, {precision}, "
                         f"torch fused AdamW")
                log(f"deepspeed does not import ({ds_err}): plain loop + torch fused AdamW")
            else:
                setup = (f"ours ({backend}), DeepSpeed " + ("zero2.json (ZeRO-2, bf16)" if cuda else "cpu.json (fp32)")
                         + ", torch fused AdamW")
    if spec.get("compile"):
        v = replace(v, compile=True, compile_mode=spec["compile"], fullgraph=spec["model"] != "hf")
        setup += f"; torch.compile mode {spec['compile']}" + (", fullgraph" if v.fullgraph else "")
        if s.compile_backend != "inductor":
            setup += f" (backend {s.compile_backend}: dynamo only, the mode is not applied)"
    extra["setup"] = setup
    return v, extra


def dynamo_counters() -> dict:
    """Graph breaks, unique graphs and CUDA-graph skips of this process's compilations."""
    try:
        from torch._dynamo.utils import counters

        out = {"graph_breaks": sum(counters["graph_break"].values()),
               "unique_graphs": counters["stats"].get("unique_graphs", 0)}
        skips = counters["inductor"].get("cudagraph_skips", 0)
        if skips:
            out["cudagraph_skips"] = skips
        if counters["graph_break"]:
            out["graph_break_reasons"] = [str(k)[:160] for k in list(counters["graph_break"])[:5]]
        return out
    except Exception:  # noqa: BLE001
        return {}


def run(spec: dict, rows: str | None, quiet: str | None, peak_tflops: float | None, dry: bool) -> int:
    client = QuietClient(quiet, spec["key"])
    client.phase("importing")
    t_start = time.perf_counter()

    def log(*args):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {spec['key']}:", *args, flush=True)

    import torch

    import _e2e
    from _common import short_error, synchronize

    cuda = torch.cuda.is_available()
    if cuda and dry:
        raise SystemExit("e2e_worker: --dry runs on CPU (gpu_check.py hides the GPU in a dry run)")
    sizes = DRY if (dry or not cuda) else GPU
    if spec.get("batch"):  # a variant with its own batch, in one micro-batch
        from _gpu_plan import DRY_VARIANT_BATCH

        b = spec["batch"] if sizes is GPU else DRY_VARIANT_BATCH
        sizes = {**sizes, "batch": b, "micro_batch": b}
    s = _e2e.Settings(**sizes, device="cuda" if cuda else "cpu", quick=dry,
                      compile_backend="inductor" if cuda else "eager")
    if cuda:
        torch.cuda.set_device(0)
        s.device = "cuda:0"
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    key = f"e2e:{spec['key']}"
    v, extra = variant_of(spec, s, log)
    row = {**_e2e.base_row(v, s, peak_tflops), "key": key, **extra, "dry_run": dry}
    from lxmert_fast.flops import device_name, peak_tflops_for

    row["hardware"] = device_name() if cuda else "cpu"
    row["peak_tflops_datasheet"] = peak_tflops_for(row["hardware"]) if cuda else None
    why = _e2e.unavailable_reason(v, s)
    if why:
        row.update(status=f"no figure (unavailable): {why}", figure=False, no_figure="unavailable")
        append_row(rows, row)
        log(row["status"])
        return 0
    live = None
    try:
        client.phase("building")
        t0 = time.perf_counter()
        if v.kind == "ours":  # the DeepSpeed engine: a one-process group first (NCCL on GPU, gloo on CPU)
            from lxmert_fast.train.process import start_process

            start_process()
        live = _e2e.Live(v, s, row)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        client.phase("warming up (the first step compiles)" if v.compile else "warming up")
        log(f"built in {row['build_s']} s; warming up")
        t1 = time.perf_counter()
        first = None
        for i in range(s.warmup):
            for attempt in range(OOM_RETRIES + 1):
                try:
                    ts = time.perf_counter()
                    live.step()
                    synchronize()
                    break
                except torch.cuda.OutOfMemoryError:
                    if attempt == OOM_RETRIES:
                        raise
                    log("out of memory in a warm-up step (other workers hold memory); retrying in 3 s")
                    _e2e._cleanup(s, False)
                    time.sleep(3)
            if first is None:
                first = time.perf_counter() - ts
                row["first_step_s"] = round(first, 2)  # the compilation, for compiled variants
        row["warmup_s"] = round(time.perf_counter() - t1, 2)
        log(f"warm after {row['warmup_s']} s (first step {row['first_step_s']} s)")
        if cuda:
            torch.cuda.empty_cache()  # hold little while waiting for the device
        with client.device():
            row["waited_s"] = round(client.waited_s, 2)
            row["quiet"] = client.granted
            live.step()  # the allocator grows back, outside the timing
            synchronize()
            row.update(live.timed_steps(s.steps))
        loss = row["loss"]
        _e2e.finalize(row, s.batch, row["devices"], None)
        from lxmert_fast.flops import throughput

        if row.get("peak_tflops_datasheet"):
            _, row["mfu_datasheet"] = throughput(row["samples_per_s"], row["model_flops_per_sample"], 1,
                                                 row["peak_tflops_datasheet"])
        ok = math.isfinite(loss)
        row["status"] = "ok" if ok else f"no figure (error): the loss is not finite ({loss})"
        row["figure"] = ok
        if not ok:
            row["no_figure"] = "error"
        log(f"{row['samples_per_s']:.1f} samples/s (median step {row['step_s'] * 1e3:.1f} ms), loss {loss:.3f}")
    except BaseException as err:  # noqa: BLE001  (a failure to build, compile or run is a result)
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc()
        kind = "missing package" if isinstance(err, ImportError) else "error"
        row.update(status=f"no figure ({kind}): {short_error(err, 400)}", figure=False, no_figure=kind)
        log(row["status"])
    finally:
        row.update(dynamo_counters() if v.compile else {})
        row["worker_s"] = round(time.perf_counter() - t_start, 1)
        append_row(rows, row)
        client.phase("row written")
        if live is not None:
            live.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True, help="one entry of bench/_gpu_plan.py E2E_VARIANTS, as JSON")
    ap.add_argument("--rows", default=os.environ.get("GPU_CHECK_ROWS"), help="JSONL file (default: stdout)")
    ap.add_argument("--quiet", default=os.environ.get("GPU_CHECK_QUIET"), help="quiet-device protocol folder")
    ap.add_argument("--peak-tflops", type=float, default=None, help="measured matmul peak (MFU denominator)")
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1")
    ap.add_argument("--nice", type=int, default=0,
                    help="lower this process's CPU priority (the GPU check: the correctness pass, which has a hard "
                         "limit, goes first while the workers compile; timing happens with everything else stopped)")
    a = ap.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    return run(json.loads(a.spec), a.rows, a.quiet, a.peak_tflops, a.dry)


if __name__ == "__main__":
    sys.exit(main())
