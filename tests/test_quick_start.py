"""The README's quick start as a new user runs it, on 2 CPU cores: its pre-training reads the image and its
fine-tuning example learns.

One session fixture runs the README's pre-training command once (a subprocess in a temporary working directory,
the demo world cached in a temporary folder through LXMERT_FAST_CACHE, every setting the command's own defaults);
the tests read its result, and the README's fine-tuning example runs from its export. The multi-object world's
check (object and colour words need the true image) is a shorter run of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lxmert_fast.data.demo import JOBS_OBJECTS, demo_dir_name
from lxmert_fast.pretrain import DEMO_DS_CONFIG, DEMO_MODEL, DEMO_STEPS, PretrainRecipe, build_parser, demo_defaults
from tests.helpers import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = [sys.executable, "-m", "lxmert_fast.pretrain"]                                   # the README's commands
FINETUNE = [sys.executable, "-m", "lxmert_fast.finetune", "--task", "nlvr2", "--load", "runs/pretrain/hf"]


def _run(cmd: list[str], work: str, extra_env: dict | None = None) -> str:
    """``cmd`` in ``work`` as a user runs it (the demo world cached under ``work``/cache); its output."""
    env = child_env()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["LXMERT_FAST_CACHE"] = os.path.join(work, "cache")
    env["CUDA_VISIBLE_DEVICES"] = ""           # the CPU quick start
    # threads: the job's own default (the cores), or this worker's OMP_NUM_THREADS under pytest -n (conftest.py)
    env.pop("TRITON_INTERPRET", None)
    env.update(extra_env or {})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _result(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory) -> dict:
    """``python -m lxmert_fast.pretrain`` (no flags) in a fresh working directory: its result.json, model config,
    DeepSpeed config and printed output."""
    work = str(tmp_path_factory.mktemp("quick_start"))
    out = _run(PRETRAIN, work)
    run = os.path.join(work, "runs", "pretrain")
    result = _result(os.path.join(run, "result.json"))
    result.update(work=work, output=out, model_config=_result(os.path.join(run, "model_config.json")),
                  ds_config=_result(os.path.join(run, "ds_config.json")))
    print(json.dumps(result["grounding"]))
    return result


@pytest.mark.slow
def test_quick_start_reads_the_image(quick_start):
    """The closing grounding line: object and colour words of held-out captions are read off the true image
    (at least twice as often as with the images shuffled across the batch), and cross-modality matching is far
    above chance on held-out pairs (about half of them mismatched)."""
    g = quick_start["grounding"]
    assert g["words_true"] > 200 and g["matched_pairs"] >= 1000, g
    assert g["word_acc_true_image"] >= 2 * g["word_acc_shuffled_image"], g
    assert g["word_acc_true_image"] > g["word_acc_shuffled_image"] + 0.3, g
    assert g["matched_acc"] >= 0.7, g
    line = next(ln for ln in quick_start["output"].splitlines() if ln.startswith("grounding: "))
    assert f"object/colour words {g['word_acc_true_image']:.3f} vs {g['word_acc_shuffled_image']:.3f}" in line
    assert f"matching accuracy {g['matched_acc']:.3f}" in line


@pytest.mark.slow
def test_quick_start_runs_the_demo_defaults(quick_start):
    """No flag: the one-object demo world, the demo model, the full recipe, pretrain_demo.json, an HF export."""
    assert os.path.basename(quick_start["data_root"]) == demo_dir_name(2000, 0, JOBS_OBJECTS)
    cfg = quick_start["model_config"]
    assert {k: cfg[k] for k in DEMO_MODEL} == DEMO_MODEL
    assert all(cfg[k] for k in ("task_mask_lm", "task_matched", "task_obj_predict", "task_qa"))
    assert quick_start["step"] == DEMO_STEPS and quick_start["completed"]
    ds = quick_start["ds_config"]
    assert ds["train_batch_size"] == 64 and ds["optimizer"]["params"]["lr"] == 2e-3
    assert os.path.isfile(os.path.join(quick_start["export_dir"], "model.safetensors"))


@pytest.mark.slow
def test_readme_finetune_example_beats_the_majority_answer(quick_start):
    """The README's NLVR2 example after the quick start (its export, the same demo world, the demo defaults) ends
    at least 0.15 above the majority answer on the held-out pairs."""
    work = quick_start["work"]
    _run(FINETUNE, work)
    result = _result(os.path.join(work, "runs", "nlvr2", "result.json"))
    assert result["data_root"] == quick_start["data_root"]
    final, majority = result["final"]["valid"], result["majority"]
    print(f"demo NLVR2 valid: accuracy {final['accuracy']:.3f} (consistency {final['consistency']:.3f}) against the "
          f"majority answer's {majority['accuracy']:.3f} ({majority['consistency']:.3f})")
    assert final["count"] >= 300, final
    assert final["accuracy"] >= majority["accuracy"] + 0.15, (final, majority)


def test_demo_defaults_apply_without_a_data_root_or_a_chosen_model():
    """The demo's model and DeepSpeed config are the quick start's (no flags); a chosen model (the tests' tiny one,
    a config, a checkpoint) or a data root keeps the packaged configs and presets."""
    parse = build_parser().parse_args
    assert demo_defaults(parse([])) and PretrainRecipe(parse([])).args.deepspeed_config == DEMO_DS_CONFIG
    for argv in (["--model", "tiny"], ["--model_config", "c.json"], ["--from_pretrained", "x"], ["--data_root", "d"]):
        assert not demo_defaults(parse(argv)) and PretrainRecipe(parse(argv)).args.deepspeed_config is None, argv
    mine = PretrainRecipe(parse(["--deepspeed_config", "cpu.json"]))
    assert mine.args.deepspeed_config == "cpu.json"
