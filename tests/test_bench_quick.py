"""bench/run.py --quick: every part at tiny sizes writes its JSON rows, the markdown summary, the
plots (when matplotlib is importable) and prints the end-to-end table last. Plus the arithmetic of
the baseline projection."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

ENV_FIELDS = ("hardware", "torch", "transformers", "deepspeed", "python", "commit", "date", "device_kind")
E2E_OK_FIELDS = ("variant", "status", "samples_per_s", "samples_per_s_per_device", "tflops_per_device", "mfu",
                 "peak_mem_gb", "ratio_to_peer", "step_s", "step_s_all", "batch", "micro_batch", "precision",
                 "recipe_days_1dev", "vs_baseline_4gpu", "model_flops_per_sample", "peak_tflops_measured")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    env = child_env()  # without the torch.distributed variables earlier in-process tests left set
    env.pop("TRITON_INTERPRET", None)  # run.py sets what it needs itself
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_quick_writes_rows_for_every_part(quick_run):
    out, _ = quick_run
    for name in ("peak.jsonl", "e2e.jsonl", "bench_kernels.jsonl", "data.jsonl", "results.json", "summary.md"):
        assert (out / name).is_file(), f"{name} missing"
    res = json.loads((out / "results.json").read_text())
    for f in ENV_FIELDS:
        assert f in res["environment"], f
    parts = {r["part"] for r in res["rows"]}
    assert parts == {"peak", "e2e", "kernels", "data"}, parts
    peak = next(r for r in res["rows"] if r["part"] == "peak")
    assert peak["peak_tflops"] > 0


def test_quick_e2e_rows(quick_run):
    out, _ = quick_run
    rows = [json.loads(line) for line in (out / "e2e.jsonl").read_text().splitlines() if line.strip()]
    by = {r["variant"]: r for r in rows}
    for name in ("hf", "hf+compile", "ours eager", "ours sdpa", "ours triton", "ours flash_attn"):
        assert name in by, f"no row for {name}"
    for name in ("hf", "ours eager", "ours sdpa"):
        assert by[name]["status"] == "ok", by[name]["status"]
    # hf+compile either ran or says why not; never silently absent
    assert by["hf+compile"]["status"] == "ok" or by["hf+compile"]["status"].startswith("failed: ")
    import torch

    if not torch.cuda.is_available():
        assert by["ours triton"]["status"].startswith("unavailable: ")
        assert by["ours flash_attn"]["status"].startswith("unavailable: ")
    res = json.loads((out / "results.json").read_text())
    for r in res["rows"]:
        if r["part"] == "e2e" and r["status"] == "ok":
            for f in E2E_OK_FIELDS + ENV_FIELDS:
                assert f in r and r[f] is not None, f"{r['variant']}: {f}"
            assert r["samples_per_s"] > 0 and len(r["step_s_all"]) >= 2
    assert by["hf"]["ratio_to_peer"] == pytest.approx(1.0)
    assert any(r.get("group") == "ablation" for r in rows), "no ablation rows"


def test_quick_summary_plots_and_table_last(quick_run):
    out, stdout = quick_run
    md = (out / "summary.md").read_text()
    assert "## End-to-end pre-training throughput" in md and "| hf |" in md and "198.5" in md
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("throughput.png", "kernel_speedups.png"):
            assert (out / png).is_file() and (out / png).read_bytes()[:4] == b"\x89PNG", png
    else:
        assert "plots skipped: matplotlib is not importable" in stdout
    tail = stdout.strip().splitlines()[-20:]
    assert any(line.startswith("variant ") and "samples/s" in line for line in tail), "\n".join(tail)
    assert tail[-1].split("|")[0].strip() in {r["variant"] for r in json.loads((out / "results.json").read_text())["rows"]
                                              if r["part"] == "e2e"}


def test_projection_arithmetic():
    import _report

    rows = [{"part": "e2e", "status": "ok", "samples_per_s": 198.5, "samples_per_s_per_device": 198.5,
             "devices": 1}]
    _report.add_projections(rows, 4)
    r = rows[0]
    assert r["recipe_samples"] == 670_000 * 256
    assert r["recipe_days_1dev"] == pytest.approx(670_000 * 256 / 198.5 / 86400)
    assert r["recipe_days_1dev"] == pytest.approx(10.0, abs=0.01)
    assert r["recipe_days_4dev"] == pytest.approx(r["recipe_days_1dev"] / 4)
    assert r["vs_baseline_4gpu"] == pytest.approx(1.0) and r["vs_baseline_per_gpu"] == pytest.approx(4.0)
    assert r["projection_basis"].startswith("ideal")


def test_quick_without_deepspeed(tmp_path):
    """deepspeed unimportable (as on the GPU machine without the carried wheels): the peer and ours
    still measure, ours in the peer's plain loop with torch's fused AdamW, noted in the row."""
    shim = tmp_path / "shim" / "deepspeed"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("deepspeed is unimportable here (test shim)")\n')
    env = child_env()
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(shim.parent) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--parts", "e2e", "--ablations",
                           "off", "--variants", "hf,ours sdpa", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"] if r["part"] == "e2e"}
    assert by["hf"]["status"] == "ok" and by["ours sdpa"]["status"] == "ok", {k: v["status"] for k, v in by.items()}
    ours = by["ours sdpa"]
    assert ours["kind"] == "ours_plain" and ours["optimizer"] == "torch_fused" and "no DeepSpeed" in ours["note"]
    assert ours["deepspeed"] is None and ours["ratio_to_peer"] > 0
    assert "deepspeed does not import" in proc.stdout
