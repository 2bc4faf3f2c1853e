"""Training that survives the cluster: preemption, a damaged checkpoint, a full disk, another world size.

- SIGTERM / SIGUSR1: every rank finishes the optimizer step in progress, they agree on the step, a checkpoint
  is written there and the job exits with 75 (EX_TEMPFAIL); ``--resume`` continues bitwise (CPU, fp32,
  dropout on). One process (a signal from outside, DeepSpeed's engine), two processes (the deepspeed
  launcher; the signal to one rank only, then to both and twice to one), fine-tuning (in-process).
  A repeat of the signal within 2 s is the same notice; a later one ends the process at once.
- Every tag carries a manifest written last; a resume takes the newest tag that verifies: a truncated, an
  empty or a missing file in the newest tag is reported by name and the tag before it is taken; no tag
  complete: a clear error (exit 3), no traceback. Tags of earlier versions (no manifest) are trusted where
  their zip archives' CRC-32s hold.
- A save failing with ENOSPC leaves the earlier tags and ``latest``, removes its partial tag, stops (exit 3)
  with a message naming the path and the cause (both engines).
- Two processes with the packaged cpu.json ("auto" batch entries), stopped, resumed on one: the checkpoint's
  micro-batch is kept and the accumulation doubled; the run finishes the epoch with every sample seen once
  and the uninterrupted run's losses (to 1e-5: an all-reduce over ranks against accumulation in one).

This file is also the worker of the multi-process runs (``deepspeed --num_gpus 2 tests/test_preemption.py
<pretrain args>``): ``LXMERT_TEST_SPY`` records each micro-batch's items, ``LXMERT_TEST_SIGNALS``
("rank:step[:times],...") makes a rank send itself SIGTERM during a step's first micro-batch.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # the launchers' worker
    sys.path.insert(0, REPO)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import free_port  # noqa: E402

DEMO_IMAGES = 240


# ---------------------------------------------------------------------------------------------- worker side
def install_spy(spy_dir: str, signals: str, run_name: str) -> None:
    """Wrap the pre-training recipe's forward: record every micro-batch's items (rank, step, item indices) and
    send SIGTERM to this process during the first micro-batch of the steps ``signals`` names for its rank."""
    from lxmert_fast.pretrain import PretrainRecipe

    plan: dict[tuple[int, int], int] = {}
    for part in filter(None, signals.split(",")):
        rank, step, *times = (int(x) for x in part.split(":"))
        plan[(rank, step)] = times[0] if times else 1
    original = PretrainRecipe.micro_step

    def micro_step(self, trainer, raw):
        step = trainer.engine.global_steps + 1
        if spy_dir:
            with open(os.path.join(spy_dir, f"{run_name}.rank{trainer.rank}.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "items": raw["item_index"].tolist()}) + "\n")
        times = plan.pop((trainer.rank, step), 0)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, trainer, raw)

    PretrainRecipe.micro_step = micro_step


# ---------------------------------------------------------------------------------------------- helpers
def _env() -> dict:
    from tests.helpers import child_env

    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _losses(out: str, job: str = "pretrain") -> dict[int, float]:
    with open(os.path.join(out, "logs", job, "Train_loss_total.csv"), encoding="utf-8") as fh:
        return {int(r[0]): float(r[1]) for r in csv.reader(fh) if r and r[0] != "step"}


def _latest(out: str) -> str:
    with open(os.path.join(out, "checkpoints", "latest"), encoding="utf-8") as fh:
        return fh.read().strip()


def _tags(out: str) -> list[str]:
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


# ---------------------------------------------------------------------------------------------- signals
def test_a_signal_in_the_loop_is_recorded_a_repeat_is_the_same_notice_and_a_later_one_ends_the_process(tmp_path):
    """Outside the loop a signal ends the job at once (StopRequested); a process forked from the job (a loader
    worker) ignores it; in the loop it is recorded; a repeat within the window is ignored; a later one kills."""
    script = (
        "import os, signal, time\n"
        "from lxmert_fast.train.preemption import StopSignals, StopRequested\n"
        "s = StopSignals(repeat_window_s=1.0)\n"
        "with s:\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
        "    except StopRequested as stop:\n"
        "        print('outside the loop:', stop, flush=True)\n"
        "s = StopSignals(repeat_window_s=1.0)\n"
        "with s:\n"
        "    worker = os.fork()\n"  # a data loader worker forked from the job: it ignores the notice
        "    if worker == 0:\n"
        "        time.sleep(1.0); os._exit(7)\n"
        "    time.sleep(0.2); os.kill(worker, signal.SIGTERM)\n"
        "    print('worker exit', os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]), flush=True)\n"
        "    s.deferred = True\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "    print('recorded:', s.name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "    print('repeat ignored', flush=True)\n"
        "    time.sleep(1.0)\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(2)\n"
        "    print('still alive', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["outside the loop: SIGUSR1", "worker exit 7", "recorded: SIGTERM",
                                        "repeat ignored"], proc.stdout
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "SIGTERM again: exiting at once" in proc.stderr


def _agreement_worker(rank: int, store: str, lag: int, out: str) -> None:
    import torch.distributed as dist

    from lxmert_fast.train.preemption import StopAgreement

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    agree = StopAgreement(torch.device("cpu"), 2, lag=lag)
    stopped_at = None
    for step in range(1, 9):
        if agree(rank == 1 and step >= 3):  # rank 1 got a signal during step 3
            stopped_at = step
            break
    late = StopAgreement(torch.device("cpu"), 2, lag=lag)
    for step in range(1, 4):  # nothing asked during the loop ...
        assert not late(False)
    final = late(rank == 0, wait=True)  # ... rank 0 asked after the last agreement
    with open(f"{out}.{rank}", "w", encoding="utf-8") as fh:
        json.dump({"stopped_at": stopped_at, "final": final}, fh)
    dist.destroy_process_group()


@pytest.mark.parametrize("lag", [0, 1])
def test_every_rank_stops_at_the_same_step_whichever_rank_got_the_signal(tmp_path, lag):
    """lag 0 (CPU): at the step during which the signal came; lag 1 (GPU: the flag read a step later, no host
    sync per step): one step later, on every rank alike."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "agreed")
    mp.spawn(_agreement_worker, args=(str(tmp_path / "store"), lag, out), nprocs=2, join=True)
    got = [json.load(open(f"{out}.{r}", encoding="utf-8")) for r in range(2)]
    assert got[0] == got[1] == {"stopped_at": 3 + lag, "final": True}, got


# ---------------------------------------------------------------------------------------------- manifests
def _fake_tag(root, step: int, payload: bytes = b"x" * 1000, manifest_too: bool = True) -> str:
    from lxmert_fast.checkpoints import manifest
    from lxmert_fast.checkpoints.training import tag_for

    tag = tag_for(step)
    path = root / tag
    path.mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"step": step, "w": torch.arange(256.0)}, buf)
    (path / "mp_rank_00_model_states.pt").write_bytes(buf.getvalue())
    (path / "zero").mkdir()
    (path / "zero" / "shard.bin").write_bytes(payload)
    (path / "run.json").write_text(json.dumps({"world_size": 1}))
    if manifest_too:
        manifest.write_manifest(str(path), {"tag": tag, "step": step})
    return tag


@pytest.mark.parametrize("damage,message", [
    ("truncate", "mp_rank_00_model_states.pt has 100 bytes, the manifest says"),
    ("empty", "zero/shard.bin has 0 bytes, the manifest says 1,000 (empty)"),
    ("missing", "run.json is missing"),
    ("flip", "zero/shard.bin: bytes 0-1,000 differ from what was written"),
    ("manifest", "manifest.json cannot be read"),
])
def test_a_manifest_finds_each_kind_of_damage_by_file(tmp_path, damage, message):
    from lxmert_fast.checkpoints import manifest

    tag = tmp_path / _fake_tag(tmp_path, 4)
    assert manifest.verify(str(tag)) is None
    if damage == "truncate":
        data = (tag / "mp_rank_00_model_states.pt").read_bytes()
        (tag / "mp_rank_00_model_states.pt").write_bytes(data[:100])
    elif damage == "empty":
        (tag / "zero" / "shard.bin").write_bytes(b"")
    elif damage == "missing":
        (tag / "run.json").unlink()
    elif damage == "flip":
        (tag / "zero" / "shard.bin").write_bytes(b"y" + b"x" * 999)
    else:
        text = (tag / "manifest.json").read_text()
        (tag / "manifest.json").write_text(text[:len(text) // 2])
    assert message in (manifest.verify(str(tag)) or "")


def test_a_tag_of_an_earlier_version_is_trusted_where_its_archives_crcs_hold(tmp_path):
    from lxmert_fast.checkpoints import manifest

    tag = tmp_path / _fake_tag(tmp_path, 2, manifest_too=False)
    assert manifest.verify_legacy(str(tag)) is None
    data = bytearray((tag / "mp_rank_00_model_states.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    assert "fails its CRC-32" in manifest.verify_legacy(str(tag))
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(data[:len(data) // 2]))
    assert "is not a complete archive" in manifest.verify_legacy(str(tag))


def test_a_resume_takes_the_newest_tag_that_verifies_and_moves_the_others_aside(tmp_path):
    from lxmert_fast.checkpoints.training import CheckpointManager
    from lxmert_fast.train.errors import TrainingError

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_tag(root, step)
    (root / "latest").write_text("step00000006")
    _fake_tag(root, 8, manifest_too=False)            # a save that did not finish: newer than latest, no manifest
    (root / "step00000006" / "zero" / "shard.bin").write_bytes(b"")
    mgr, said = CheckpointManager(str(root)), []
    choice = mgr.choose_resume_tag(said.append)
    assert choice.tag == "step00000004" and not choice.legacy
    assert [t for t, _ in choice.passed_over] == ["step00000008", "step00000006"]
    assert "no manifest.json: its save did not finish" in said[0] and "(empty)" in said[1]
    assert (root / "latest").read_text() == "step00000004"            # latest never names an unverified tag
    assert mgr.tags() == ["step00000002", "step00000004"]
    assert (root / "step00000006.damaged").is_dir() and (root / "step00000008.damaged").is_dir()
    # an earlier version's tags (no manifests): trusted up to `latest` when their archives hold
    old = tmp_path / "old"
    for step in (1, 3):
        _fake_tag(old, step, manifest_too=False)
    (old / "latest").write_text("step00000003")
    assert CheckpointManager(str(old)).choose_resume_tag(None).legacy
    # nothing complete: every tag and its problem, one error
    for tag in ("step00000002", "step00000004"):
        (root / tag / "run.json").unlink()
    with pytest.raises(TrainingError, match="no complete checkpoint in .*step00000004: run.json is missing; "
                                            "step00000002: run.json is missing"):
        mgr.choose_resume_tag(None)


# ---------------------------------------------------------------------------------------------- batch on resume
def test_a_resume_on_another_world_size_keeps_the_checkpoints_micro_batch():
    from lxmert_fast.train.ds_config import DSConfigError, keep_checkpoint_batch, load_ds_config, resolve_batch_size

    then = {"train_batch_size": 64, "micro_batch_size": 32, "world_size": 2}
    fixed = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    for cfg in (fixed, load_ds_config("cpu.json")):  # a fixed total, and the packaged CPU config's "auto" one
        kept, notes = keep_checkpoint_batch(cfg, 1, None, then, "step00000003")
        assert resolve_batch_size(kept, 1) == (64, 32, 2) and not notes
        kept, notes = keep_checkpoint_batch(cfg, 2, 16, then, "step00000003")  # a micro-batch given: taken, said
        assert resolve_batch_size(kept, 2, 16) == (64, 16, 2) and "instead of the checkpoint's 32" in notes[0]
    with pytest.raises(DSConfigError, match=r"micro-batch 32 does not divide the 16 samples per process .* give "
                                            r"--micro_batch_size one of \[1, 2, 4, 8, 16\]"):
        keep_checkpoint_batch(fixed, 4, None, then, "step00000003")
    with pytest.raises(DSConfigError, match="fixes gradient_accumulation_steps at 1, but keeping the total batch 64 "
                                            "with micro-batch 32 needs 2: set gradient_accumulation_steps to \"auto\""):
        keep_checkpoint_batch(dict(fixed, gradient_accumulation_steps=1), 1, None, then, "step00000003")


def test_another_micro_batch_size_continues_from_the_step_boundary_with_every_item_once():
    from lxmert_fast.data.step_sampler import StepSampler

    a = StepSampler(103, 8, accumulation=1, world_size=1, seed=5)           # global batch 8
    it = iter(a)
    seen = [next(it).indices for _ in range(4)]
    b = StepSampler(103, 4, accumulation=2, world_size=1, seed=5)           # the same steps, other micro-batches
    b.load_state_dict(a.state_dict(position=4))
    assert b.position == 8
    seen += [r.indices for r in b]
    items = [int(i) for chunk in seen for i in chunk]
    assert len(items) == len(set(items)) == 96


# ---------------------------------------------------------------------------------------------- in-process runs
def _pretrain_args(out, *extra: str) -> list[str]:
    from tests.test_finetune_helpers import demo_world

    return ["--data_root", demo_world(), "--model", "tiny", "--micro_batch_size", "8", "--log_every", "1",
            "--eval_every", "0", "--eval_batches", "1", "--no_progress", "--num_workers", "0", "--grounding_eval",
            "no", "--no_export", "--seed", "11", "--output_dir", str(out), *extra]


def _main(argv: list[str]) -> int:
    from lxmert_fast import pretrain
    from tests.test_finetune_helpers import one_thread

    with one_thread():
        return pretrain.main(argv)


@pytest.fixture(scope="module")
def torch_engine_run(tmp_path_factory):
    """6 steps with the torch engine, a checkpoint every 2 (tags 2, 4, 6)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _main(_pretrain_args(out, "--engine", "torch", "--max_steps", "6", "--save_every", "2")) == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "zero-length", "missing"])
def test_a_damaged_newest_tag_is_reported_and_the_one_before_it_resumes(torch_engine_run, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(torch_engine_run, out)
    states = out / "checkpoints" / "step00000006" / "torch_engine_states.pt"
    if damage == "truncated":
        states.write_bytes(states.read_bytes()[:states.stat().st_size // 2])
    elif damage == "zero-length":
        states.write_bytes(b"")
    else:
        states.unlink()
    assert _main(_pretrain_args(out, "--engine", "torch", "--max_steps", "6", "--save_every", "2", "--resume")) == 0
    said = capsys.readouterr().out
    what = {"truncated": "(truncated)", "zero-length": "(empty)", "missing": "torch_engine_states.pt is missing"}
    assert "checkpoint step00000006 is not usable (torch_engine_states.pt" in said and what[damage] in said, said
    assert "resumed from" in said and "step00000004: step 4" in said
    assert _losses(str(out)) == _losses(str(torch_engine_run))  # steps 5 and 6 again, bitwise
    assert _latest(str(out)) == "step00000006"
    assert "step00000006.damaged" in _tags(str(out))


def test_with_no_complete_tag_a_resume_is_a_clear_error(torch_engine_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(torch_engine_run, out)
    for tag in ("step00000002", "step00000004", "step00000006"):
        run_json = out / "checkpoints" / tag / "run.json"
        run_json.write_text(run_json.read_text().replace("1", "2"))  # the same size, other bytes
    code = _main(_pretrain_args(out, "--engine", "torch", "--max_steps", "6", "--resume"))
    err = capsys.readouterr().err
    assert code == 3
    assert "error: --resume: no complete checkpoint in" in err and "Traceback" not in err
    for tag in ("step00000006", "step00000004", "step00000002"):
        assert f"{tag}: run.json: bytes 0-" in err, err
    assert _tags(str(out)) == ["latest", "step00000002", "step00000004", "step00000006"]  # left as they were


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_save_that_fails_for_lack_of_space_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys, engine):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the tag of step 4 runs out of space half-way through a file
        if isinstance(f, (str, os.PathLike)) and "step00000004" in str(f):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[:buf.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code = _main(_pretrain_args(out, "--engine", engine, "--max_steps", "6", "--save_every", "2"))
    err = capsys.readouterr().err
    assert code == 3
    assert f"could not save checkpoint {out / 'checkpoints' / 'step00000004'}" in err
    assert "No space left on device" in err and "the partial step00000004 was removed" in err
    assert "the earlier checkpoints and `latest` (step00000002) are intact" in err and "Traceback" not in err
    assert [t for t in _tags(str(out)) if t.startswith("step")] == ["step00000002"]
    assert _latest(str(out)) == "step00000002"
    assert sorted(_losses(str(out))) == [1, 2, 3, 4]  # it stopped at the failed save
    monkeypatch.setattr(torch, "save", real_save)
    assert _main(_pretrain_args(out, "--engine", engine, "--max_steps", "6", "--save_every", "2", "--resume")) == 0


def test_fine_tuning_stops_on_a_signal_and_resumes_bitwise(tmp_path, capsys):
    from lxmert_fast import finetune
    from lxmert_fast.finetune import FinetuneRecipe
    from tests.test_finetune_helpers import demo_world, one_thread

    common = ["--task", "vqa", "--data_root", demo_world(), "--model", "tiny", "--epochs", "2", "--batch_size", "64",
              "--log_every", "1", "--seed", "5", "--save_every", "0", "--no_progress"]
    with one_thread():
        assert finetune.main(common + ["--output_dir", str(tmp_path / "straight")]) == 0
    original = FinetuneRecipe.micro_step

    def micro_step(self, trainer, raw):  # SIGTERM during step 3
        if trainer.engine.global_steps + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, trainer, raw)

    FinetuneRecipe.micro_step = micro_step
    try:
        with one_thread():
            assert finetune.main(common + ["--output_dir", str(tmp_path / "resumed")]) == 75
    finally:
        FinetuneRecipe.micro_step = original
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3" in err and "--resume" in err
    assert _latest(str(tmp_path / "resumed")) == "step00000003"
    with one_thread():
        assert finetune.main(common + ["--output_dir", str(tmp_path / "resumed"), "--resume"]) == 0
    a = _losses(str(tmp_path / "straight"), "finetune_vqa")
    b = _losses(str(tmp_path / "resumed"), "finetune_vqa")
    assert a == b and len(a) >= 6
    with open(tmp_path / "straight" / "result.json", encoding="utf-8") as fa, \
            open(tmp_path / "resumed" / "result.json", encoding="utf-8") as fb:
        ra, rb = json.load(fa), json.load(fb)
    assert ra["history"] == rb["history"] and ra["best"] == rb["best"] and ra["final"] == rb["final"]


# ---------------------------------------------------------------------------------------------- one process, from outside
@pytest.mark.slow
def test_sigterm_from_outside_saves_the_step_it_arrived_in_and_the_resume_is_bitwise(tmp_path):
    """A pre-training process (DeepSpeed's engine, 2 loader worker processes) and its workers get SIGTERM from
    outside after it logged step 4 (to the whole process group, as SLURM signals every process of a step): it
    ends the step in progress (its workers, started with the signal blocked, live on), writes its checkpoint,
    exits 75; --resume logs the uninterrupted run's losses, bitwise."""
    from tests.test_finetune_helpers import demo_world

    common = [sys.executable, "-m", "lxmert_fast.pretrain", "--data_root", demo_world(), "--model", "tiny",
              "--micro_batch_size", "8", "--max_steps", "12", "--log_every", "1", "--eval_every", "0",
              "--eval_batches", "1", "--no_progress", "--num_workers", "2", "--grounding_eval", "no", "--no_export",
              "--seed", "2", "--save_every", "0"]
    straight = subprocess.run(common + ["--output_dir", str(tmp_path / "straight")], env=_env(), capture_output=True,
                              text=True, timeout=900, cwd=str(tmp_path))
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = subprocess.Popen(common + ["--output_dir", str(tmp_path / "run")], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path), start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 4/12"):
            os.killpg(proc.pid, signal.SIGTERM)
            sent = time.monotonic()
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=600) == 75, "".join(lines[-30:])
    log = "".join(lines)
    seconds = time.monotonic() - sent
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+):", log).group(1))
    assert 5 <= stopped < 12, log[-3000:]  # the step in progress when the signal came (4 was logged before it)
    assert _latest(str(tmp_path / "run")) == f"step{stopped:08d}"
    assert sorted(_losses(str(tmp_path / "run"))) == list(range(1, stopped + 1))  # no step lost
    assert "Continue with the same command and --resume (exit code 75)" in log
    resumed = subprocess.run(common + ["--output_dir", str(tmp_path / "run"), "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(str(tmp_path / "run")) == _losses(str(tmp_path / "straight"))
    print(f"SIGTERM to exit: {seconds:.1f} s; stopped after step {stopped}")


# ---------------------------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The packaged cpu.json ("auto" batch), one epoch (len(train) // 64 steps): an uninterrupted 2-process run; one
    whose rank 1 gets SIGTERM in step 4, resumed on 2; one whose ranks both get it in step 3 (rank 0 twice, as
    SLURM and a launcher both deliver it), resumed on 1 process."""
    from lxmert_fast.data.demo import JOBS_OBJECTS, ensure_demo_data
    from lxmert_fast.data.pretrain_data import build_pretrain_dataset

    work = tmp_path_factory.mktemp("preempt2p")
    root = ensure_demo_data(str(work / "cache"), images=DEMO_IMAGES, seed=0, log=None,
                            objects=JOBS_OBJECTS)  # the jobs' world without --demo_objects
    train = build_pretrain_dataset(root, "mscoco_train,mscoco_nominival,vgnococo", log=None, seed=4)
    build_pretrain_dataset(root, "mscoco_minival", store_dir=train.store.path, log=None, seed=4)
    spy = work / "spy"
    spy.mkdir()
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    common = ["--model", "tiny", "--demo_images", str(DEMO_IMAGES), "--cache_dir", str(work / "cache"), "--epochs", "1",
              "--log_every", "1", "--eval_every", "0", "--eval_batches", "1", "--no_progress", "--num_workers", "0",
              "--grounding_eval", "no", "--no_export", "--seed", "4", "--save_every", "0",
              "--deepspeed_config", "cpu.json"]

    def run(name: str, processes: int, out: str, signals: str = "", *extra: str):
        env = dict(_env(), LXMERT_TEST_SPY=str(spy), LXMERT_TEST_SIGNALS=signals, LXMERT_TEST_RUN=name)
        launcher = ([deepspeed, "--num_gpus", "2", "--master_port", str(free_port())] if processes == 2
                    else [sys.executable])
        proc = subprocess.run(launcher + [os.path.abspath(__file__)] + common + ["--output_dir", str(work / out),
                                                                                  *extra],
                              env=env, capture_output=True, text=True, timeout=900, cwd=str(work))
        return proc.returncode, proc.stdout + proc.stderr

    runs = {"straight": run("straight", 2, "straight"),
            "rank1_stop": run("rank1_stop", 2, "two", "1:4"),
            "rank1_resume": run("rank1_resume", 2, "two", "", "--resume"),
            "both_stop": run("both_stop", 2, "to_one", "0:3:2,1:3"),
            "one_resume": run("one_resume", 1, "to_one", "", "--resume")}
    return work, runs, len(train) // 64


def _items(work, run: str) -> dict[int, list[int]]:
    """step -> the items its micro-batches held, over every rank of ``run``."""
    out: dict[int, list[int]] = {}
    for name in sorted(os.listdir(work / "spy")):
        if name.startswith(run + ".rank"):
            with open(work / "spy" / name, encoding="utf-8") as fh:
                for line in fh:
                    row = json.loads(line)
                    out.setdefault(row["step"], []).extend(row["items"])
    return out


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_that_step_and_the_resume_is_bitwise(two_process_runs):
    work, runs, epoch_steps = two_process_runs
    assert runs["straight"][0] == 0, runs["straight"][1][-4000:]
    code, log = runs["rank1_stop"]
    assert code == 75, log[-4000:]  # the deepspeed launcher passes the ranks' code on
    assert "[rank 1] SIGTERM: finishing this optimizer step" in log and "[rank 0] SIGTERM" not in log
    assert "stopped by a signal to another rank after step 4" in log
    assert "step00000004" in _tags(str(work / "two"))  # (latest names the resumed run's last tag now)
    with open(work / "two" / "checkpoints" / "step00000004" / "manifest.json", encoding="utf-8") as fh:
        files = {f["path"] for f in json.load(fh)["files"]}
    assert {"mp_rank_00_model_states.pt", "run.json"} <= files
    assert runs["rank1_resume"][0] == 0, runs["rank1_resume"][1][-4000:]
    straight = _losses(str(work / "straight"))
    assert sorted(straight) == list(range(1, epoch_steps + 1))
    assert _losses(str(work / "two")) == straight


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_on_one_finish_the_epoch_as_the_uninterrupted_run(two_process_runs):
    work, runs, epoch_steps = two_process_runs
    code, log = runs["both_stop"]
    assert code == 75, log[-4000:]
    assert "stopped by SIGTERM after step 3" in log and "SIGTERM again" not in log  # the repeat was the same notice
    code, log = runs["one_resume"]
    assert code == 0, log[-4000:]
    assert "DeepSpeed (cpu.json, packaged): batch 64 = micro 32 x accum 2 x world" in log, log[-3000:]
    straight, changed = _losses(str(work / "straight")), _losses(str(work / "to_one"))
    assert sorted(changed) == sorted(straight)
    for step in (1, 2, 3):
        assert changed[step] == straight[step]
    worst = max(abs(changed[s] - straight[s]) / abs(straight[s]) for s in straight)
    assert worst <= 1e-5, f"losses differ from the uninterrupted run's by up to {worst:.2e}"
    a = _items(work, "straight")
    b = {**_items(work, "both_stop"), **_items(work, "one_resume")}
    assert sorted(a) == sorted(b) == list(range(1, epoch_steps + 1))
    for step in a:
        assert sorted(a[step]) == sorted(b[step]), step
    every = [i for step in b for i in b[step]]
    assert len(every) == len(set(every)) == epoch_steps * 64  # each sample of the epoch once (the last few aside)


if __name__ == "__main__":
    install_spy(os.environ.get("LXMERT_TEST_SPY", ""), os.environ.get("LXMERT_TEST_SIGNALS", ""),
                os.environ.get("LXMERT_TEST_RUN", "run"))
    from lxmert_fast import pretrain
    from lxmert_fast.train.entry import exit_script

    exit_script(lambda: pretrain.main(sys.argv[1:]))
