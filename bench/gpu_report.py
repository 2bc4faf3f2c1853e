"""The GPU check's report: rows.jsonl -> results.json, summary.md, throughput.png and
kernel_speedups.png in the same folder, and the tables printed (the end-to-end table last).

    python bench/gpu_report.py --out DIR [--timings JSON]

Run by bench/gpu_check.py as its last part; rerun by hand on a returned rows.jsonl to rebuild
the rest. Reads rows only (no device).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _gpu_plan  # noqa: E402
import _report  # noqa: E402
from _common import read_rows  # noqa: E402

TARGET_SAMPLES_PER_S = 10_000
TARGET_X_HF, TARGET_X_HF_COMPILE, TARGET_CROSS_X = 3.0, 1.5, 2.0
TARGET_COPY_FRACTION = 0.8  # LayerNorm and GELU: at least 80% of a copy of the same bytes (issue 15)


def _f(x, fmt):
    return "-" if x is None else fmt.format(x)


def environment(rows: list[dict]) -> dict:
    by = {r.get("key"): r for r in rows if r.get("part") == "env"}
    v, gpu = by.get("env:versions", {}), by.get("env:gpu", {})
    peak, copy = by.get("env:peak_matmul", {}), by.get("env:copy_bandwidth", {})
    smi = gpu.get("nvidia_smi") if isinstance(gpu.get("nvidia_smi"), dict) else {}
    return {
        "hardware": gpu.get("name") or ("cpu (dry run)" if v.get("dry_run") else "unknown"),
        "device_kind": "cuda" if gpu.get("figure") else "cpu", "num_devices": 1,
        "driver": smi.get("driver_version"), "clocks_sm_max_mhz": smi.get("clocks.max.sm"),
        "python": v.get("python"), "torch": v.get("torch"), "cuda": v.get("cuda"), "cudnn": v.get("cudnn"),
        "triton": v.get("triton"), "transformers": v.get("transformers"), "deepspeed": v.get("deepspeed"),
        "deepspeed_error": v.get("deepspeed_error"), "flash_attn": v.get("flash_attn"), "commit": v.get("commit"),
        "source_sha256": v.get("source_sha256"), "cpu_cores": v.get("cpu_cores"), "host": v.get("host"),
        "peak_tflops_measured": peak.get("peak_tflops"), "copy_tb_per_s": copy.get("tb_per_s"),
        "dry_run": v.get("dry_run"),
    }


# ---------------------------------------------------------------------------------------------- e2e
def add_e2e_ratios(rows: list[dict]) -> None:
    ok = {r["variant"]: r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"}
    hf, hfc = ok.get("hf"), ok.get("hf+compile")
    for r in ok.values():  # against the peer at the same batch only (the peers run the part's batch)
        if hf and r.get("batch") == hf.get("batch"):
            r["ratio_to_peer"] = r["samples_per_s"] / hf["samples_per_s"]
        if hfc and r.get("batch") == hfc.get("batch"):
            r["ratio_to_compiled_peer"] = r["samples_per_s"] / hfc["samples_per_s"]


E2E_COLS = ("variant", "samples/s", "step ms", "TFLOP/s", "MFU meas.", "MFU sheet", "mem GB", "x hf",
            "x hf+compile", "1st step s", "setup / why no figure")


def e2e_table(rows: list[dict]) -> list[list[str]]:
    order = {v["key"]: i for i, v in enumerate(_gpu_plan.E2E_VARIANTS)}
    out = []
    for r in sorted((r for r in rows if r.get("part") == "e2e"), key=lambda r: order.get(r.get("variant"), 99)):
        if r.get("status") == "ok":
            out.append([r["variant"], _f(r["samples_per_s"], "{:,.0f}"), _f(r["step_s"] * 1e3, "{:.1f}"),
                        _f(r.get("tflops_per_device"), "{:.1f}"), _f(r.get("mfu"), "{:.1%}"),
                        _f(r.get("mfu_datasheet"), "{:.1%}"), _f(r.get("peak_mem_gb"), "{:.1f}"),
                        _f(r.get("ratio_to_peer"), "{:.2f}x"), _f(r.get("ratio_to_compiled_peer"), "{:.2f}x"),
                        _f(r.get("first_step_s"), "{:.0f}"), str(r.get("setup", ""))[:90]])
        else:
            out.append([r.get("variant", "?"), "-", "-", "-", "-", "-", "-", "-", "-", "-", str(r.get("status"))[:140]])
    return out


def targets(rows: list[dict], env: dict) -> list[list[str]]:
    """The project's GPU targets against the best of ours in this run."""
    if env.get("dry_run") or env.get("device_kind") != "cuda":
        return [["GPU targets (one H200)", "dry run / no GPU: nothing measured", "UNMEASURED"]]
    ours = [r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok" and r.get("kind") != "hf"
            and not _gpu_plan.own_batch(r.get("variant"))]  # the targets are stated at the part's batch (256)
    out = []
    if "H200" not in str(env.get("hardware")):
        out.append(["the targets are stated for one H200", str(env.get("hardware")), "n/a"])
    if not ours:
        out.append(["ours >= 10,000 samples/s", "no variant of ours gave a figure", "UNMEASURED"])
    else:
        best = max(ours, key=lambda r: r["samples_per_s"])
        v = best["samples_per_s"]
        out.append([f"ours >= {TARGET_SAMPLES_PER_S:,} samples/s", f"{v:,.0f} ({best['variant']})",
                    "met" if v >= TARGET_SAMPLES_PER_S else "NOT met"])
        for key, goal, label in (("ratio_to_peer", TARGET_X_HF, "transformers (bf16 autocast)"),
                                 ("ratio_to_compiled_peer", TARGET_X_HF_COMPILE, "transformers + torch.compile")):
            x = best.get(key)
            out.append([f"ours >= {goal}x {label}", "peer gave no figure" if x is None else f"{x:.2f}x",
                        "UNMEASURED" if x is None else ("met" if x >= goal else "NOT met")])
    return out + kernel_targets(rows)


def kernel_targets(rows: list[dict]) -> list[list[str]]:
    """Issue 15's kernel targets from the kernel part's rows, one line per measured group:
    the cross pair forward+backward against the faster of the two-SDPA forms (its slicing and cat
    included), >= 2x, dropout 0.1 (the issue's condition, training's) first, then 0; LayerNorm (+
    residual, dropout 0 and 0.1) and bias + GELU against a copy of the same bytes in the same run,
    >= 80% of its speed (copy time / ours). A group missing ours or its reference gives no line."""
    kern = [r for r in rows if r.get("part") == "kernels" and r.get("ms")]
    out = []

    def groups(op, mode=None):
        keys = sorted({(r.get("batch"), r.get("mode"), r.get("dropout") or 0.0) for r in kern if r.get("op") == op
                       and (mode is None or r.get("mode") == mode)}, key=lambda k: (k[0] or 0, k[1], -k[2]))
        for b, m, p in keys:
            yield b, m, p, [r for r in kern if r.get("op") == op and r.get("batch") == b and r.get("mode") == m
                            and (r.get("dropout") or 0.0) == p]

    for b, mode, p, g in groups("cross_pair", "fwd+bwd"):
        o = next((r for r in g if str(r["impl"]).startswith("ours")), None)
        two = [r for r in g if str(r["impl"]).startswith("2 x sdpa")]
        if o and two:
            best_two = min(two, key=lambda r: r["ms"])
            x = best_two["ms"] / o["ms"]
            out.append([f"cross pair >= {TARGET_CROSS_X}x two SDPA calls (B{b} {mode}, dropout {p:g})",
                        f"{x:.2f}x (vs {best_two['impl']})", "met" if x >= TARGET_CROSS_X else "NOT met"])
    for op, label in (("layer_norm+residual", "LayerNorm + residual"), ("bias_gelu", "bias + GELU")):
        for b, mode, p, g in groups(op):
            o = next((r for r in g if str(r["impl"]).startswith("ours")), None)
            copy = next((r for r in g if str(r["impl"]).startswith("copy")), None)
            if o and copy:
                frac = copy["ms"] / o["ms"]
                drop = f", dropout {p:g}" if op == "layer_norm+residual" else ""
                out.append([f"{label} >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth (B{b} {mode}{drop})",
                            f"{frac:.0%} ({_f(o.get('GB/s'), '{:,.0f}')} GB/s)",
                            "met" if frac >= TARGET_COPY_FRACTION else "NOT met"])
    return out


# ---------------------------------------------------------------------------------------------- other parts
def correctness_table(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.get("part") == "correctness":
            w = r.get("worst_err_over_bound")
            out.append([r.get("check", r.get("key")), r.get("dtype", "-"), r.get("shape", "-"),
                        _f(w, "{:.2f}"), _f(r.get("seconds"), "{:.1f}"), str(r.get("status"))[:120]])
    return out


def env_lines(env: dict, rows: list[dict]) -> list[str]:
    install = next((r for r in rows if r.get("key") == "env:install"), {})
    return [
        f"hardware: {env['hardware']} (driver {env.get('driver')}, max SM clock {env.get('clocks_sm_max_mhz')}); "
        f"{env.get('cpu_cores')} CPU cores; host {env.get('host')}",
        f"software: Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN "
        f"{env.get('cudnn')}), triton {env.get('triton')}, transformers {env.get('transformers')}, deepspeed "
        f"{env.get('deepspeed') or 'not importable: ' + str(env.get('deepspeed_error'))}, flash_attn {env.get('flash_attn')}",
        f"commit {env.get('commit')}; sources sha256 {env.get('source_sha256')}",
        f"measured: bf16 matmul {_f(env.get('peak_tflops_measured'), '{:.0f}')} TFLOP/s, copy "
        f"{_f(env.get('copy_tb_per_s'), '{:.2f}')} TB/s; wheel install: {install.get('status', '-')}",
    ]


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("figure") is False and r.get("part") in ("env", "correctness", "kernels", "e2e"):
            out.append(f"{r.get('key')}: {r.get('status')}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timings", default="[]")
    a = ap.parse_args(argv)
    out = Path(a.out)
    rows = read_rows(out / "rows.jsonl")
    timings = json.loads(a.timings)
    env = environment(rows)
    add_e2e_ratios(rows)
    _report.add_projections(rows, 1)
    pngs, why = _report.plots(out, rows, env)
    extra_notes = ([why] if why else []) + notes(rows)
    _report.write_results_json(out / "results.json", env, rows, extra_notes,
                               {"plan": {"e2e": [v["key"] for v in _gpu_plan.E2E_VARIANTS], "timings": timings}})
    ct, tg, et = correctness_table(rows), targets(rows, env), e2e_table(rows)
    ks = _report.kernel_summary(rows, with_copy=True)
    kcols = ("op", "mode", "shape", "dtype", "dropout", "ours ms", "fastest peer", "peer ms", "speed-up", "copy/ours")
    ccols = ("check", "dtype", "shape", "worst err/bound", "s", "status")
    md = ["# lxmert-fast GPU check", ""] + [f"- {x}" for x in env_lines(env, rows)] + [""]
    parts = [[t["part"], t["seconds"], t["limit_s"], t["outcome"]] for t in timings]
    md += ["## Parts", "", _report.md_table(("part", "seconds", "limit s", "outcome"), parts), ""]
    md += ["## Targets", "", _report.md_table(("target", "measured", "verdict"), tg), ""]
    md += ["## Correctness (Triton vs PyTorch)", "", _report.md_table(ccols, ct), ""]
    md += ["## Kernels", "", _report.md_table(kcols, ks), ""]
    s0 = next((r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"
               and not _gpu_plan.own_batch(r.get("variant"))), {})
    md += [f"## End-to-end pre-training ({s0.get('preset', '?')} config, batch {s0.get('batch', '?')}, "
           f"{s0.get('precision', '?')}, median of {s0.get('steps', '?')} steps; a variant named 'batch N' runs N)", "",
           _report.md_table(E2E_COLS, et), "",
           "MFU meas. = TFLOP/s over the bf16 matmul rate measured in this run; MFU sheet = over the datasheet peak "
           "(lxmert_fast/flops.py); FLOPs per sample: lxmert_fast.flops (what ours computes; the same count for "
           "transformers' model, which computes more).", ""]
    if extra_notes:
        md += ["## No figure", ""] + [f"- {n}" for n in extra_notes] + [""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'}" + (f", {', '.join(Path(p).name for p in pngs)}"
                                                                    if pngs else f" (no plots: {why})"))
    print("\n== tables")
    for line in env_lines(env, rows):
        print(line)
    print("\ncorrectness (Triton vs PyTorch; err/bound <= 1 passes)")
    print(_report.format_table(ccols, ct))
    if ks:
        print("\nkernels: ours vs the fastest peer; copy/ours = a copy of the same bytes' time over ours'")
        print(_report.format_table(kcols, ks))
    print("\ntargets")
    print(_report.format_table(("target", "measured", "verdict"), tg))
    s = next((r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"
              and not _gpu_plan.own_batch(r.get("variant"))), {})
    print(f"\nend-to-end pre-training: {s.get('preset', '?')} config, batch {s.get('batch', '?')}, "
          f"{s.get('precision', '?')}, median of {s.get('steps', '?')} steps, {env['hardware']} "
          f"(a variant named 'batch N' runs N)")
    print(_report.format_table(E2E_COLS, et))
    return 0


if __name__ == "__main__":
    sys.exit(main())
