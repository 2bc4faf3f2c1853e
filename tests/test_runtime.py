"""The shared training runtime as users meet it: fine-tuning resumes exactly, a GPU config runs on a CPU as a
try-out through the deepspeed launcher, an installed (non-editable) copy finds its packaged configs from any
directory, and the grounding check runs on a data root that is not the demo world."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import child_env, free_port
from tests.test_finetune_helpers import demo_pretraining, demo_world, finetune_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra) -> dict:
    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


def _csv(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as fh:
        return {int(r[0]): float(r[1]) for r in csv.reader(fh) if r and r[0] != "step"}


def test_finetuning_resumes_bitwise(tmp_path):
    """VQA from the demo pre-training, 2 epochs; stopped mid-epoch at step 5 and resumed in a fresh process
    state: every step's loss equals the uninterrupted run's, bitwise (CPU, fp32, dropout on), and the epoch
    rows and the best model carry over."""
    world, pre = demo_world(), demo_pretraining()
    common = ["--task", "vqa", "--data_root", world, "--load", os.path.join(pre, "hf"), "--epochs", "2",
              "--batch_size", "64", "--log_every", "1", "--seed", "5", "--save_every", "0"]
    straight = finetune_run(common + ["--output_dir", str(tmp_path / "straight")])
    steps = straight["step"]
    assert steps >= 8, steps
    stopped = finetune_run(common + ["--output_dir", str(tmp_path / "resumed"), "--stop_at_step", "5"])
    assert stopped["step"] == 5 and not stopped["completed"]
    resumed = finetune_run(common + ["--output_dir", str(tmp_path / "resumed"), "--resume"])
    a = _csv(str(tmp_path / "straight" / "logs" / "finetune_vqa" / "Train_loss_total.csv"))
    b = _csv(str(tmp_path / "resumed" / "logs" / "finetune_vqa" / "Train_loss_total.csv"))
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert a[step] == b[step], f"step {step}: {b[step]!r} resumed vs {a[step]!r}"
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"] == straight["history"]
    assert resumed["best"] == straight["best"]
    assert resumed["final"] == straight["final"]


@pytest.mark.slow
def test_a_gpu_config_runs_on_cpu_as_a_try_out_through_the_deepspeed_launcher(tmp_path):
    """`deepspeed --num_gpus 2 lxmert_fast/pretrain.py --deepspeed_config zero2.json` on a machine without
    CUDA: the recipe (batch 256, ZeRO-2, bf16, lr 1e-4) runs, and each change the hardware forces is logged."""
    deepspeed = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert deepspeed, "the deepspeed launcher is installed with deepspeed"
    out = tmp_path / "run"
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "lxmert_fast", "pretrain.py"),
           "--deepspeed_config", "zero2.json", "--model", "tiny", "--demo_images", "240",
           "--cache_dir", str(tmp_path / "cache"), "--micro_batch_size", "32", "--max_steps", "2", "--log_every", "1",
           "--eval_every", "0", "--eval_batches", "1", "--grounding_eval", "no", "--no_export", "--no_progress",
           "--num_workers", "0", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=900,
                          cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "2 process(es)" in log
    assert "DeepSpeed (zero2.json, packaged): batch 256 = micro 32 x accum 4 x world; bf16, ZeRO-2; AdamW lr 0.0001" \
        in log, log[-3000:]
    assert "CPU try-out of a GPU config: optimizer: DeepSpeed's FusedAdam needs CUDA -> torch's AdamW" in log
    assert "CPU try-out of a GPU config: optimizer: torch's fused CPU AdamW" in log
    with open(out / "ds_config.json", encoding="utf-8") as fh:
        cfg = json.load(fh)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] and cfg["train_batch_size"] == 256
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert sorted(_csv(str(out / "logs" / "pretrain" / "Train_loss_total.csv"))) == [1, 2]


def test_a_non_editable_install_finds_its_configs_from_any_directory(tmp_path):
    """`pip install .` (into a target directory here), run from elsewhere: the packaged DeepSpeed configs load."""
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), REPO], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "lxmert_fast" / "ds_configs" / "zero2.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import json, lxmert_fast.train.ds_config as c; print(json.dumps([c.__file__, "
              "c.load_ds_config('zero2.json')['zero_optimization']['stage'], "
              "c.load_ds_config('ds_configs/cpu.json')['zero_optimization']['stage']]))")
    env = child_env()
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(elsewhere))
    assert proc.returncode == 0, proc.stderr
    path, z2, cpu = json.loads(proc.stdout.strip().splitlines()[-1])
    assert path.startswith(str(target)) and (z2, cpu) == (2, 0)


def test_grounding_runs_on_a_data_root_that_is_not_the_demo_world(tmp_path):
    """--grounding_eval yes with --data_root: masked-word accuracy with the true vs the shuffled images over a
    random 15% of the words (the data names no object words: no such measure) and matching accuracy."""
    world = demo_world()
    root = tmp_path / "data"
    root.mkdir()
    for name in os.listdir(world):
        if name != "demo.json":  # what makes it the demo world's
            os.symlink(os.path.join(world, name), root / name)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.pretrain", "--data_root", str(root), "--model", "tiny",
                           "--max_steps", "3", "--micro_batch_size", "16", "--log_every", "1", "--eval_every", "0",
                           "--eval_batches", "1", "--grounding_eval", "yes", "--grounding_batches", "2",
                           "--no_export", "--no_progress", "--num_workers", "0", "--output_dir", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out / "result.json", encoding="utf-8") as fh:
        g = json.load(fh)["grounding"]
    assert g["masked_words_true"] > 0 and 0.0 <= g["masked_acc_true_image"] <= 1.0
    assert 0.0 <= g["masked_acc_shuffled_image"] <= 1.0 and g["matched_pairs"] == 32
    assert "word_acc_true_image" not in g
    assert "grounding: masked words" in proc.stdout


@pytest.mark.parametrize("valid", [""])
def test_grounding_without_held_out_data_is_an_error_not_a_silent_skip(tmp_path, valid):
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.pretrain", "--data_root", demo_world(), "--model",
                           "tiny", "--valid", valid, "--max_steps", "1", "--micro_batch_size", "16", "--grounding_eval",
                           "yes", "--no_export", "--no_progress", "--num_workers", "0", "--output_dir",
                           str(tmp_path / "run")], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "--grounding_eval yes needs held-out data" in proc.stderr


def test_zero3_builds_the_model_in_a_fresh_process(tmp_path):
    """ZeRO-3 builds the model inside deepspeed.zero.Init; nothing the model does at construction (e.g. importing
    torch._dynamo, which fails under zero.Init's patched tensor constructors) may break it in a fresh process."""
    from lxmert_fast.train.ds_config import packaged_config

    with open(packaged_config("cpu.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"]["stage"] = 3
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "lxmert_fast.pretrain", "--data_root", demo_world(), "--model", "tiny",
                           "--max_steps", "1", "--micro_batch_size", "8", "--eval_every", "0", "--eval_batches", "1",
                           "--grounding_eval", "no", "--no_export", "--no_progress", "--num_workers", "0",
                           "--deepspeed_config", str(ds), "--output_dir", str(tmp_path / "run")],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ZeRO-3" in proc.stdout and "step 1/1" in proc.stdout
