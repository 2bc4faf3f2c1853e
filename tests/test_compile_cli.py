"""`--compile default` end to end through the command lines, against the same runs eager.

Each run is a child process as a user would start it: the demo world, a tiny model with one layer per
encoder and no dropout (so that the compiled and the eager run draw no random numbers that could differ),
30 steps under DeepSpeed (cpu.json: ZeRO-0, fp32). The compiled run goes through inductor (C++ on this
CPU). The logged loss of every step must match the eager run's to within 1e-4 of its value: the same
maths, summed in another order by the generated kernels. The compiled pre-training run has a row budget
without margin, so that batches beyond it (run exactly, eagerly) alternate with compiled steps. Fine-tuning
starts from the eager pre-training run's export. reduce-overhead without CUDA is a usage error.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from tests.helpers import child_env

pytestmark = pytest.mark.slow  # multi-process or CLI runs: out of the quick subset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
REL_TOL = 1e-4
NO_DROPOUT = "hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"


def _env() -> dict:
    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module] + args, env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _losses(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as fh:
        return {int(row[0]): float(row[1]) for row in csv.reader(fh) if row and row[0] != "step"}


def _assert_same_losses(eager: dict[int, float], compiled: dict[int, float], what: str) -> None:
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1)), (sorted(eager), sorted(compiled))
    worst = max(abs(compiled[s] - eager[s]) / abs(eager[s]) for s in eager)
    assert worst <= REL_TOL, f"{what}: compiled losses differ from eager by up to {worst:.2e} (relative)"


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("compile_cli"))
    common = ["--cache_dir", os.path.join(work, "cache"), "--demo_images", "240", "--model", "tiny",
              "--llayers", "1", "--xlayers", "1", "--rlayers", "1", "--config_overrides", NO_DROPOUT,
              "--micro_batch_size", "16", "--max_steps", str(STEPS), "--log_every", "1", "--eval_every", "0",
              "--eval_batches", "2", "--no_progress", "--num_workers", "0", "--grounding_eval", "no",
              "--cpu_threads", "1", "--seed", "5"]
    runs, logs = {}, {}
    for mode in ("none", "default"):
        out = os.path.join(work, f"pretrain_{mode}")
        # the compiled run's row budget has no margin (sigmas 0): many batches mask more objects than it holds
        # and take the exact path (room for every row, eager), between compiled steps
        extra = ["--row_budget_sigmas", "0"] if mode == "default" else []
        proc = _run("lxmert_fast.pretrain", common + ["--compile", mode, "--output_dir", out] + extra)
        assert proc.returncode == 0, f"pre-training --compile {mode} failed:\n{(proc.stdout + proc.stderr)[-5000:]}"
        runs[mode], logs[mode] = out, proc.stdout + proc.stderr
    return work, runs, logs


def test_pretraining_compiled_matches_eager(pretrain_runs):
    """Compiled steps and the exact steps of batches beyond the row budget together give the eager losses."""
    _, runs, logs = pretrain_runs
    losses = {mode: _losses(os.path.join(out, "logs", "pretrain", "Train_loss_total.csv")) for mode, out in runs.items()}
    _assert_same_losses(losses["none"], losses["default"], "pre-training")
    assert losses["none"][STEPS] < losses["none"][1], "the loss should fall"
    beyond = logs["default"].count("beyond the row budget")
    assert 0 < beyond < STEPS, f"{beyond} of {STEPS} batches beyond the row budget: both paths must run"
    assert "beyond the row budget" not in logs["none"]


def test_finetuning_compiled_matches_eager(pretrain_runs):
    work, runs, _ = pretrain_runs
    losses = {}
    for mode in ("none", "default"):
        out = os.path.join(work, f"vqa_{mode}")
        proc = _run("lxmert_fast.finetune", [
            "--task", "vqa", "--load", os.path.join(runs["none"], "hf"), "--cache_dir", os.path.join(work, "cache"),
            "--demo_images", "240", "--batch_size", "16", "--max_steps", str(STEPS), "--log_every", "1",
            "--no_progress", "--cpu_threads", "1", "--seed", "5", "--compile", mode, "--output_dir", out])
        assert proc.returncode == 0, f"fine-tuning --compile {mode} failed:\n{(proc.stdout + proc.stderr)[-5000:]}"
        losses[mode] = _losses(os.path.join(out, "logs", "finetune_vqa", "Train_loss_total.csv"))
    _assert_same_losses(losses["none"], losses["default"], "fine-tuning")


def test_reduce_overhead_without_cuda_is_a_usage_error(tmp_path):
    proc = _run("lxmert_fast.pretrain", ["--compile", "reduce-overhead", "--model", "tiny", "--demo_images", "240",
                                         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"),
                                         "--max_steps", "1", "--no_progress"])
    assert proc.returncode == 2
    assert "reduce-overhead captures CUDA graphs" in proc.stderr
