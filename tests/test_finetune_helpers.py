"""Shared by the fine-tuning tests (no tests here): one demo world and one demo pre-training per session.

Everything is generated in temporary directories; nothing is downloaded. Training runs use one
torch thread: on a CPU shared with other jobs, two OpenMP threads are many times slower than one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile

import torch

DEMO_IMAGES = 200
DEMO_SEED = 1
PRETRAIN_STEPS = 150


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tmpdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def demo_world() -> str:
    """A demo world in the original layout (VQA / GQA / NLVR2 splits and features included)."""
    from lxmert_fast.data.demo import generate

    root = os.path.join(_tmpdir("lxmert-ft-demo-"), "data")
    generate(root, images=DEMO_IMAGES, seed=DEMO_SEED, log=None, workers=1)
    return root


@functools.lru_cache(maxsize=None)
def demo_pretraining() -> str:
    """A short pre-training of a tiny model on the demo world with lxmert_fast.pretrain; its output dir.

    Tasks MLM, matching and QA (the QA task sees the VQA questions of the training images, as the
    real pre-training does); lr 5e-3 (a tiny model), no ZeRO; 150 steps of 32.
    """
    from lxmert_fast import pretrain

    root = demo_world()
    out = os.path.join(_tmpdir("lxmert-ft-pre-"), "pre")
    from lxmert_fast.train.ds_config import packaged_config

    with open(packaged_config("cpu.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["optimizer"]["params"]["lr"] = 5e-3
    cfg.pop("zero_optimization", None)
    cfg.pop("tensorboard", None)
    ds_path = os.path.join(os.path.dirname(out), "pretrain_ds.json")
    with open(ds_path, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh)
    with one_thread():
        rc = pretrain.main([
            "--data_root", root, "--model", "tiny", "--tasks", "mlm,matched,qa", "--max_steps", str(PRETRAIN_STEPS),
            "--micro_batch_size", "32", "--output_dir", out, "--no_progress", "--num_workers", "0",
            "--log_every", "50", "--eval_every", "0", "--grounding_eval", "no", "--seed", "7",
            "--deepspeed_config", ds_path,
        ])
    assert rc == 0, "the demo pre-training failed"
    assert os.path.isfile(os.path.join(out, "hf", "config.json"))
    return out


def finetune_run(args: list[str]) -> dict:
    """lxmert_fast.finetune in this process, one thread, no progress bar."""
    from lxmert_fast import finetune

    with one_thread():
        return finetune.run(args + ["--no_progress"])
