"""The report: one targets table, the tables printed (end-to-end last), results.json and summary.md, from
the rows alone (``python -m bench.report DIR`` rebuilds them from DIR/rows.jsonl)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import BASELINE, BASELINE_SAMPLES_PER_S, RECIPE_SAMPLES, clean, read_rows

# The project's targets (README): (what, how it is judged). Verdicts: met / NOT met / not measured / n/a.
TARGET_SAMPLES_PER_S = 10_000     # ours, one H200, base, batch 256, bf16
TARGET_X_HF = 3.0                 # ours over transformers' model under bf16 autocast
TARGET_X_HF_COMPILED = 1.5        # ours (any form) over transformers' model under torch.compile
TARGET_CROSS_X = 2.0              # the cross pair forward+backward over the faster two-SDPA form
TARGET_COPY_FRACTION = 0.8        # LayerNorm+residual and bias+GELU: at least 80% of a copy's speed
TARGET_CPU_X_HF = 1.1             # on a CPU, fp32: ours over transformers'


def add_ratios(rows: list[dict]) -> None:
    """x_hf / x_hf_compiled: each end-to-end row's samples/s over the peer's (eager / compiled) of the same
    run and batch."""
    ok = {r["variant"]: r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"}
    for r in ok.values():
        for peer, name in (("hf", "x_hf"), ("hf compiled", "x_hf_compiled")):
            if peer in ok and r.get("batch") == ok[peer].get("batch"):
                r[name] = r["samples_per_s"] / ok[peer]["samples_per_s"]


def in_plan_order(rows: list[dict]) -> list[dict]:
    """The end-to-end rows in the plan's priority order (workers finish in any order)."""
    order = next((r["order"] for r in rows if r.get("key") == "plan:e2e"), [])
    rank = {key: i for i, key in enumerate(order)}
    return sorted(rows, key=lambda r: (r.get("part") == "e2e", rank.get(r.get("variant"), len(rank))))


def _v(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _ok(rows: list[dict], part: str) -> list[dict]:
    return [r for r in rows if r.get("part") == part and r.get("status") == "ok"]


def targets(rows: list[dict], env: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target this run can speak to."""
    out = []
    e2e = {r["variant"]: r for r in _ok(rows, "e2e")}
    presets = {r.get("preset") for r in rows if r.get("part") == "e2e"}
    base = presets == {"base"}
    if env.get("device") == "cuda":
        ours = [r for r in e2e.values() if r["model"] == "ours" and r.get("batch") == 256]
        best = max(ours, key=lambda r: r["samples_per_s"], default=None)
        h200 = "H200" in str(env.get("hardware"))
        if best is None or not base:
            out.append((f"ours >= {TARGET_SAMPLES_PER_S:,} samples/s (one H200, base, batch 256)", "not measured",
                        "not measured"))
        else:
            out.append((f"ours >= {TARGET_SAMPLES_PER_S:,} samples/s (one H200, base, batch 256)",
                        f"{best['samples_per_s']:,.0f} ({best['variant']}, {env.get('hardware')})",
                        _v(best["samples_per_s"] >= TARGET_SAMPLES_PER_S) if h200 else "n/a (not an H200)"))
        for peer, goal in (("hf", TARGET_X_HF), ("hf compiled", TARGET_X_HF_COMPILED)):
            if best is None or peer not in e2e:
                out.append((f"ours >= {goal}x {peer}", "not measured", "not measured"))
            else:
                x = best["samples_per_s"] / e2e[peer]["samples_per_s"]
                out.append((f"ours >= {goal}x {peer}", f"{x:.2f}x ({best['variant']})", _v(x >= goal)))
    else:
        ours, hf = e2e.get("ours"), e2e.get("hf")
        if ours and hf:
            x = ours["samples_per_s"] / hf["samples_per_s"]
            out.append((f"CPU, fp32: ours >= {TARGET_CPU_X_HF}x hf (base)", f"{x:.2f}x ({ours.get('preset')})",
                        _v(x >= TARGET_CPU_X_HF) if base else "n/a (stated for base)"))
        out.append(("GPU targets", "no GPU in this run", "not measured"))
    out += kernel_targets(rows, env)
    tests = next((r for r in rows if r.get("key") == "tests:gpu"), None)
    if tests is not None:
        out.append(("the GPU part of the test suite passes", tests.get("summary", tests["status"]),
                    "met" if tests["status"] == "ok" else ("not measured" if "plan" in tests else "NOT met")))
    return out


def kernel_targets(rows: list[dict], env: dict) -> list[tuple[str, str, str]]:
    if env.get("device") != "cuda":
        return []
    out = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in _ok(rows, "kernels"):
        groups.setdefault((r["op"], r["batch"], r["mode"], r["dropout"]), {})[r["impl"]] = r
    for (op, batch, mode, p), g in sorted(groups.items(), key=str):
        ours = g.get("ours")
        if ours is None:
            continue
        if op == "cross_pair" and mode == "fwd+bwd":
            peer = min((r["ms"] for k, r in g.items() if k.startswith("2 x sdpa")), default=None)
            if peer:
                x = peer / ours["ms"]
                out.append((f"cross pair fwd+bwd >= {TARGET_CROSS_X}x two SDPA (B{batch}, dropout {p})", f"{x:.2f}x",
                            _v(x >= TARGET_CROSS_X)))
        if op in ("layer_norm+residual", "bias_gelu") and "copy" in g:
            frac = g["copy"]["ms"] / ours["ms"]
            out.append((f"{op} {mode} >= {TARGET_COPY_FRACTION:.0%} of a copy (B{batch}, dropout {p})", f"{frac:.0%}",
                        _v(frac >= TARGET_COPY_FRACTION)))
    return out


# ---------------------------------------------------------------------------------------------- tables
def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def table(header, body) -> str:
    widths = [max([len(str(h))] + [len(str(b[i])) for b in body]) for i, h in enumerate(header)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [" | ".join(str(c).ljust(w) for c, w in zip(b, widths)) for b in body])


def md_table(header, body) -> str:
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c).replace("|", "/") for c in b) + " |" for b in body])


E2E_HEADER = ("variant", "status", "samples/s", "step ms", "TFLOP/s", "MFU", "peak GB", "calls/step", "x hf",
              "x hf compiled", "recipe days")


def e2e_body(rows: list[dict]) -> list[list[str]]:
    body = []
    for r in rows:
        if r.get("part") != "e2e":
            continue
        if r.get("status") != "ok":
            body.append([r["variant"], str(r.get("status"))[:110]] + [""] * (len(E2E_HEADER) - 2))
            continue
        body.append([r["variant"], "ok", f"{r['samples_per_s']:,.1f}", f"{1e3 * r['step_s']:.1f}",
                     _f(r.get("tflops"), "{:.3g}"), _f(r.get("mfu"), "{:.1%}"), _f(r.get("peak_mem_gb"), "{:.1f}"),
                     _f(r.get("dispatcher_calls_per_step"), "{:,}"), _f(r.get("x_hf"), "{:.2f}x"), _f(r.get("x_hf_compiled"), "{:.2f}x"),
                     f"{RECIPE_SAMPLES / r['samples_per_s'] / 86400:,.2f}"])
    return body


KERNEL_HEADER = ("op", "batch", "mode", "dropout", "ours ms", "fastest peer", "peer ms", "peer / ours")


def kernel_body(rows: list[dict]) -> list[list[str]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("part") == "kernels" and "op" in r:  # (a part-level row, e.g. its timeout, is a note)
            groups.setdefault((r["op"], r["batch"], r["mode"], r["dropout"]), []).append(r)
    body = []
    for key, rs in groups.items():
        ours = next((r for r in rs if r["impl"] == "ours"), {})
        peers = [r for r in rs if r["impl"] not in ("ours", "copy") and r.get("ms")]
        best = min(peers, key=lambda r: r["ms"], default=None)
        cells = [*map(str, key), _f(ours.get("ms"), "{:.4g}") if ours.get("ms") else str(ours.get("status", "-"))[:60]]
        cells += [best["impl"], f"{best['ms']:.4g}", _f(best["ms"] / ours["ms"] if ours.get("ms") else None,
                                                        "{:.2f}x")] if best else ["-", "-", "-"]
        body.append(cells)
    return body


def render(env: dict, rows: list[dict], markdown: bool) -> str:
    fmt = md_table if markdown else table
    head = (f"lxmert-fast benchmark, {env.get('date')}: {env.get('hardware')}; torch {env.get('torch')}, triton "
            f"{env.get('triton')}, transformers {env.get('transformers')}, deepspeed "
            f"{env.get('deepspeed') or 'not importable'}; commit {env.get('commit')}")
    peak = next((r for r in rows if r.get("key") == "env:peak"), None)
    parts = ["# lxmert-fast benchmark" if markdown else "", head]
    if peak:
        parts.append(f"measured peak ({peak['what']}): {peak['peak_tflops']:.4g} TFLOP/s (the MFU denominator)")
    parts.append(f"baseline: {BASELINE}, {BASELINE_SAMPLES_PER_S} samples/s; recipe = {RECIPE_SAMPLES / 1e6:.1f}M "
                 f"samples (20 epochs)")
    notes = [r for r in rows if r.get("status") != "ok" and (r.get("part") in ("plan", "tests", "env", "note")
                                                             or r.get("part") in ("kernels", "data") and "op" not in r
                                                             and "what" not in r)]
    for r in notes:
        parts.append(f"{r.get('key')}: {r.get('status')}" + (f" ({r['detail']})" if r.get("detail") else ""))
    data = [r for r in rows if r.get("part") == "data"]
    if data:
        parts += ["\n## data pipeline" if markdown else "\ndata pipeline",
                  fmt(("what", "figure", "details"), [[r["what"], f"{r['mb_per_s']:.1f} MB/s" if "mb_per_s" in r else
                                                       f"{r['samples_per_s']:,.0f} samples/s",
                                                       ", ".join(f"{k} {r[k]:.2f}" if isinstance(r[k], float) else
                                                                 f"{k} {r[k]}" for k in ("x_tsv", "batch", "workers",
                                                                                         "device", "images") if k in r)]
                                                      for r in data])]
    kb = kernel_body(rows)
    if kb:
        kind = "" if env.get("device") == "cuda" else " - Triton's interpreter on a CPU: a smoke test, not a figure"
        parts += [("\n## kernels" if markdown else "\nkernels (ours against the fastest peer)") + kind,
                  fmt(KERNEL_HEADER, kb)]
    tg = targets(rows, env)
    parts += ["\n## targets" if markdown else "\ntargets", fmt(("target", "measured", "verdict"), tg)]
    eb = e2e_body(rows)
    if eb:
        first = next(r for r in rows if r.get("part") == "e2e")
        parts += [("\n## end-to-end pre-training" if markdown else "\nend-to-end pre-training")
                  + f" ({first.get('preset')}, batch {first.get('batch')}; x hf: samples/s over transformers' in this "
                    f"run; recipe days: 20 epochs at this rate)", fmt(E2E_HEADER, eb)]
    return "\n".join(parts) + "\n"


def write(out: Path, env: dict, rows: list[dict]) -> str:
    """results.json and summary.md in ``out``; returns the text tables."""
    rows = in_plan_order(rows)
    add_ratios(rows)
    (out / "results.json").write_text(json.dumps(clean({"environment": env, "rows": rows}), indent=1), encoding="utf-8")
    (out / "summary.md").write_text(render(env, rows, markdown=True), encoding="utf-8")
    return render(env, rows, markdown=False)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    found = read_rows(folder / "rows.jsonl")
    environment = next((r["environment"] for r in found if r.get("key") == "env:record"), {})
    print(write(folder, environment, found))
