"""`--engine torch`: the DeepSpeed config's recipe in plain PyTorch, for machines without DeepSpeed.

- pre-training with it takes the same steps as DeepSpeed's engine (CPU, fp32, no ZeRO: the same losses and
  gradient norms) and resumes bitwise from its own checkpoints, which load with weights_only=True;
- its schedule is DeepSpeed's WarmupLR / WarmupDecayLR, step for step;
- bf16 runs the module in bf16 with fp32 master weights;
- what it cannot run (several processes, ZeRO-3, fp16, DeepSpeed's monitors) is refused with the reason.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from lxmert_fast import pretrain
from lxmert_fast.train.ds_config import packaged_config
from lxmert_fast.train.torch_engine import STATES_FILE, TorchEngine, TorchEngineError, WarmupSchedule, \
    unsupported_reasons
from tests.test_finetune_helpers import demo_world, one_thread


def _config(tmp_path, **changes) -> str:
    with open(packaged_config("cpu.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["optimizer"]["params"]["lr"] = 3e-3
    cfg.update(changes)
    path = tmp_path / f"ds_{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _pretrain(out, config: str, *extra: str) -> dict:
    with one_thread():
        return pretrain.run(["--data_root", demo_world(), "--model", "tiny", "--micro_batch_size", "8",
                             "--max_steps", "6", "--log_every", "1", "--eval_every", "0", "--no_progress",
                             "--num_workers", "0", "--grounding_eval", "no", "--no_export", "--seed", "11",
                             "--deepspeed_config", config, "--output_dir", str(out), *extra])


def test_the_torch_engine_takes_deepspeeds_steps_and_resumes_bitwise(tmp_path):
    config = _config(tmp_path)
    ds = _pretrain(tmp_path / "ds", config, "--engine", "deepspeed")
    plain = _pretrain(tmp_path / "plain", config, "--engine", "torch")
    assert [r["step"] for r in plain["log"]] == list(range(1, 7))
    for a, b in zip(ds["log"], plain["log"]):
        assert b["loss_total"] == pytest.approx(a["loss_total"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), (a, b)
    stopped = _pretrain(tmp_path / "resumed", config, "--engine", "torch", "--save_every", "3", "--stop_at_step", "3")
    assert not stopped["completed"]
    states = tmp_path / "resumed" / "checkpoints" / "step00000003" / STATES_FILE
    torch.load(states, weights_only=True)  # model, optimizer, scheduler and the client state (RNGs included)
    resumed = _pretrain(tmp_path / "resumed", config, "--engine", "torch", "--save_every", "3", "--resume")
    assert [r["loss_total"] for r in stopped["log"] + resumed["log"]] == [r["loss_total"] for r in plain["log"]]
    with pytest.raises(Exception, match="written by the torch engine; this run uses --engine deepspeed"):
        _pretrain(tmp_path / "resumed", config, "--engine", "deepspeed", "--resume")


def test_the_torch_engine_writes_deepspeeds_csv_monitor_layout(tmp_path):
    config = _config(tmp_path, csv_monitor={"enabled": True, "output_path": "auto", "job_name": "pretrain"},
                     tensorboard={"enabled": False})
    _pretrain(tmp_path / "run", config, "--engine", "torch", "--max_steps", "2")
    rows = (tmp_path / "run" / "logs" / "pretrain" / "Train_loss_total.csv").read_text().splitlines()
    assert rows[0] == "step,total" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


@pytest.mark.parametrize("kind,warmup_type", [("WarmupDecayLR", "linear"), ("WarmupDecayLR", "log"),
                                              ("WarmupLR", "linear")])
def test_the_schedule_is_deepspeeds(kind, warmup_type):
    from deepspeed.runtime import lr_schedules

    params = {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 7, "warmup_type": warmup_type}
    if kind == "WarmupDecayLR":
        params["total_num_steps"] = 20
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours, ref = WarmupSchedule(ours_opt, kind, params), getattr(lr_schedules, kind)(ref_opt, **params)
    for step in range(25):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-15), step
        ours.step()
        ref.step()


def test_bf16_runs_the_module_in_bf16_with_fp32_masters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}}
    engine = TorchEngine(model, cfg)
    x = torch.randn(4, 8)
    for _ in range(4):  # two optimizer steps of two micro-batches
        engine.backward(engine(x.bfloat16()).float().pow(2).mean())
        engine.step()
    assert engine.global_steps == 2
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    assert all(m.dtype == torch.float32 for m in engine.masters)
    for p, m in zip(engine.params, engine.masters):
        assert torch.equal(p, m.to(torch.bfloat16))  # the module holds the masters, rounded
    assert engine.get_global_grad_norm() > 0
    weights = engine.fp32_state_dict()
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_what_the_torch_engine_refuses_is_named():
    cfg = {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}, "wandb": {"enabled": True},
           "scheduler": {"type": "OneCycle"}}
    reasons = " | ".join(unsupported_reasons(cfg, world_size=2))
    for why in ("2 processes", "ZeRO-3", "fp16", "the wandb monitor", "scheduler 'OneCycle'"):
        assert why in reasons, reasons
    with pytest.raises(TorchEngineError, match="ZeRO-3"):
        TorchEngine(torch.nn.Linear(2, 2), {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1,
                                            "gradient_accumulation_steps": 1})


def test_a_config_the_torch_engine_cannot_run_is_a_usage_error(tmp_path, capsys):
    config = _config(tmp_path, zero_optimization={"stage": 3})
    with one_thread():
        code = pretrain.main(["--data_root", demo_world(), "--model", "tiny", "--micro_batch_size", "8",
                              "--engine", "torch", "--deepspeed_config", config, "--output_dir", str(tmp_path / "o"),
                              "--no_progress", "--num_workers", "0"])
    assert code == 2
    assert "--engine torch cannot run" in capsys.readouterr().err


def test_every_runtime_flag_parses_without_deepspeed_imported():
    """The job's parser defines --deepspeed_config itself: building it imports no DeepSpeed."""
    import subprocess
    import sys

    code = ("import sys; from lxmert_fast import pretrain; pretrain.build_parser(); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120).returncode == 0
