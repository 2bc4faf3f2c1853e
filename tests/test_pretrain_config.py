"""pretrain.build_model_config: presets, --model_config, --config_overrides and the layer flags."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lxmert_fast import LxmertConfig
from lxmert_fast.pretrain import UsageError, build_model_config, build_parser


def _data(vocab=40, answers=5):
    index = SimpleNamespace(vocab_size=vocab, num_answers=answers, meta={"max_len": 20})
    return SimpleNamespace(index=index, train=SimpleNamespace(store=SimpleNamespace(feat_dim=2048)),
                           vocab="vocab.txt", is_demo=True)


def _config(argv):
    return build_model_config(build_parser().parse_args(argv), _data())


def test_overrides_and_layer_flags_reach_a_preset():
    cfg = _config(["--model", "small", "--config_overrides", "hidden_size=128,intermediate_size=512,initializer_range=0.05",
                   "--llayers", "2", "--rlayers", "1"])
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range) == (128, 512, 0.05)
    assert (cfg.l_layers, cfg.x_layers, cfg.r_layers) == (2, 2, 1)     # x from the preset
    assert (cfg.vocab_size, cfg.num_qa_labels, cfg.visual_feat_dim) == (40, 5, 2048)  # from the data


def test_the_pretraining_recipe_and_original_checkpoints_weigh_visual_losses_by_one_over_0_15(tmp_path):
    """The released code multiplies each visual loss by 1 / 0.15; transformers' configs keep their 6.67."""
    import torch

    from lxmert_fast.checkpoints.layouts import infer_config, original_to_hf

    assert _config(["--model", "tiny"]).visual_loss_normalizer == 1 / 0.15
    path = tmp_path / "hf.json"
    LxmertConfig.preset("tiny", vocab_size=40, num_qa_labels=5, visual_feat_dim=2048).to_json_file(path)
    assert _config(["--model_config", str(path)]).visual_loss_normalizer == 6.67   # an HF config says 6.67
    assert LxmertConfig.preset("base").visual_loss_normalizer == 6.67              # the HF class's default
    import transformers

    from tests.helpers import hf_config

    hf = transformers.LxmertForPreTraining(hf_config(LxmertConfig.preset("tiny")))
    original = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in hf.state_dict().items()}  # Epoch20_LXRT
    assert infer_config(original_to_hf(original)).visual_loss_normalizer == 1 / 0.15
    assert isinstance(next(iter(original.values())), torch.Tensor)


def test_overrides_and_layer_flags_reach_a_model_config(tmp_path):
    path = tmp_path / "config.json"
    LxmertConfig.preset("tiny", vocab_size=40, num_qa_labels=5, visual_feat_dim=2048).to_json_file(path)
    cfg = _config(["--model_config", str(path), "--config_overrides", "hidden_dropout_prob=0.0", "--xlayers", "3"])
    assert (cfg.hidden_dropout_prob, cfg.x_layers, cfg.hidden_size) == (0.0, 3, 32)


def test_bad_overrides_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="--config_overrides: config override 'vocab_size=9'"):
        _config(["--config_overrides", "vocab_size=9"])
    with pytest.raises(UsageError, match="--model small with --config_overrides.*not divisible"):
        _config(["--model", "small", "--config_overrides", "hidden_size=130"])
    with pytest.raises(UsageError, match="cannot change a --from_pretrained model"):
        _config(["--from_pretrained", str(tmp_path), "--config_overrides", "hidden_size=64"])
    hf = tmp_path / "hf"
    hf.mkdir()
    LxmertConfig.preset("tiny", vocab_size=40, num_qa_labels=5, visual_feat_dim=2048).to_json_file(hf / "config.json")
    with pytest.raises(UsageError, match="--llayers/--xlayers/--rlayers cannot change a --from_pretrained model"):
        _config(["--from_pretrained", str(hf), "--llayers", "1"])


def test_store_cache_dirs_of_two_roots_of_one_name_differ(tmp_path):
    """--cache_dir keeps a store root (one store per feature file) by data root: two roots with the same
    folder name must not share one. Without the cache the store root is <data_root>/lxmert_fast, fine-tuning's
    default --store_dir too, so both jobs convert each feature file once."""
    from lxmert_fast.pretrain import _store_dir
    a, b = tmp_path / "x" / "data", tmp_path / "y" / "data"
    for root in (a, b):
        (root / "mscoco_imgfeat").mkdir(parents=True)
    cache = str(tmp_path / "cache")
    da, db = (_store_dir(str(r), cache) for r in (a, b))
    assert da != db and os.path.basename(da).startswith("data-")
    assert os.path.dirname(da) == os.path.join(cache, "stores")
    assert _store_dir(str(a), cache) == da                              # stable
    assert _store_dir(str(a), None) == str(a / "lxmert_fast")           # no cache: under the root


def test_cpu_threads_follow_the_flag_then_omp_num_threads_then_the_cores():
    from lxmert_fast.train.process import ThreadsError as UsageError
    from lxmert_fast.train.process import cpu_threads

    assert cpu_threads(3, {"OMP_NUM_THREADS": "1"}) == 3
    assert cpu_threads(None, {"OMP_NUM_THREADS": "1"}) == 1  # two 1-thread jobs on a 2-core machine stay fast
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert cpu_threads(None, {}) == max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with pytest.raises(UsageError, match="OMP_NUM_THREADS='two'"):
        cpu_threads(None, {"OMP_NUM_THREADS": "two"})
    with pytest.raises(UsageError, match="--cpu_threads must be at least 1"):
        cpu_threads(0, {})


def test_demo_objects_is_parsed_and_refused_with_a_data_root(tmp_path, capsys):
    from lxmert_fast.pretrain import build_data
    from lxmert_fast.train.runtime import Trainer

    assert build_parser().parse_args([]).demo_objects is None  # the default world (2-4)
    assert build_parser().parse_args(["--demo_objects", "1"]).demo_objects == (1, 1)
    assert build_parser().parse_args(["--demo_objects", "2-3"]).demo_objects == (2, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--demo_objects", "0"])
    assert "--demo_objects" in capsys.readouterr().err
    args = build_parser().parse_args(["--data_root", str(tmp_path), "--demo_objects", "1"])
    trainer = SimpleNamespace(is_main=True, log=print, data_root=lambda *a, **kw: Trainer.data_root(trainer, *a, **kw))
    with pytest.raises(UsageError, match="--demo_objects shapes the demo world"):
        build_data(args, trainer)
