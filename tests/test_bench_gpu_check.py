"""bench/gpu_check.sh's dry run (GPU_CHECK_DRY=1): every part's plumbing on CPU at tiny shapes,
as the GPU machine will run it, and the rows it owes.

- as is (with DeepSpeed): every planned row exists, a figure or a "no figure" row with its reason;
  the Triton checks pass in the interpreter; the end-to-end variants carry figures;
- with deepspeed unimportable (a shim package on PYTHONPATH that raises ImportError, as on the GPU
  machine without the carried wheels): transformers and ours still carry figures, ours in the plain
  loop with torch's fused AdamW, labelled so, and every compiled variant has its row;
- a budget too small for the workers: the timeout rows name the phase each worker was in;
- the worst case of the part limits fits the 6-minute budget.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import _gpu_plan  # noqa: E402

E2E_FIGURE_FIELDS = ("samples_per_s", "step_s", "step_s_all", "tflops_per_device", "mfu", "model_flops_per_sample",
                     "peak_tflops_measured", "ratio_to_peer", "setup", "precision", "batch")


class Run:
    """One gpu_check process, started at once and awaited later (the three runs of this module overlap:
    each has serial stretches that leave a core idle)."""

    def __init__(self, argv: list[str], out: Path, extra_env: dict, timeout: float):
        env = child_env()
        env.pop("TRITON_INTERPRET", None)  # the script sets what it needs itself
        env.update(GPU_CHECK_DRY="1", OUT=str(out), **extra_env)
        self.out, self.timeout = out, timeout
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.done = {}
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()

    def _wait(self) -> None:
        try:
            self.done["out"] = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.done["out"] = self.proc.communicate()
            self.done["timed_out"] = True
        self.done["wall"] = time.monotonic() - self.t0

    def result(self) -> tuple[Path, str, float]:
        self.waiter.join()
        stdout, stderr = self.done["out"]
        assert not self.done.get("timed_out"), f"did not end within {self.timeout} s: " + stdout[-3000:] + stderr[-3000:]
        assert self.proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
        return self.out, stdout, self.done["wall"]


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The full dry run, the dry run without deepspeed (env, e2e, report) and a run whose budget is too
    small for the e2e workers, all three started together."""
    script = ["bash", str(REPO / "bench" / "gpu_check.sh")]
    shim = tmp_path_factory.mktemp("no_deepspeed")
    (shim / "deepspeed").mkdir()
    (shim / "deepspeed" / "__init__.py").write_text(
        'raise ImportError("deepspeed is unimportable here (test shim: the GPU machine without the wheels)")\n')
    pythonpath = child_env().get("PYTHONPATH")
    small = tmp_path_factory.mktemp("gpu_check_small_budget")
    started = {
        "full": Run(script, tmp_path_factory.mktemp("gpu_check_dry"), {}, 420),
        "no_deepspeed": Run(script, tmp_path_factory.mktemp("gpu_check_dry_no_ds"),
                            {"PYTHONPATH": str(shim) + (":" + pythonpath if pythonpath else ""),
                             "GPU_CHECK_PARTS": "env,e2e,report"}, 420),
        "small_budget": Run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(small), "--dry",
                             "--parts", "e2e", "--budget", "14"], small, {}, 120),
    }
    return {name: run.result() for name, run in started.items()}


@pytest.fixture(scope="module")
def dry_full(runs):
    return runs["full"]


@pytest.fixture(scope="module")
def dry_no_deepspeed(runs):
    return runs["no_deepspeed"]


def test_dry_run_returns_at_most_eight_files(dry_full):
    out, _, wall = dry_full
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    for name in ("gpu_check.log", "rows.jsonl", "results.json", "summary.md", "logs.tgz"):
        assert name in files, files
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("throughput.png", "kernel_speedups.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    with tarfile.open(out / "logs.tgz") as tar:
        names = tar.getnames()
    assert any("e2e.hf" in n for n in names) and any("correctness" in n for n in names), names
    assert wall < 400, f"the dry run took {wall:.0f} s"


def test_every_planned_row_is_a_figure_or_says_why(dry_full):
    out, _, _ = dry_full
    rows = _rows(out)
    keys = {r.get("key") for r in rows}
    for part in ("env", "correctness", "kernels", "e2e"):
        missing = set(_gpu_plan.expected_keys(part, dry=True)) - keys
        assert not missing, f"{part}: no row for {sorted(missing)}"
        assert f"timing:{part}" in keys
    for r in rows:
        if r.get("figure") is False:
            kind, _, why = r["status"].partition("): ")
            assert kind.startswith("no figure (") and why.strip(), r["status"]
    install = next(r for r in rows if r["key"] == "env:install")
    assert install["no_figure"] == "skipped" and "dry run" in install["status"]


def test_correctness_checks_pass_in_the_interpreter(dry_full):
    out, _, _ = dry_full
    import lxmert_kernels

    checks = {r["check"]: r for r in _rows(out) if r.get("part") == "correctness"}
    assert set(checks) == {c for cs in _gpu_plan.CORRECTNESS.values() for c in cs}
    for name, r in checks.items():
        if name.startswith("flash_attention_qkv") and not hasattr(lxmert_kernels, "flash_attention_qkv"):
            assert r["status"] == "no figure (unavailable): this lxmert_kernels has no flash_attention_qkv"
            continue
        assert r["status"] == "ok", f"{name}: {r['status']}"
        assert r["errors"] and r["worst_err_over_bound"] <= 1.0


def test_kernel_rows_stream_per_implementation(dry_full):
    out, _, _ = dry_full
    rows = [r for r in _rows(out) if r.get("part") == "kernels"]
    for key in _gpu_plan.kernel_groups(dry=True):
        impls = {r["impl"] for r in rows if r["key"] == key}
        assert any(i.startswith("ours") for i in impls) and len(impls) >= 2, (key, impls)
    ln = [r for r in rows if r["op"] == "layer_norm+residual"]
    assert any(r.get("reference") == "copy" and r["ms"] > 0 for r in ln)
    assert all(r["measurement"].startswith("interpreter smoke test") for r in rows)


def test_e2e_rows_carry_figures_with_deepspeed(dry_full):
    out, stdout, _ = dry_full
    by = {r["variant"]: r for r in _rows(out) if r.get("part") == "e2e"}
    assert set(by) == {v["key"] for v in _gpu_plan.E2E_VARIANTS}
    for name, r in by.items():
        assert r["status"] == "ok", f"{name}: {r['status']}"
        for f in E2E_FIGURE_FIELDS:
            if f == "ratio_to_peer" and _gpu_plan.own_batch(name):
                continue  # checked below: no peer ran that batch
            assert r.get(f) is not None, f"{name}: {f}"
        assert r["samples_per_s"] > 0 and r["quiet"] is True
    for name in ("ours | DeepSpeed", "ours+compile default | DeepSpeed"):
        assert "DeepSpeed cpu.json" in by[name]["setup"] and by[name]["kind"] == "ours", by[name]["setup"]
    for name in ("ours", "ours sdpa", "ours+compile default"):  # the peer's loop and optimizer
        assert "the peer's plain loop" in by[name]["setup"] and by[name]["optimizer"] == by["hf"]["optimizer"]
    for mode in ("default", "reduce-overhead", "max-autotune"):
        r = by[f"ours+compile {mode}"]
        assert r["compile_mode"] == mode and r["fullgraph"] is True and r["graph_breaks"] == 0
    assert by["hf"]["ratio_to_peer"] == pytest.approx(1.0)
    # the variants with their own batch (32 on a GPU: one GPU's share of 256 on 8) run it, and have
    # no ratio to a peer that ran another batch
    own = [v for v in _gpu_plan.E2E_VARIANTS if v.get("batch")]
    assert {v["compile"] for v in own} == {None, "default", "reduce-overhead"}
    for v in own:
        r = by[v["key"]]
        assert r["batch"] == r["micro_batch"] == _gpu_plan.DRY_VARIANT_BATCH != by["ours"]["batch"]
        assert "ratio_to_peer" not in r and "ratio_to_compiled_peer" not in r


def test_part_times_then_the_table_last(dry_full):
    _, stdout, _ = dry_full
    assert "parts (seconds, limit, outcome):" in stdout
    for part in _gpu_plan.PARTS:
        assert f"\n  {part} " in stdout, part
    tail = stdout.strip().splitlines()
    header = max(i for i, line in enumerate(tail) if line.startswith("variant ") and "samples/s" in line)
    body = tail[header + 2:]
    names = [v["key"] for v in _gpu_plan.E2E_VARIANTS]
    assert len(body) == len(names) and all(line.startswith(n + " ") for line, n in zip(body, names)), body


def test_without_deepspeed_the_peer_and_ours_still_measure(dry_no_deepspeed):
    out, _, wall = dry_no_deepspeed
    rows = _rows(out)
    versions = next(r for r in rows if r["key"] == "env:versions")
    assert versions["deepspeed_importable"] is False and "test shim" in versions["deepspeed_error"]
    by = {r["variant"]: r for r in rows if r.get("part") == "e2e"}
    assert set(by) == {v["key"] for v in _gpu_plan.E2E_VARIANTS}
    for name in ("hf", "ours", "hf+compile", "ours sdpa", "ours+compile default", "ours+compile reduce-overhead",
                 "ours+compile max-autotune"):
        assert by[name]["status"] == "ok" and by[name]["samples_per_s"] > 0, (name, by[name]["status"])
    for name in ("ours | DeepSpeed", "ours+compile default | DeepSpeed"):  # the same model, fused AdamW, labelled
        r = by[name]
        assert r["status"] == "ok" and r["samples_per_s"] > 0, r["status"]
        assert "NO DeepSpeed (deepspeed not importable)" in r["setup"] and "torch fused AdamW" in r["setup"]
        assert r["kind"] == "ours_plain" and r["optimizer"] == "torch_fused" and "test shim" in r["deepspeed_error"]
    assert wall < 300, f"{wall:.0f} s"


def test_timeouts_name_the_phase(runs):
    """A budget too small for the e2e workers: each gets a timeout row saying where it was."""
    out, _, wall = runs["small_budget"]
    assert wall < 60, f"{wall:.0f} s"
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    e2e = {r["variant"]: r for r in rows if r.get("part") == "e2e"}
    assert set(e2e) == {v["key"] for v in _gpu_plan.E2E_VARIANTS}
    timeouts = [r for r in e2e.values() if r.get("no_figure") == "timeout"]
    assert timeouts, [r["status"] for r in e2e.values()]
    for r in timeouts:
        assert "reached its limit" in r["status"], r["status"]
    assert any(r.get("phase") for r in timeouts)
    assert len(list(out.iterdir())) <= 8


def test_worst_case_part_limits_fit_the_budget():
    """Every part at its full limit plus the kill grace, after the slowest install: inside 360 s."""
    import gpu_check

    class A:
        out, work, dry, budget = "/tmp/unused-gpu-check", "/tmp/unused-gpu-check-work", False, 0
        parts = ",".join(_gpu_plan.PARTS)

    c = gpu_check.Check.__new__(gpu_check.Check)
    c.a, c.dry, c.budget, c.caps, c.parts = A, False, _gpu_plan.BUDGET_S, _gpu_plan.CAPS, list(_gpu_plan.PARTS)
    clock = [_gpu_plan.INSTALL_LIMIT_S + 3]
    c.elapsed = lambda: clock[0]
    limits = {}
    for part in _gpu_plan.PARTS:
        limits[part] = c.limit_for(part)
        clock[0] += limits[part] + _gpu_plan.GRACE_S
    assert clock[0] <= _gpu_plan.BUDGET_S, (clock[0], limits)
    for part in _gpu_plan.PARTS:
        assert limits[part] >= _gpu_plan.RESERVE[part], (part, limits)


def test_correctness_comparison_catches_a_wrong_kernel():
    """The 2x-PyTorch's-error rule of bench/gpu_correctness.py: a kernel off by more than PyTorch's own
    bf16 error fails, a NaN fails, one within it passes."""
    import torch

    import gpu_correctness

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 64, generator=g, dtype=torch.float64)
    torch_bf16 = ref.to(torch.bfloat16)  # PyTorch's own bf16 result: rounding error only
    ok = gpu_correctness.Compare(torch.bfloat16, "attention")
    ok.add("out", torch_bf16, ref, torch_bf16)
    assert ok.verdict()[0] == "ok"
    bad = gpu_correctness.Compare(torch.bfloat16, "attention")
    bad.add("out", (ref + 0.1).to(torch.bfloat16), ref, torch_bf16)
    assert bad.verdict()[0].startswith("mismatch: out error")
    nan = gpu_correctness.Compare(torch.float32, "elementwise")
    nan.add("dx", torch.full((4,), float("nan")), torch.zeros(4, dtype=torch.float64))
    assert "non-finite" in nan.verdict()[0]
    masked = gpu_correctness.Compare(torch.float32, "attention")
    masked.require(False, "the fully masked row's output is not exactly 0")
    assert masked.verdict()[0] == "mismatch: the fully masked row's output is not exactly 0"


def test_kernel_targets_judge_issue_15s_conditions():
    """The report's kernel targets: the cross pair forward+backward against the faster two-SDPA form,
    with dropout 0.1 (the issue's condition) and 0, >= 2x; LayerNorm (with and without dropout) and
    GELU against a copy of the same bytes, >= 80%; a group without its reference gives no line."""
    import gpu_report

    def row(op, impl, ms, batch=256, mode="fwd+bwd", dropout=0.0, **more):
        return dict(part="kernels", op=op, impl=impl, ms=ms, batch=batch, mode=mode, dropout=dropout, **more)

    rows = [row("cross_pair", "ours bidirectional (1 launch)", 1.0, dropout=0.1),
            row("cross_pair", "2 x sdpa (auto backend)", 2.5, dropout=0.1),
            row("cross_pair", "2 x sdpa flash", 1.8, dropout=0.1),
            row("cross_pair", "ours bidirectional (1 launch)", 1.0),
            row("cross_pair", "2 x sdpa (auto backend)", 2.2),
            row("cross_pair", "ours bidirectional (1 launch)", 0.5, mode="fwd"),
            row("cross_pair", "2 x sdpa (auto backend)", 0.6, mode="fwd"),
            row("layer_norm+residual", "ours layer_norm", 0.10, mode="fwd", dropout=0.1, **{"GB/s": 3000.0}),
            row("layer_norm+residual", "copy (same bytes)", 0.09, mode="fwd", dropout=0.1),
            row("bias_gelu", "ours bias_gelu", 0.2, mode="fwd", **{"GB/s": 1500.0}),
            row("bias_gelu", "copy (same bytes)", 0.1, mode="fwd"),
            row("bias_gelu", "ours bias_gelu", 0.3, batch=64, mode="fwd"),  # no copy measured: no line
            row("layer_norm+residual", "ours layer_norm", None, batch=64, mode="fwd")]  # no figure: no line
    lines = gpu_report.kernel_targets(rows)
    assert lines == [
        ["cross pair >= 2.0x two SDPA calls (B256 fwd+bwd, dropout 0.1)", "1.80x (vs 2 x sdpa flash)", "NOT met"],
        ["cross pair >= 2.0x two SDPA calls (B256 fwd+bwd, dropout 0)", "2.20x (vs 2 x sdpa (auto backend))", "met"],
        ["LayerNorm + residual >= 80% of copy bandwidth (B256 fwd, dropout 0.1)", "90% (3,000 GB/s)", "met"],
        ["bias + GELU >= 80% of copy bandwidth (B256 fwd)", "50% (1,500 GB/s)", "NOT met"],
    ], lines
    cuda_env = {"device_kind": "cuda", "hardware": "NVIDIA H200", "dry_run": False}
    assert gpu_report.targets(rows, cuda_env)[-4:] == lines  # after the end-to-end targets
