"""Monitors (Weights & Biases, Comet), DeepSpeed's FLOPs profiler and --activation_checkpointing through the CLI.

The config side (no engine): each monitor section's "auto" entries are filled as DeepSpeed's schema for that
section has them (a key DeepSpeed would reject is an error naming it), the packaged example
`zero2_wandb.json` is a valid DeepSpeed config once filled, and --flops_profile_step fills the
`flops_profiler` section (1-based steps as the log counts; DeepSpeed's profile_step counts from 0).

End to end: one pre-training run on the demo world (tiny model, cpu.json, fp32, dropout on, 3 steps) with
the W&B monitor offline (WANDB_MODE=offline, no network, no account), the Comet monitor offline
(`"online": false`, no account), --activation_checkpointing and --flops_profile_step 2, beside the same run
plain. Checked: the W&B run directory lands under <output_dir>/logs/wandb and its history holds every
logged step's losses (W&B drops a step smaller than one it has seen: DeepSpeed's own events count samples,
the trainer's count steps), the Comet archive holds the losses, the profiler's forward multiply-adds per
sample are within 10% of flops.py's (training FLOPs / 6: both count matrix products of the forward; the
profiler's count is larger by the static row budget's padding rows), and the losses with activation
checkpointing are the plain run's (1e-6 relative).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest

from lxmert_fast.train import ds_config
from tests.helpers import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


# ---------------------------------------------------------------------------------------------- the config
def _prepare(cfg: dict, **kwargs) -> dict:
    return ds_config.prepare_ds_config(cfg, world_size=1, total_steps=100, output_dir="/runs/x", micro_batch_size=8,
                                       job_name="pretrain", **kwargs)


def test_monitor_sections_are_filled_as_deepspeed_takes_them():
    from deepspeed.runtime.config import DeepSpeedConfig

    raw, _ = ds_config.fit_to_cpu(ds_config.load_ds_config("zero2_wandb.json"))
    cfg = _prepare(raw)
    assert cfg["wandb"] == {"enabled": True, "project": "lxmert-fast", "group": "pretrain", "team": None}
    assert cfg["comet"]["experiment_name"] == "pretrain" and cfg["comet"]["samples_log_interval"] == 1
    assert cfg["comet"]["project"] == "lxmert-fast" and cfg["comet"]["online"] is False
    assert cfg["tensorboard"]["output_path"] == cfg["csv_monitor"]["output_path"] == "/runs/x/logs"
    parsed = DeepSpeedConfig(cfg, mpu=None)
    assert parsed.monitor_config.wandb.enabled and parsed.monitor_config.wandb.group == "pretrain"


@pytest.mark.parametrize("section, key, message", [
    ("wandb", "output_path", r"wandb\.output_path: DeepSpeed's wandb section has no such key \(it takes enabled, "
                             r"group, team, project\); the run directory is \$WANDB_DIR"),
    ("wandb", "job_name", r"wandb\.job_name"),
    ("comet", "output_path", r"comet\.output_path.*COMET_OFFLINE_DIRECTORY"),
])
def test_a_key_deepspeed_would_reject_is_named(section, key, message):
    raw = ds_config.load_ds_config("cpu.json")
    raw[section] = {"enabled": True, key: "auto"}
    with pytest.raises(ds_config.DSConfigError, match=message):
        _prepare(raw)


def test_an_auto_nothing_fills_is_an_error():
    raw = ds_config.load_ds_config("cpu.json")
    raw["wandb"] = {"enabled": True, "team": "auto"}
    with pytest.raises(ds_config.DSConfigError, match=r"wandb\.team = \"auto\": nothing fills it"):
        _prepare(raw)


def test_flops_profile_step_fills_the_profiler_section():
    raw = ds_config.load_ds_config("cpu.json")
    sec = _prepare(raw, flops_profile_step=3, activation_checkpointing=True)["flops_profiler"]
    assert sec == {"enabled": True, "profile_step": 2, "output_file": "/runs/x/logs/flops_profile.txt",
                   "recompute_fwd_factor": 1.0}
    assert "flops_profiler" not in _prepare(raw)
    own = dict(raw, flops_profiler={"enabled": True, "profile_step": 4, "output_file": "auto", "detailed": False})
    assert _prepare(own)["flops_profiler"]["output_file"] == "/runs/x/logs/flops_profile.txt"
    assert _prepare(own, flops_profile_step=5)["flops_profiler"]["profile_step"] == 4
    with pytest.raises(ds_config.DSConfigError, match=r"--flops_profile_step 3 contradicts.*profile_step = 4"):
        _prepare(own, flops_profile_step=3)
    with pytest.raises(ds_config.DSConfigError, match=r"--flops_profile_step 0: expected an optimizer step >= 1"):
        _prepare(raw, flops_profile_step=0)


# ---------------------------------------------------------------------------------------------- end to end
def _env() -> dict:
    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    for key in ("WANDB_DIR", "COMET_OFFLINE_DIRECTORY", "WANDB_API_KEY", "COMET_API_KEY"):
        env.pop(key, None)  # the defaults under <output_dir>/logs; no account
    env["WANDB_MODE"] = "offline"
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("monitors"))
    cfg = ds_config.load_ds_config("cpu.json")
    cfg["wandb"] = {"enabled": True, "project": "auto", "group": "auto"}
    cfg["comet"] = {"enabled": True, "project": "auto", "experiment_name": "auto", "samples_log_interval": "auto",
                    "online": False}
    observed_cfg = os.path.join(work, "cpu_wandb_comet.json")
    with open(observed_cfg, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    common = ["--cache_dir", os.path.join(work, "cache"), "--demo_images", "240", "--model", "tiny",
              "--micro_batch_size", "8", "--max_steps", str(STEPS), "--log_every", "1", "--eval_every", "0",
              "--eval_batches", "1", "--no_progress", "--num_workers", "0", "--grounding_eval", "no", "--no_export",
              "--cpu_threads", "1", "--seed", "7"]
    variants = {
        "plain": [],
        "observed": ["--deepspeed_config", observed_cfg, "--activation_checkpointing", "--flops_profile_step", "2"],
    }
    out = {}
    for name, extra in variants.items():
        out_dir = os.path.join(work, name)
        proc = subprocess.run([sys.executable, "-m", "lxmert_fast.pretrain", *common, "--output_dir", out_dir, *extra],
                              env=_env(), capture_output=True, text=True, timeout=600, cwd=work)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} run failed:\n{log[-5000:]}"
        with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as fh:
            out[name] = {"dir": out_dir, "log": log, "result": json.load(fh)}
    out["work"] = work
    return out


def _csv_losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "logs", "pretrain", "Train_loss_total.csv"), encoding="utf-8") as fh:
        return {int(row[0]): float(row[1]) for row in csv.reader(fh) if row and row[0] != "step"}


@pytest.mark.slow
def test_activation_checkpointing_through_the_cli_gives_the_plain_runs_losses(runs):
    assert "activation checkpointing (every encoder layer recomputed in backward)" in runs["observed"]["log"]
    plain, observed = _csv_losses(runs["plain"]["dir"]), _csv_losses(runs["observed"]["dir"])
    assert sorted(plain) == sorted(observed) == list(range(1, STEPS + 1))
    for step, loss in plain.items():
        assert abs(observed[step] - loss) <= 1e-6 * abs(loss), (step, observed[step], loss)


def _wandb_records(path: str) -> list:
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, records of
    crc32 (4) + length (2, little-endian) + kind (1: full, 2: first, 3: middle, 4: last)), each a protobuf."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles a block: the rest is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_writes_its_run_directory_with_every_logged_step(runs):
    run_dir = runs["observed"]["dir"]
    found = glob.glob(os.path.join(run_dir, "logs", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(found) == 1, f"expected one offline W&B run under {run_dir}/logs/wandb: {found}"
    rows = []
    for record in _wandb_records(found[0]):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    ours = {row["step"]: row for row in rows if "Train/loss/total" in row}
    csv_losses = _csv_losses(run_dir)
    assert sorted(ours) == list(range(1, STEPS + 1)), f"W&B history steps {sorted(ours)}"
    for step, row in ours.items():
        assert row["Train/loss/total"] == pytest.approx(csv_losses[step], rel=1e-6)
        assert {"Train/lr", "Train/samples_per_s", "Train/loss/mlm"} <= set(row)
    deepspeed_rows = [row for row in rows if "Train/Samples/lr" in row]
    assert [row["samples"] for row in deepspeed_rows] == [8 * s for s in range(1, STEPS + 1)]
    assert "W&B monitor: project lxmert-fast, mode offline" in runs["observed"]["log"]


def test_comet_offline_archive_holds_the_losses(runs):
    archives = glob.glob(os.path.join(runs["observed"]["dir"], "logs", "comet", "*.zip"))
    assert len(archives) == 1, archives
    with zipfile.ZipFile(archives[0]) as zf:
        experiment = json.loads(zf.read("experiment.json"))
        messages = [json.loads(line) for line in zf.read("messages.json").decode().splitlines() if line.strip()]
    assert experiment["project_name"] == "lxmert-fast"
    metrics = [m["payload"]["metric"] for m in messages if m.get("type") == "metric_msg"]
    losses = {int(m["step"]): float(m["metricValue"]) for m in metrics if m["metricName"] == "Train/loss/total"}
    csv_losses = _csv_losses(runs["observed"]["dir"])
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    for step, value in losses.items():
        assert value == pytest.approx(csv_losses[step], rel=1e-6)
    assert not os.path.exists(os.path.join(runs["work"], ".cometml-runs")), "Comet wrote outside the output dir"


def test_flops_profiler_counts_within_ten_percent_of_flops_py(runs):
    """What is compared: DeepSpeed's forward multiply-adds per sample (the torch functions it patches, over rank
    0's micro-batch of 8 at step 2) against flops.py's training FLOPs per sample / 6 (its forward multiply-adds
    at the expected masked rows). The profiler sees the row budget's padding rows too, so it counts a little
    more; within 10%."""
    prof = runs["observed"]["result"]["flops_profile"]
    assert prof["step"] == 2 and prof["micro_batch_size"] == 8
    assert prof["flops_py_forward_macs_per_sample"] == pytest.approx(prof["flops_py_train_flops_per_sample"] / 6)
    ratio = prof["deepspeed_forward_macs_per_sample"] / prof["flops_py_forward_macs_per_sample"]
    assert ratio == pytest.approx(prof["ratio"])
    assert 0.9 <= ratio <= 1.1, f"DeepSpeed counts {ratio:.3f} x flops.py's forward multiply-adds"
    assert "FLOPs profiler (DeepSpeed), step 2: forward" in runs["observed"]["log"]
    with open(prof["output_file"], encoding="utf-8") as fh:
        table = fh.read()
    # DeepSpeed profiles the forward at its 0-based profile_step 1 and prints the summary after that step: step 2
    assert "DeepSpeed Flops Profiler" in table and "Profile Summary at step 2:" in table
    assert "flops_profile" not in runs["plain"]["result"]
