"""Resuming on another number of processes (and another ZeRO stage within 1/2).

- The training sampler deals micro-batches from global optimizer steps: the steps' contents and their
  seeds do not depend on the world size, and a position saved at a step boundary continues on another
  world size with every item of the epoch seen exactly once (items past the last whole step aside).
- End to end (CPU, gloo, ZeRO-2, fp32, dropout on): a run of 2 processes stopped at step 3 and resumed
  on 1 (through DeepSpeed's universal checkpoint), and one of 1 stopped and resumed on 2, log the losses
  of an uninterrupted 1-process run, step by step, to within 1e-5 (the same maths reduced in another
  order: all-reduce across ranks vs accumulation in one).
- What cannot be honoured (another total batch; to or from ZeRO-3 or ZeRO-0 with a change) is an error
  before training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lxmert_fast.data.step_sampler import StepSampler
from lxmert_fast.checkpoints.training import RUN_FILE, CheckpointManager, plan_resume, tag_for
from lxmert_fast.train.errors import TrainingError
from tests.helpers import child_env

pytestmark = pytest.mark.slow  # multi-process or CLI runs: out of the quick subset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 6, 3
REL_TOL = 1e-5


# ---------------------------------------------------------------------------------------------- the sampler
def _epoch_items(samplers: list[StepSampler], epoch: int, start_state=None) -> list[np.ndarray]:
    """Every rank's micro-batches of one epoch, in order, from ``start_state`` (a state_dict) if given."""
    out = []
    for s in samplers:
        s.set_epoch(epoch)
        if start_state is not None:
            s.load_state_dict(start_state)
        out.append([r.indices for r in s])
    return out


def test_steps_are_the_same_on_any_world_size_and_a_change_sees_every_item_once():
    n, m = 103, 4                                                          # 103 items, micro-batches of 4
    one = StepSampler(n, m, accumulation=2, world_size=1, seed=7)          # global batch 8
    two = [StepSampler(n, m, accumulation=1, rank=r, world_size=2, seed=7) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == n // 8 == 12 and len(one) == 24 and len(two[0]) == 12
    (single,) = _epoch_items([one], 3)
    r0, r1 = _epoch_items(two, 3)
    for step in range(12):  # step s: micro-batches 2s, 2s+1 on one rank == micro-batch s on rank 0 and rank 1
        assert np.array_equal(single[2 * step], r0[step]) and np.array_equal(single[2 * step + 1], r1[step])
        assert one.seed_of(3, step, 1) == two[1].seed_of(3, step, 1)
    assert len({one.seed_of(3, s, j) for s in range(12) for j in range(2)}) == 24   # every micro-batch its own
    # 2 processes for 5 steps, then 1 process: the epoch's items exactly once (the last 103 % 8 = 7 aside)
    for s in two:
        s.set_epoch(3)
    seen = []
    for rank_sampler in two:
        it = iter(rank_sampler)
        seen += [next(it).indices for _ in range(5)]
    state = two[0].state_dict(position=5)
    assert state["sample"] == 40
    resumed = StepSampler(n, m, accumulation=2, world_size=1, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 3 and resumed.position == 10
    seen += [r.indices for r in resumed]
    items = np.concatenate(seen)
    assert len(items) == len(set(items.tolist())) == 96
    assert set(items.tolist()) == set(one.order(3)[:96].tolist())
    # ... and back to 2 processes from a 1-process position
    for r, s in enumerate(two):
        s.load_state_dict(dict(resumed.state_dict(position=10)))
        assert s.position == 5


def test_positions_inside_a_step_and_other_batches_cannot_change_world_size():
    one = StepSampler(64, 4, accumulation=2, world_size=1, seed=1)
    with pytest.raises(ValueError, match="inside an optimizer step"):
        StepSampler(64, 4, accumulation=1, rank=0, world_size=2, seed=1).load_state_dict(one.state_dict(position=3))
    with pytest.raises(ValueError, match="global_batch=8, this run 16"):
        StepSampler(64, 4, accumulation=2, rank=0, world_size=2, seed=1).load_state_dict(one.state_dict(position=2))


def _fake_tag(directory, world, stage, batch=16):
    mgr = CheckpointManager(str(directory))
    tag = tag_for(3)
    os.makedirs(directory / tag)
    (directory / "latest").write_text(tag)
    (directory / tag / RUN_FILE).write_text(json.dumps({"world_size": world, "zero_stage": stage,
                                                        "train_batch_size": batch}))
    return mgr


def test_what_a_resume_can_change(tmp_path):
    mgr = _fake_tag(tmp_path / "a", world=2, stage=2)
    assert plan_resume(mgr, 2, 2, 16).universal is False                   # the same shape: as written
    plan = plan_resume(mgr, 1, 2, 16)
    assert plan.universal and "universal" in plan.note                     # another world size: universal
    assert plan_resume(mgr, 4, 1, 16).universal                            # and another of ZeRO-1/2
    for world, stage in ((2, 3), (1, 0)):
        with pytest.raises(TrainingError, match="cannot continue on this run"):
            plan_resume(mgr, world, stage, 16)
    with pytest.raises(TrainingError, match="train_batch_size 16, this run has 32"):
        plan_resume(mgr, 1, 2, 32)
    zero0 = _fake_tag(tmp_path / "b", world=2, stage=0)
    assert plan_resume(zero0, 1, 0, 16).universal is False                 # ZeRO-0: every rank has it all


# ---------------------------------------------------------------------------------------------- end to end
def _env() -> dict:
    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "logs", "pretrain", "Train_loss_total.csv"), encoding="utf-8") as fh:
        return {int(r[0]): float(r[1]) for r in csv.reader(fh) if r and r[0] != "step"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("elastic")
    from lxmert_fast.train.ds_config import packaged_config

    with open(packaged_config("cpu.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"]["stage"] = 2
    cfg.update(train_batch_size=16, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps="auto")
    ds = work / "z2.json"
    ds.write_text(json.dumps(cfg))
    common = ["-m", "lxmert_fast.pretrain", "--model", "tiny", "--max_steps", str(STEPS), "--log_every", "1",
              "--no_progress", "--seed", "1", "--demo_images", "240", "--cache_dir", str(work / "cache"),
              "--save_every", "0", "--grounding_eval", "no", "--no_export", "--eval_every", "0", "--eval_batches", "1",
              "--num_workers", "0", "--deepspeed_config", str(ds)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one = [sys.executable]

    def run(launcher, out, *extra):
        proc = subprocess.run(launcher + common + ["--output_dir", str(work / out), *extra], env=_env(),
                              capture_output=True, text=True, timeout=900, cwd=str(work))
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return proc.stdout + proc.stderr

    logs = {"straight": run(one, "straight")}
    run(two, "two_to_one", "--stop_at_step", str(STOP))
    logs["two_to_one"] = run(one, "two_to_one", "--resume")
    run(one, "one_to_two", "--stop_at_step", str(STOP))
    logs["one_to_two"] = run(two, "one_to_two", "--resume")
    return work, logs


@pytest.mark.parametrize("name", ["two_to_one", "one_to_two"])
def test_a_run_continued_on_another_world_size_logs_the_uninterrupted_losses(runs, name):
    work, logs = runs
    straight, changed = _losses(str(work / "straight")), _losses(str(work / name))
    assert sorted(straight) == sorted(changed) == list(range(1, STEPS + 1))
    worst = max(abs(changed[s] - straight[s]) / abs(straight[s]) for s in straight)
    assert worst <= REL_TOL, f"{name}: losses differ from the uninterrupted run's by up to {worst:.2e}"
    assert "loading the universal checkpoint step00000003_universal" in logs[name]
    assert os.path.isfile(work / name / "checkpoints" / "step00000003_universal" / "mp_rank_00_model_states.pt")
