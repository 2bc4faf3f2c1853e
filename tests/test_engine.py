"""DeepSpeed plumbing without processes: config resolution, shipped configs, parameter groups, checkpoint bookkeeping."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lxmert_fast import LxmertConfig, LxmertForPreTraining
from lxmert_fast import engine as E

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CONFIGS = ("zero1.json", "zero2.json", "zero3.json", "zero2_fp16.json", "zero2_offload.json")


def test_batch_resolution():
    assert E.resolve_batch_size({"train_batch_size": 256}, 8) == (256, 32, 1)
    assert E.resolve_batch_size({"train_batch_size": 256, "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": "auto"}, 2, micro_batch_size=32) == (256, 32, 4)
    assert E.resolve_batch_size({"train_batch_size": 256, "gradient_accumulation_steps": 2}, 4) == (256, 32, 2)
    assert E.resolve_batch_size({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": 1}, 2, micro_batch_size=8) == (16, 8, 1)
    assert E.resolve_batch_size({}, 1) == (32, 32, 1)


def test_batch_that_does_not_fit_the_world_names_the_numbers():
    with pytest.raises(E.DSConfigError) as err:
        E.resolve_batch_size({"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32,
                              "gradient_accumulation_steps": 1}, 3)
    assert "train_batch_size (256)" in str(err.value)
    assert "train_micro_batch_size_per_gpu (32)" in str(err.value)
    assert "gradient_accumulation_steps (1)" in str(err.value)
    assert "world size (3)" in str(err.value)
    with pytest.raises(E.DSConfigError, match="world size 3"):
        E.resolve_batch_size({"train_batch_size": 256}, 3)
    with pytest.raises(E.DSConfigError, match="positive integer"):
        E.resolve_batch_size({"train_batch_size": 0}, 1)


def _load(name: str) -> dict:
    with open(os.path.join(REPO, "ds_configs", name), encoding="utf-8") as fh:
        return json.load(fh)


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
    assert (E.precision_of(cfg), E.zero_stage_of(cfg)) == expected
    if name == "zero2_fp16.json":
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic
    if name == "zero2_offload.json":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_all_configs_are_valid_deepspeed_configs():
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in GPU_CONFIGS + ("cpu.json",):
        raw = _load(name)
        if not torch.cuda.is_available() and name != "cpu.json":
            raw.setdefault("optimizer", {}).setdefault("params", {})["torch_adam"] = True
            raw.pop("fp16", None)
            raw.get("zero_optimization", {}).pop("offload_optimizer", None)
        for world in (1, 2, 8):
            cfg = E.prepare_ds_config(raw, world_size=world, total_steps=1000, output_dir="/tmp/x", micro_batch_size=16)
            assert not E._find_auto(cfg)
            sched = cfg["scheduler"]["params"]
            assert sched["total_num_steps"] == 1000 and sched["warmup_num_steps"] == 50
            assert sched["warmup_max_lr"] == cfg["optimizer"]["params"]["lr"]
            assert cfg["tensorboard"]["output_path"] == os.path.join("/tmp/x", "logs")
            parsed = DeepSpeedConfig(cfg, mpu=None) if world == 1 else None
            if parsed is not None:
                assert parsed.train_batch_size == cfg["train_batch_size"]


def test_cpu_config_refuses_fused_adam_and_fp16_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only checks apply without a GPU")
    with pytest.raises(E.DSConfigError, match="torch_adam"):
        E.prepare_ds_config(_load("zero2.json"), world_size=8, total_steps=10, output_dir="/tmp/x")


def test_no_weight_decay_on_biases_and_layernorm():
    model = LxmertForPreTraining(LxmertConfig.preset("tiny"))
    groups = E.param_groups(model)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "weight_decay" not in groups[0]  # the config's weight decay applies
    assert groups[1]["weight_decay"] == 0.0
    names = set(E.no_decay_names(model))
    all_names = {n for n, _ in model.named_parameters()}
    for name in all_names:
        is_ln = "LayerNorm" in name or "layer_norm" in name or name.startswith("answer_head.logit_fc.2.")
        assert (name in names) == (name.endswith("bias") or is_ln), name
    assert "answer_head.logit_fc.2.weight" in names  # the QA head's LayerNorm, by module type
    assert "lxmert.embeddings.word_embeddings.weight" not in names
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = E.rng_state({"mask": gen})
    a = (torch.rand(3), torch.rand(2, generator=gen))
    E.set_rng_state(state, {"mask": gen})
    b = (torch.rand(3), torch.rand(2, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checkpoint_pruning_keeps_the_last_k(tmp_path):
    mgr = E.CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3, 10):
        os.makedirs(tmp_path / E.tag_for(step))
    (tmp_path / "latest").write_text(E.tag_for(10))
    mgr._prune(E.tag_for(10))
    assert mgr.tags() == [E.tag_for(3), E.tag_for(10)]
    assert mgr.latest_tag() == E.tag_for(10)
