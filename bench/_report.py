"""Reporting for bench/run.py: projections against the baseline, the printed table, the markdown
summary, results.json and the PNG plots (matplotlib, when installed)."""
from __future__ import annotations

import json
from pathlib import Path

from _common import BASELINE_DEVICES, BASELINE_NAME, BASELINE_SAMPLES_PER_S, RECIPE_SAMPLES, clean

DAY = 86400.0


# ---------------------------------------------------------------------------------------------- figures
def add_projections(rows: list[dict], project_devices: int) -> None:
    """Recipe wall time (171.5M samples) and the ratio to the 4x Titan Xp rate, per e2e row.

    recipe_days: at the rate measured in this run (on `devices` devices);
    recipe_days_1dev: at the measured per-device rate on one device;
    recipe_days_Ndev (N = project_devices): the measured N-device rate when this run had N devices,
    else N x the per-device rate x the measured scaling efficiency (1.0, "ideal", when unmeasured).
    """
    for r in rows:
        if r.get("part") != "e2e" or r.get("status") != "ok":
            continue
        rate, per_dev, devices = r["samples_per_s"], r["samples_per_s_per_device"], r.get("devices", 1)
        r["recipe_samples"] = RECIPE_SAMPLES
        r["recipe_days"] = RECIPE_SAMPLES / rate / DAY
        r["recipe_days_1dev"] = RECIPE_SAMPLES / (r.get("single_device_samples_per_s") or per_dev) / DAY
        r["vs_baseline_4gpu"] = rate / BASELINE_SAMPLES_PER_S
        r["vs_baseline_per_gpu"] = per_dev / (BASELINE_SAMPLES_PER_S / BASELINE_DEVICES)
        n = project_devices
        if devices == n:
            r[f"recipe_days_{n}dev"] = r["recipe_days"]
            r["projection_basis"] = "measured"
        else:
            eff = r.get("scaling_efficiency") or 1.0
            r[f"recipe_days_{n}dev"] = RECIPE_SAMPLES / (per_dev * n * eff) / DAY
            r["projection_basis"] = ("measured scaling efficiency" if r.get("scaling_efficiency")
                                     else "ideal linear scaling (unmeasured)")
        r["project_devices"] = n


def sanity_notes(rows: list[dict]) -> list[str]:
    out = []
    hot = [r["variant"] for r in rows if r.get("part") == "e2e" and (r.get("mfu") or 0) > 1.0]
    if hot:
        out.append(f"MFU above 100% for {', '.join(hot)}: the peak matmul rate was measured under a different load "
                   f"than those steps (a shared machine); treat MFU here as indicative only.")
    return out


def targets(rows: list[dict], env: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's targets that this hardware can speak to."""
    ok = {r["variant"]: r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"
          and r.get("group") == "main"}
    out = []
    presets = {r.get("preset") for r in rows if r.get("part") == "e2e"}
    if presets and presets != {"base"}:
        return [("targets (stated for the base config)", f"preset {', '.join(sorted(map(str, presets)))}",
                 "n/a")]
    if env.get("device_kind") == "cuda":
        t = ok.get("ours triton")
        if "H200" not in str(env.get("hardware")):
            out.append(("GPU targets are stated for one H200", str(env.get("hardware")), "n/a on this device"))
        if t is None:
            out.append(("ours triton >= 10,000 samples/s", "not measured (variant did not run)", "UNMEASURED"))
        else:
            per = t["samples_per_s_per_device"]
            out.append(("ours triton >= 10,000 samples/s per device", f"{per:,.0f}", _v(per >= 10000)))
            for key, goal, label in (("ratio_to_peer", 3.0, "transformers bf16 autocast"),
                                     ("ratio_to_compiled_peer", 1.5, "transformers under torch.compile")):
                v = t.get(key)
                out.append((f"ours triton >= {goal}x {label}", "peer did not run" if v is None else f"{v:.2f}x",
                            "UNMEASURED" if v is None else _v(v >= goal)))
    else:
        out.append(("GPU targets (H200)", "no GPU in this run", "UNMEASURED"))
        for name in ("ours sdpa", "ours eager"):
            t = ok.get(name)
            if t is not None and t.get("ratio_to_peer") is not None:
                out.append((f"CPU: {name} >= 1.1x transformers (fp32)", f"{t['ratio_to_peer']:.2f}x",
                            _v(t["ratio_to_peer"] >= 1.1)))
    return out


def _v(passed: bool) -> str:
    return "met" if passed else "NOT met"


# ---------------------------------------------------------------------------------------------- text
def _f(x, fmt="{:,.1f}", none="-"):
    if x is None:
        return none
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


E2E_COLS = ("variant", "status", "samples/s", "per device", "TFLOP/s/dev", "MFU", "peak mem GB", "x peer",
            "x hf+compile", "x ref", "recipe days 1 dev", "recipe days N dev")


def e2e_cols(rows: list[dict]) -> tuple[str, ...]:
    if any(r.get("scaling_efficiency") for r in rows):
        return E2E_COLS + ("1-dev samples/s", "scaling eff.")
    return E2E_COLS


def e2e_table_rows(rows: list[dict], project_devices: int) -> list[list[str]]:
    scaling = len(e2e_cols(rows)) > len(E2E_COLS)
    out = []
    for r in rows:
        if r.get("part") != "e2e":
            continue
        status = r.get("status", "?")
        if status == "ok":
            cells = [r["variant"], "ok", _f(r["samples_per_s"]), _f(r["samples_per_s_per_device"]),
                     _f(r.get("tflops_per_device"), "{:.3g}"), _f(r.get("mfu"), "{:.1%}"),
                     _f(r.get("peak_mem_gb"), "{:.2f}"), _f(r.get("ratio_to_peer"), "{:.2f}x"),
                     _f(r.get("ratio_to_compiled_peer"), "{:.2f}x"), _f(r.get("ratio_to_reference"), "{:.2f}x"),
                     _f(r.get("recipe_days_1dev"), "{:,.1f}"),
                     _f(r.get(f"recipe_days_{project_devices}dev"), "{:,.1f}")]
            if scaling:
                cells += [_f(r.get("single_device_samples_per_s")), _f(r.get("scaling_efficiency"), "{:.0%}")]
        else:
            cells = [r["variant"], status[:90]] + [""] * (len(e2e_cols(rows)) - 2)
        out.append(cells)
    return out


def format_table(header, body) -> str:
    widths = [max(len(str(h)), *(len(str(b[i])) for b in body)) if body else len(str(h))
              for i, h in enumerate(header)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def md_table(header, body) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in b) + " |" for b in body]
    return "\n".join(lines)


def is_peer(r: dict) -> bool:
    """A kernel row that competes with ours (not ours, not a bandwidth reference such as a copy)."""
    return not str(r.get("impl", "")).startswith("ours") and not r.get("reference")


def kernel_summary(rows: list[dict], with_copy: bool = False) -> list[list[str]]:
    """Per op / mode / shape / dropout: ours' ms, the fastest peer and ours' speed-up over it; with_copy:
    also the copy of the same bytes' time over ours' (1.0 = ours moves its bytes at copy speed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("part") == "kernels":
            groups.setdefault((r.get("op"), r.get("mode"), r.get("shape"), r.get("dtype"), r.get("dropout")),
                              []).append(r)
    out = []
    for key, rs in groups.items():
        ours = sorted((r for r in rs if str(r.get("impl", "")).startswith("ours") and r.get("ms")), key=lambda r: r["ms"])
        peers = [r for r in rs if is_peer(r) and r.get("ms")]
        copy = next((r for r in rs if r.get("reference") == "copy" and r.get("ms")), None)
        tail = [(_f(copy["ms"] / ours[0]["ms"], "{:.0%}") if copy and ours else "-")] if with_copy else []
        if not ours:
            why = next((r.get("error") for r in rs if str(r.get("impl", "")).startswith("ours")), None)
            out.append([*map(str, key), "failed" + (f": {why[:60]}" if why else ""), "-", "-", "-", *tail])
            continue
        best = min(peers, key=lambda r: r["ms"]) if peers else None
        out.append([*map(str, key), _f(ours[0]["ms"], "{:.4g}"), best["impl"] if best else "-",
                    _f(best["ms"], "{:.4g}") if best else "-",
                    _f(best["ms"] / ours[0]["ms"], "{:.2f}x") if best else "-", *tail])
    return out


def data_summary(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.get("part") != "data":
            continue
        fig = _f(r.get("mb_per_s"), "{:.1f} MB/s") if "mb_per_s" in r else _f(r.get("samples_per_s"),
                                                                                 "{:,.0f} samples/s")
        detail = {k: r[k] for k in ("batch", "workers", "device", "images", "feat_dtype") if k in r}
        out.append([r["what"], fig, ", ".join(f"{k} {v}" for k, v in detail.items())])
    return out


def loader_headroom(rows: list[dict]) -> str | None:
    """The loader's samples/s against the fastest measured training rate (per device): above 1x
    the loader, overlapped with the step by its worker processes, does not bound training."""
    loader = next((r for r in rows if r.get("part") == "data" and r.get("what") == "loader"), None)
    e2e = [r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"]
    if not loader or not e2e:
        return None
    best = max(e2e, key=lambda r: r["samples_per_s_per_device"])
    ratio = loader["samples_per_s"] / best["samples_per_s_per_device"]
    return (f"loader with {loader.get('workers')} workers: {loader['samples_per_s']:,.0f} samples/s = {ratio:.1f}x "
            f"the fastest training rate measured here ({best['variant']}, "
            f"{best['samples_per_s_per_device']:,.1f} samples/s per device): "
            + ("the workers keep ahead of the step (overlap hides loading)" if ratio > 1.2 else
               "the loader would bound training at this rate"))


def write_markdown(path: Path, env: dict, rows: list[dict], notes: list[str], project_devices: int) -> None:
    peak = next((r for r in rows if r.get("part") == "peak"), None)
    e2e = [r for r in rows if r.get("part") == "e2e"]
    s = e2e[0] if e2e else {}
    lines = [
        "# lxmert-fast benchmark summary", "",
        f"- date: {env.get('date')}; host {env.get('host')}",
        f"- hardware: {env.get('hardware')} x {env.get('num_devices')}; CPU {env.get('cpu')} "
        f"({env.get('cpu_cores')} cores, torch threads {env.get('torch_threads')})",
        f"- software: Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"transformers {env.get('transformers')}, deepspeed {env.get('deepspeed')}, triton {env.get('triton')}, "
        f"flash_attn {env.get('flash_attn')}",
        f"- commit: {env.get('commit')}",
        f"- load average (1 min) at start / end: {env.get('loadavg_1m')} / {env.get('loadavg_1m_end')}",
    ]
    if peak:
        lines.append(f"- measured peak ({peak['what']}, median of {peak['reps']}): "
                     f"{peak['peak_tflops']:.4g} TFLOP/s (MFU denominator)")
    if s:
        lines.append(f"- end-to-end: preset {s.get('preset')}, {s.get('precision')}, batch {s.get('batch')} per "
                     f"optimizer step (micro-batch {s.get('micro_batch')} per device), {s.get('tokens')} tokens / "
                     f"{s.get('objects')} objects, masking per step on the device, {s.get('warmup')} warm-up + "
                     f"median of {s.get('steps')} steps; model FLOPs "
                     f"{s.get('model_flops_per_sample', 0) / 1e9:.2f} GFLOP/sample (MLM decoder on masked tokens)")
    lines.append(f"- baseline: {BASELINE_NAME}, {BASELINE_SAMPLES_PER_S} samples/s; recipe = 20 epochs = "
                 f"{RECIPE_SAMPLES / 1e6:.1f}M samples = {RECIPE_SAMPLES / BASELINE_SAMPLES_PER_S / DAY:.1f} days "
                 f"at the baseline rate")
    lines += ["", "## End-to-end pre-training throughput", "",
              md_table(e2e_cols(rows), e2e_table_rows(rows, project_devices)), "",
              f"`x peer` = per-device samples/s over transformers' (same run); `x ref` (ablations) = over the "
              f"unchanged variant measured with them; recipe days for N = "
              f"{project_devices} devices: "
              + (e2e_basis(rows) or "n/a"), ""]
    tg = targets(rows, env)
    if tg:
        lines += ["## Targets", "", md_table(("target", "measured", "verdict"), tg), ""]
    ks = kernel_summary(rows)
    if ks:
        kind = next((r.get("measurement") for r in rows if r.get("part") == "kernels"), "")
        lines += ["## Kernels (" + str(kind) + ")", "",
                  md_table(("op", "mode", "shape", "dtype", "dropout", "ours ms", "fastest peer", "peer ms",
                            "speed-up"), ks), ""]
    ds = data_summary(rows)
    if ds:
        lines += ["## Data pipeline (demo world)", "", md_table(("what", "figure", "details"), ds), ""]
        head = loader_headroom(rows)
        if head:
            lines += [head, ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def e2e_basis(rows: list[dict]) -> str:
    bases = sorted({r.get("projection_basis") for r in rows if r.get("projection_basis")})
    return ", ".join(bases)


def write_results_json(path: Path, env: dict, rows: list[dict], notes: list[str], settings: dict) -> None:
    path.write_text(json.dumps(clean({"environment": env, "settings": settings, "notes": notes, "rows": rows}),
                               indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- plots
def plots(out: Path, rows: list[dict], env: dict) -> tuple[list[str], str | None]:
    """(written PNG paths, reason when none could be written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return [], f"plots skipped: matplotlib is not importable ({type(err).__name__}: {err})"
    written = []
    e2e = [r for r in rows if r.get("part") == "e2e" and r.get("status") == "ok"]
    if e2e:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(e2e) + 3), 4.5))
        names = [r["variant"] for r in e2e]
        vals = [r["samples_per_s_per_device"] for r in e2e]
        colors = ["#888888" if r["kind"] == "hf" else ("#1f77b4" if r.get("group") == "main" else "#9ecae1")
                  for r in e2e]
        ax.bar(range(len(e2e)), vals, color=colors)
        ax.axhline(BASELINE_SAMPLES_PER_S, color="red", ls="--", lw=1,
                   label=f"baseline {BASELINE_NAME}: {BASELINE_SAMPLES_PER_S} samples/s (all 4)")
        ax.axhline(BASELINE_SAMPLES_PER_S / BASELINE_DEVICES, color="red", ls=":", lw=1,
                   label=f"baseline per Titan Xp: {BASELINE_SAMPLES_PER_S / BASELINE_DEVICES:.1f}")
        peer = next((r for r in e2e if r["variant"] == "hf"), None)
        if peer:
            ax.axhline(peer["samples_per_s_per_device"], color="black", ls="-.", lw=1,
                       label=f"transformers peer: {peer['samples_per_s_per_device']:.3g}")
        for i, (v, r) in enumerate(zip(vals, e2e)):
            lab = f"{v:.3g}" + (f"\n{r['ratio_to_peer']:.2f}x" if r.get("ratio_to_peer") else "")
            ax.text(i, v, lab, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(e2e)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("samples/s per device")
        if max(vals) / max(min(vals), 1e-9) > 30 or max(vals) / BASELINE_SAMPLES_PER_S > 30 \
                or BASELINE_SAMPLES_PER_S / max(min(vals), 1e-9) > 30:
            ax.set_yscale("log")
        s = e2e[0]
        ax.set_title(f"LXMERT {s['preset']} pre-training, {s['precision']}, batch {s['batch']} - "
                     f"{env.get('hardware')}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(str(p))
    kern = [r for r in rows if r.get("part") == "kernels" and r.get("ms")]
    if kern:
        series: dict[str, dict[int, float]] = {}
        groups: dict[tuple, list[dict]] = {}
        for r in kern:
            groups.setdefault((r["op"], r["mode"], r.get("shape"), r.get("dropout"), r.get("dtype")), []).append(r)
        for (op, mode, shape, dropout, _dt), rs in groups.items():
            ours = sorted((r for r in rs if str(r["impl"]).startswith("ours")), key=lambda r: r["ms"])
            peers = [r for r in rs if is_peer(r)]
            if not ours or not peers or ours[0].get("batch") is None:
                continue
            length = f" L{shape.split('L')[1].split()[0]}" if op == "self_attention" and "L" in str(shape) else ""
            key = f"{op}{length} {mode}" + (f" p{dropout}" if dropout else "")
            series.setdefault(key, {})[ours[0]["batch"]] = min(p["ms"] for p in peers) / ours[0]["ms"]
        if series:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for key, pts in sorted(series.items()):
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", label=key)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ys = [y for pts in series.values() for y in pts.values() if y > 0]
            if ys and max(ys) / min(ys) > 20:
                ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("speed-up of ours over the fastest peer")
            kind = kern[0].get("measurement", "")
            ax.set_title(f"lxmert_kernels vs PyTorch peers - {kern[0].get('hardware')} ({kind})", fontsize=8)
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            p = out / "kernel_speedups.png"
            fig.savefig(p, dpi=120)
            plt.close(fig)
            written.append(str(p))
    return written, None
