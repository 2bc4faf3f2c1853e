"""DeepSpeed plumbing without processes: config resolution, packaged configs, the CPU try-out of GPU configs,
parameter groups, checkpoint bookkeeping."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.checkpoints import training as checkpoint
from lxmert_fast.train import ds_config, rng

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CONFIGS = ("zero1.json", "zero2.json", "zero3.json", "zero2_fp16.json", "zero2_offload.json")


def test_batch_resolution():
    assert ds_config.resolve_batch_size({"train_batch_size": 256}, 8) == (256, 32, 1)
    assert ds_config.resolve_batch_size({"train_batch_size": 256, "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": "auto"}, 2, micro_batch_size=32) == (256, 32, 4)
    assert ds_config.resolve_batch_size({"train_batch_size": 256, "gradient_accumulation_steps": 2}, 4) == (256, 32, 2)
    assert ds_config.resolve_batch_size({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": 1}, 2, micro_batch_size=8) == (16, 8, 1)
    assert ds_config.resolve_batch_size({}, 1) == (32, 32, 1)


def test_batch_that_does_not_fit_the_world_names_the_numbers():
    with pytest.raises(ds_config.DSConfigError) as err:
        ds_config.resolve_batch_size({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32,
                              "gradient_accumulation_steps": 1}, 3)
    assert "train_batch_size (256)" in str(err.value)
    assert "train_micro_batch_size_per_gpu (32)" in str(err.value)
    assert "gradient_accumulation_steps (1)" in str(err.value)
    assert "world size (3)" in str(err.value)
    with pytest.raises(ds_config.DSConfigError, match="world size 3"):
        ds_config.resolve_batch_size({"train_batch_size": 256}, 3)
    with pytest.raises(ds_config.DSConfigError, match="positive integer"):
        ds_config.resolve_batch_size({"train_batch_size": 0}, 1)


def _load(name: str) -> dict:
    with open(ds_config.packaged_config(name), encoding="utf-8") as fh:
        return json.load(fh)


def test_packaged_configs_are_found_from_anywhere(tmp_path, monkeypatch):
    """By file name or by the checkout's path, from any working directory; a wrong name lists what ships."""
    monkeypatch.chdir(tmp_path)
    assert ds_config.resolve_config_path("zero2.json") == ds_config.packaged_config("zero2.json")
    assert ds_config.resolve_config_path("ds_configs/zero2.json") == ds_config.packaged_config("zero2.json")
    assert ds_config.load_ds_config("cpu.json")["zero_optimization"]["stage"] == 0
    own = tmp_path / "zero2.json"
    own.write_text(json.dumps({"train_batch_size": 8}))
    assert ds_config.load_ds_config("zero2.json") == {"train_batch_size": 8}  # a file of that name here wins
    with pytest.raises(ds_config.DSConfigError, match="no packaged config of that name.*zero2_offload.json"):
        ds_config.load_ds_config("zero9.json")


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_hold_the_recipe(name):
    cfg = _load(name)
    assert cfg["train_batch_size"] == 256
    assert cfg["gradient_clipping"] == 1.0
    opt = cfg["optimizer"]
    assert opt["type"] == "AdamW"
    assert opt["params"] == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupDecayLR"
    assert sched["params"]["warmup_type"] == "linear"
    assert sched["params"]["warmup_min_lr"] == 0.0
    expected = {"zero1.json": ("bf16", 1), "zero2.json": ("bf16", 2), "zero3.json": ("bf16", 3),
                "zero2_fp16.json": ("fp16", 2), "zero2_offload.json": ("bf16", 2)}[name]
    assert (ds_config.precision_of(cfg), ds_config.zero_stage_of(cfg)) == expected
    if name == "zero2_fp16.json":
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic
    if name == "zero2_offload.json":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_all_configs_are_valid_deepspeed_configs():
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in GPU_CONFIGS + ("cpu.json",):
        raw = _load(name)
        if not torch.cuda.is_available():
            raw, _ = ds_config.fit_to_cpu(raw)
        for world in (1, 2, 8):
            cfg = ds_config.prepare_ds_config(raw, world_size=world, total_steps=1000, output_dir="/tmp/x", micro_batch_size=16)
            assert not ds_config._find_auto(cfg)
            sched = cfg["scheduler"]["params"]
            assert sched["total_num_steps"] == 1000 and sched["warmup_num_steps"] == 50
            assert sched["warmup_max_lr"] == cfg["optimizer"]["params"]["lr"]
            assert cfg["tensorboard"]["output_path"] == os.path.join("/tmp/x", "logs")
            parsed = DeepSpeedConfig(cfg, mpu=None) if world == 1 else None
            if parsed is not None:
                assert parsed.train_batch_size == cfg["train_batch_size"]


def test_gpu_configs_run_on_cpu_as_a_try_out_with_each_change_named():
    """Only what cannot run without CUDA changes (the fused optimizer, fp16's loss scaling), one line each;
    the recipe (batch, lr, schedule, clipping, ZeRO) stays."""
    z2 = _load("zero2.json")
    cpu, changes = ds_config.fit_to_cpu(z2)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["optimizer"]["params"]["fused"] is True
    assert len(changes) == 2 and "FusedAdam needs CUDA" in changes[0] and "fused CPU AdamW" in changes[1]
    for key in ("train_batch_size", "gradient_clipping", "scheduler", "zero_optimization", "bf16"):
        assert cpu[key] == z2[key], key
    assert {k: v for k, v in cpu["optimizer"]["params"].items() if k not in ("torch_adam", "fused")} == \
        z2["optimizer"]["params"]
    fp16, changes = ds_config.fit_to_cpu(_load("zero2_fp16.json"))
    assert ds_config.precision_of(fp16) == "bf16" and any("fp16 with loss scaling needs CUDA -> bf16" in c for c in changes)
    offload, changes = ds_config.fit_to_cpu(_load("zero2_offload.json"))
    assert changes == [] and "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeed's CPU Adam runs here
    same, changes = ds_config.fit_to_cpu(_load("cpu.json"))
    assert changes == [] and same == _load("cpu.json")


def test_flags_fill_auto_entries_and_may_not_contradict_fixed_ones():
    cfg = {"train_batch_size": 32, "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    values = {"--lr": ("optimizer.params.lr", 5e-5), "--grad_clip": ("gradient_clipping", 5.0),
              "--batch_size": ("train_batch_size", 32)}
    with pytest.raises(ds_config.DSConfigError, match="--lr 5e-05 contradicts the DeepSpeed config's optimizer.params.lr"):
        ds_config.fill_from_flags(cfg, values, explicit={"--lr"})
    kept = ds_config.fill_from_flags(cfg, values, explicit=set())  # defaults, not flags: the config's values stay
    assert (kept["optimizer"]["params"]["lr"], kept["gradient_clipping"]) == (1e-4, 1.0)
    filled = ds_config.fill_from_flags({"optimizer": {"params": {"lr": "auto"}}, "gradient_clipping": "auto"}, values, set())
    assert (filled["optimizer"]["params"]["lr"], filled["gradient_clipping"], filled["train_batch_size"]) == \
        (5e-5, 5.0, 32)


def test_no_weight_decay_on_biases_and_layernorm():
    model = LxmertForPreTraining(LxmertConfig.preset("tiny"))
    groups = ds_config.param_groups(model)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "weight_decay" not in groups[0]  # the config's weight decay applies
    assert groups[1]["weight_decay"] == 0.0
    names = set(ds_config.no_decay_names(model))
    all_names = {n for n, _ in model.named_parameters()}
    for name in all_names:
        is_ln = "LayerNorm" in name or "layer_norm" in name or name.startswith("answer_head.logit_fc.2.")
        assert (name in names) == (name.endswith("bias") or is_ln), name
    assert "answer_head.logit_fc.2.weight" in names  # the QA head's LayerNorm, by module type
    assert "lxmert.embeddings.word_embeddings.weight" not in names
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = rng.rng_state({"mask": gen})
    a = (torch.rand(3), torch.rand(2, generator=gen))
    rng.set_rng_state(state, {"mask": gen})
    b = (torch.rand(3), torch.rand(2, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_pruning_keeps_the_last_k(tmp_path):
    mgr = checkpoint.CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3, 10):
        os.makedirs(tmp_path / checkpoint.tag_for(step))
    (tmp_path / "latest").write_text(checkpoint.tag_for(10))
    mgr._prune(checkpoint.tag_for(10))
    assert mgr.tags() == [checkpoint.tag_for(3), checkpoint.tag_for(10)]
    assert mgr.latest_tag() == checkpoint.tag_for(10)


_SAME_STEPS_SCRIPT = r"""
import copy, json, sys
import torch
from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast.train import ds_config
from lxmert_fast.checkpoints.export import full_fp32_state_dict
from lxmert_fast.train.process import start_process

start_process()
torch.set_num_threads(1)
config = LxmertConfig.preset("tiny")
base = ds_config.load_ds_config("cpu.json")
for section in ("tensorboard", "csv_monitor"):
    base[section]["enabled"] = False
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
base.update(train_batch_size=4 * world, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)

def run(stage, **opt):
    cfg = copy.deepcopy(base)
    cfg["zero_optimization"]["stage"] = stage
    params = cfg["optimizer"]["params"]
    params.pop("fused", None)
    params.update(opt)
    cfg, _ = ds_config.fit_to_cpu(cfg)
    cfg = ds_config.prepare_ds_config(cfg, world_size=world, total_steps=10, output_dir=sys.argv[1])
    torch.manual_seed(0)
    model = LxmertForPreTraining(config)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    engine = ds_config.initialize(model, cfg)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    kind = "fused" if inner.defaults.get("fused") else ("foreach" if inner.defaults.get("foreach") else "loop")
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data: the reduction matters
    for _ in range(3 * 2):
        b = 2
        ids = torch.randint(5, config.vocab_size, (b, 8), generator=gen)
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                     visual_feats=torch.randn(b, 5, config.visual_feat_dim, generator=gen),
                     visual_pos=torch.rand(b, 5, config.visual_pos_dim, generator=gen),
                     labels=ids.masked_fill(torch.rand(b, 8, generator=gen) > 0.3, -100),
                     matched_label=torch.randint(0, 2, (b,), generator=gen))
        engine.backward(out.loss)
        engine.step()
    state = full_fp32_state_dict(engine)
    engine.destroy()
    return kind, state

stage_new = base["zero_optimization"]["stage"]
kind_new, new = run(stage_new)            # cpu.json: no ZeRO (stage 0), fused filled in by fit_to_cpu
kind_z1, z1 = run(1)                      # cpu.json of 7d87844: ZeRO-1, fused AdamW
kind_old, old = run(2, fused=False)       # the cpu.json before: ZeRO-2, torch's per-tensor loop
if rank == 0:
    diff = lambda a, b: max((a[k].double() - b[k].double()).abs().max().item() for k in a)  # noqa: E731
    torch.manual_seed(0)
    init = LxmertForPreTraining(config).state_dict()
    weights = [k for k in new if k.endswith(".weight")]
    moved = sum((new[k] - init[k]).abs().max().item() > 1e-4 for k in weights) / len(weights)
    print(json.dumps({"world": world, "stage": stage_new, "new": kind_new, "z1": kind_z1, "old": kind_old,
                      "max_abs_diff": diff(new, old), "max_abs_diff_z1": diff(new, z1), "weights_moved": moved}))
if torch.distributed.is_initialized():  # the ranks leave together: a rank that exits while its peer still works
    torch.distributed.barrier()         # can abort in the process group's teardown ("terminate called without an
    torch.distributed.destroy_process_group()  # active exception", seen once in a parallel suite)
"""


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_cpu_config_steps_like_zero1_and_zero2(tmp_path, world):
    """cpu.json (no ZeRO, torch's fused AdamW) takes the same optimizer steps, gradient accumulation and
    clipping included, as ZeRO-1 with fused AdamW and ZeRO-2 with torch's per-tensor AdamW loop (the configs
    it replaced for speed); in one process (where the engine skips its identity all-reduce) and in two
    (gloo, each rank its own data: the gradients are averaged across ranks)."""
    import subprocess
    import sys

    from tests.helpers import child_env

    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["DS_ACCELERATOR"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    if world == 1:  # CPU even on a GPU machine: CUDA is hidden from the subprocess
        cmd = [sys.executable, "-c", _SAME_STEPS_SCRIPT, str(tmp_path)]
    else:
        script = tmp_path / "same_steps.py"
        script.write_text(_SAME_STEPS_SCRIPT, encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads([ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")][-1])
    assert res["world"] == world and res["stage"] == 0, res
    assert (res["new"], res["z1"], res["old"]) == ("fused", "fused", "loop"), res
    assert res["weights_moved"] > 0.5, res  # the steps were taken (heads without labels get no gradient)
    assert res["max_abs_diff"] < 1e-5 and res["max_abs_diff_z1"] < 1e-5, res
