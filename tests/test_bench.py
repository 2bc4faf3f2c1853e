"""bench/: one harness that times the step users run.

- In this process, `--quick` on the CPU path: ours is `Trainer.train_step` of `pretrain.py`'s recipe (a spy
  counts its calls, and a change to the recipe's step shows in the benchmark's loss), the peer is
  transformers' model on the same batches; the report writes its files and one targets table.
- The GPU plan's dry run (`bench/gpu_check.sh --dry`, a CPU at tiny shapes) with DeepSpeed: every planned
  variant ends with a figure or the reason it has none; a simulated out-of-memory while timing is a row and
  the run goes on; the planner runs fewer variants at once on a simulated 40 GB card than on a 140 GB one;
  the compile caches come back as one archive.
- A second dry run without DeepSpeed (a shim that refuses the import), given that archive: it compiles from
  the restored caches, and the variants that DeepSpeed's absence changes (ours on the torch engine, compiled
  and with ZeRO-1; ZeRO-3, DeepSpeed's alone; transformers' model beside them) end with a figure or the reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
NO_FIGURE = ("no figure (error): ", "no figure (unavailable): ", "no figure (out of memory): ",
             "no figure (timeout): ")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]


def _e2e(rows: list[dict]) -> dict[str, dict]:
    return {r["variant"]: r for r in rows if r.get("part") == "e2e"}


def test_the_benchmark_times_the_recipes_own_step(tmp_path, monkeypatch, tmp_path_factory):
    from bench import run as bench_run
    from lxmert_fast.pretrain import PretrainRecipe
    from lxmert_fast.train.runtime import Trainer

    calls = []
    original_step, original_micro = Trainer.train_step, PretrainRecipe.micro_step

    def spy(self, micro_batches, measure_grad_norm=False):
        calls.append(self.recipe.job)
        return original_step(self, micro_batches, measure_grad_norm)

    def changed(self, trainer, raw):  # a change to the recipe's step: its loss becomes 7
        loss, parts = original_micro(self, trainer, raw)
        return loss * 0 + 7.0, parts

    monkeypatch.setattr(Trainer, "train_step", spy)
    monkeypatch.setattr(PretrainRecipe, "micro_step", changed)
    world = tmp_path_factory.getbasetemp() / "bench_world"
    assert bench_run.main(["--quick", "--parts", "env,e2e", "--out", str(tmp_path), "--world", str(world)]) == 0
    rows = _rows(tmp_path)
    e2e = _e2e(rows)
    assert e2e["ours"]["status"] == "ok" and e2e["hf"]["status"] == "ok", e2e
    assert e2e["ours"]["loss"] == 7.0 and e2e["hf"]["loss"] != 7.0
    assert calls == ["pretrain"] * 4  # 1 warm-up + 2 timed + 1 counted, all through Trainer.train_step
    assert e2e["ours"]["setup"].startswith("pretrain.py --data_root <bench world>")
    assert "transformers.LxmertForPreTraining" in e2e["hf"]["setup"]
    assert e2e["ours"]["samples_per_s"] > 0 and e2e["ours"]["peak_mem_gb"] > 0
    # what a step asks of the dispatcher (a count, not a time): ours reads only the masked rows
    assert 0 < e2e["ours"]["dispatcher_calls_per_step"] < e2e["hf"]["dispatcher_calls_per_step"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["torch"] and results["environment"]["commit"]
    assert "x_hf" in next(r for r in results["rows"] if r.get("variant") == "ours")
    assert "## targets" in (tmp_path / "summary.md").read_text()


# the variants DeepSpeed's absence changes: the engine of ours (plain, compiled, ZeRO-1), ZeRO-3 (DeepSpeed's alone),
# and transformers' model beside them
WITHOUT_DEEPSPEED = ("ours", "hf", "ours compiled", "ours zero1", "ours zero3")


def _dry_run(argv: list[str], out: Path, pythonpath: str | None = None) -> tuple[Path, str]:
    """``bash bench/gpu_check.sh --dry ...`` writing under ``out``: (out, what it printed)."""
    env = child_env()
    env.pop("TRITON_INTERPRET", None)  # the harness sets it itself on a CPU
    env["OUT"] = str(out)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_dry")
    world = str(tmp_path_factory.getbasetemp() / "bench_world")
    shim = base / "shim"
    (shim / "deepspeed").mkdir(parents=True)
    (shim / "deepspeed" / "__init__.py").write_text('raise ImportError("deepspeed is not installed (test shim)")\n')
    full = _dry_run(["--budget", "1200", "--", "--world", world, "--simulate-oom", "ours zero1:timing"], base / "full")
    bare = _dry_run(["--cache", str(full[0] / "compile_cache.tgz"), "--", "--parts", "env,e2e", "--world", world,
                     "--variants", ",".join(WITHOUT_DEEPSPEED)], base / "bare",
                    ":".join(p for p in (str(shim), child_env().get("PYTHONPATH")) if p))
    return {"full": full, "bare": bare}


def _every_variant_ends_with_a_figure_or_a_reason(rows: list[dict], planned=None) -> dict[str, dict]:
    from bench.e2e import GPU_VARIANTS

    e2e = _e2e(rows)
    assert set(e2e) == set(planned or (v.key for v in GPU_VARIANTS))
    for name, r in e2e.items():
        assert r["status"] == "ok" or (r["status"].startswith(NO_FIGURE) and len(r["status"]) > 40), (name, r)
    return e2e


@pytest.mark.slow
def test_dry_run_returns_at_most_seven_files_and_the_tables(dry):
    out, printed = dry["full"]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 7, names
    for name in ("gpu_check.log", "rows.jsonl", "results.json", "summary.md", "gpu_tests.log", "logs.tgz",
                 "compile_cache.tgz"):
        assert name in names, names
    assert printed.rstrip().splitlines()[-1].startswith("== compile caches:")
    assert printed.index("\ntargets") < printed.index("\nend-to-end pre-training")  # the e2e table last


@pytest.mark.slow
def test_dry_run_every_variant_ends_with_a_figure_or_its_reason(dry):
    e2e = _every_variant_ends_with_a_figure_or_a_reason(_rows(dry["full"][0]))
    for name in ("ours", "hf", "ours compiled", "hf compiled", "ours sdpa", "ours zero3"):
        assert e2e[name]["status"] == "ok", e2e[name]
    # on a CPU the CUDA-graph modes (no CUDA) and max-autotune (the dry run's eager backend takes no mode) are
    # refused with the reason, not skipped, and start no worker
    for name in ("ours reduce-overhead", "ours reduce-overhead, batch 32", "ours max-autotune"):
        assert e2e[name]["status"].startswith("no figure (unavailable): refused before building: CompileModeError: "
                                              "--compile "), e2e[name]
    with tarfile.open(dry["full"][0] / "logs.tgz") as tar:
        worker_logs = {Path(n).name for n in tar.getnames()}
    assert "e2e.ours.log" in worker_logs and not any("reduce" in n or "autotune" in n for n in worker_logs)
    assert all(r.get("peak_mem_gb") is not None for r in e2e.values() if r["status"] == "ok")


@pytest.mark.slow
def test_dry_run_out_of_memory_while_timing_is_a_row_and_the_run_goes_on(dry):
    rows = _rows(dry["full"][0])
    e2e = _e2e(rows)
    oom = e2e["ours zero1"]
    assert oom["status"].startswith("no figure (out of memory): while timing:"), oom
    order = next(r["order"] for r in rows if r.get("key") == "plan:e2e")
    later = order[order.index("ours zero1") + 1:]
    assert later and all(e2e[k]["status"] == "ok" or e2e[k]["status"].startswith(NO_FIGURE) for k in later)


@pytest.mark.slow
def test_dry_run_plans_by_the_gpus_memory(dry):
    rows = _rows(dry["full"][0])
    planned = next(r for r in rows if r.get("key") == "plan:e2e")
    observed = next(r for r in rows if r.get("key") == "plan:observed")
    assert planned["usable_gb"] < 40 and 1 <= observed["most_resident"] <= planned["most_at_once"]
    big = subprocess.run([sys.executable, "-m", "bench.run", "--plan-only", "--gpu-memory", "140"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert big.returncode == 0, big.stderr[-3000:]
    assert json.loads(big.stdout.strip().splitlines()[-1])["most_at_once"] > planned["most_at_once"]


@pytest.mark.slow
def test_dry_run_reports_the_gpu_tests_plan_and_the_kernel_groups(dry):
    rows = _rows(dry["full"][0])
    tests = next(r for r in rows if r.get("key") == "tests:gpu")
    assert tests["status"].startswith("plan: ") and tests["command"].startswith("-m pytest -m gpu")
    assert len(tests["plan"]) >= 50 and any("test_model_gpu" in t for t in tests["plan"])
    kernels = {r["key"] for r in rows if r.get("part") == "kernels"}
    for op in ("cross_pair", "self_attention L20", "self_attention L36", "layer_norm+residual", "bias_gelu"):
        assert f"kernels:{op} B2 fwd+bwd" in kernels, kernels
    assert all(r["status"] == "ok" for r in rows if r.get("part") == "kernels" and r["impl"] == "ours")


@pytest.mark.slow
def test_without_deepspeed_ours_runs_the_torch_engine(dry):
    out, printed = dry["bare"]
    assert "deepspeed does not import" in printed
    e2e = _every_variant_ends_with_a_figure_or_a_reason(_rows(out), WITHOUT_DEEPSPEED)
    assert e2e["ours"]["status"] == "ok" and "--engine torch" in e2e["ours"]["setup"]
    assert e2e["hf"]["status"] == "ok" and e2e["ours compiled"]["status"] == "ok"
    assert e2e["ours zero1"]["status"] == "ok" and "--engine torch" in e2e["ours zero1"]["setup"]
    assert e2e["ours zero3"]["status"].startswith("no figure (unavailable)")  # ZeRO-3 is DeepSpeed's


@pytest.mark.slow
def test_a_run_given_the_compile_cache_compiles_from_it(dry):
    first = next(r for r in _rows(dry["full"][0]) if r.get("key") == "env:compile_cache")
    out, printed = dry["bare"]
    again = next(r for r in _rows(out) if r.get("key") == "env:compile_cache")
    assert first["fxgraph_cache_miss"] >= 1
    assert "compile caches: restored" in printed and again["fxgraph_cache_hit"] >= 1, again
