"""LXMERT pre-training: the recipe (data, model, loss, evaluation) on the shared runtime.

    deepspeed lxmert_fast/pretrain.py --deepspeed_config zero2.json \\
        --data_root data --train mscoco_train,mscoco_nominival,vgnococo --valid mscoco_minival \\
        --taskMaskLM --taskObjPredict --taskMatched --taskQA --visualLosses obj,attr,feat \\
        --wordMaskRate 0.15 --objMaskRate 0.15 --model base --epochs 20 --output_dir runs/lxmert

    python -m lxmert_fast.pretrain          # the demo world, the demo model, a few minutes on a CPU

Without --data_root the job pre-trains on the demo world (the one-object world, generated on first
use under --cache_dir) for DEMO_STEPS steps; with no model chosen, the demo model (DEMO_MODEL) and
the demo's DeepSpeed config (ds_configs/pretrain_demo.json): a run that ends reading the image (the
closing grounding line). The DeepSpeed config owns batch size, precision, optimizer, LR schedule, clipping
and ZeRO; the runtime (lxmert_fast/train/) fills its "auto" entries and reads the settings back
from the engine. See `--help` for every flag.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (`deepspeed lxmert_fast/pretrain.py`): find the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lxmert_fast import LxmertForPreTraining  # noqa: E402
from lxmert_fast.checkpoints.export import export_hf  # noqa: E402
from lxmert_fast.checkpoints.layouts import detect_layout, infer_config, original_to_hf, read_checkpoint  # noqa: E402
from lxmert_fast.checkpoints.task import ANSWERS_FILE  # noqa: E402
from lxmert_fast.config import RELEASED_VISUAL_LOSS_NORMALIZER, ConfigError, LxmertConfig  # noqa: E402
from lxmert_fast.data.demo import add_demo_objects_argument, jobs_demo_objects  # noqa: E402
from lxmert_fast.data.formats import DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES  # noqa: E402
from lxmert_fast.data.layouts import FORMAT_CHOICES  # noqa: E402
from lxmert_fast.data.masking import (draw_selection, mask_pretrain_batch, mask_words, masked_counts,  # noqa: E402
                                      selection_counts)
from lxmert_fast.data.pretrain_data import (SPLIT_FEATURE_FILES, build_pretrain_dataset,  # noqa: E402
                                            make_pretrain_loader, split_names)
from lxmert_fast.data.store_set import label_loss_problems  # noqa: E402
from lxmert_fast.data.tasks import TaskDataError, parse_feature_overrides  # noqa: E402
from lxmert_fast.data.tokenization import load_tokenizer  # noqa: E402
from lxmert_fast.flops import train_flops_per_sample  # noqa: E402
from lxmert_fast.metrics import PretrainEval, grounding_counts, grounding_result, mask_target_words  # noqa: E402
from lxmert_fast.model.rows import RowBudget  # noqa: E402
from lxmert_fast.train.compile import eager_forward  # noqa: E402
from lxmert_fast.train.ds_config import zero_stage_of  # noqa: E402
from lxmert_fast.train.entry import run_job  # noqa: E402
from lxmert_fast.train.process import select_accelerator  # noqa: E402
from lxmert_fast.train.rng import preserved_rng  # noqa: E402
from lxmert_fast.train.runtime import (Recipe, Trainer, UsageError, add_runtime_arguments,  # noqa: E402
                                       default_cache_dir)
from lxmert_fast.utils import atomic_write_json, atomic_write_text  # noqa: E402

TASKS = ("mlm", "matched", "obj", "qa")
LOSS_NAMES = ("mlm", "matched", "obj", "attr", "feat", "qa")
VISUAL_LOSSES = ("obj", "attr", "feat")

# The demo's defaults (no --data_root and no model chosen: `demo_defaults`; each flag still wins): the small
# preset narrowed to hidden 64, one layer per encoder, initializer_range 0.1 (about 1/sqrt(fan-in) at this
# width), no dropout and the visual losses weighed 1 (not the released 1/0.15), DEMO_STEPS steps of batch 64 at
# lr 2e-3 (pretrain_demo.json). On the one-object world matching leaves chance within a few minutes on 2 CPU
# cores that way; dropout delays it by hundreds of steps and the heavier visual losses by about 500
# (bench/RESULTS.md).
DEMO_MODEL = dict(hidden_size=64, intermediate_size=256, initializer_range=0.1, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, l_layers=1, x_layers=1, r_layers=1, visual_loss_normalizer=1.0)
DEMO_STEPS = 1000
DEMO_DS_CONFIG = "pretrain_demo.json"

__all__ = ["build_parser", "build_model_config", "PretrainRecipe", "UsageError", "main"]


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LXMERT pre-training with DeepSpeed (demo world by default; --data_root for the real data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_arguments(p)
    _add_task_arguments(p)
    _add_model_arguments(p)
    _add_eval_arguments(p)
    add_runtime_arguments(p, save_every=1000, log_every=10)
    p.set_defaults(output_dir="runs/pretrain")
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data: the real data or the demo world, feature sources, caches, loading and masking."""

    d = p.add_argument_group("data")
    d.add_argument("--data_root", default=None,
                   help="the original data/ folder (lxmert/*.json, mscoco_imgfeat/, vg_gqa_imgfeat/); "
                        "none = the demo world")
    d.add_argument("--train", default="mscoco_train,mscoco_nominival,vgnococo", help="training splits")
    d.add_argument("--valid", default="mscoco_minival", help="held-out split ('' = no validation)")
    d.add_argument("--features", default=None,
                   help="feature sources in place of the release's TSV files: SPLIT=PATH[,SPLIT=PATH] (a TSV or another "
                        "layout: docs/data.md; relative paths are under --data_root)")
    d.add_argument("--features_format", default="auto", choices=FORMAT_CHOICES,
                   help="the feature files' layout (auto: detected from the files)")
    d.add_argument("--features_map", default=None,
                   help="JSON map from a non-TSV layout's image ids to the text files' ids (docs/data.md)")
    d.add_argument("--vocab", default=None, help="vocab.txt or tokenizer dir (default <data_root>/vocab.txt)")
    d.add_argument("--qa_sets", "--qaSets", default=None, help="restrict the QA answer table to these sets (vqa,gqa,visual7w)")
    d.add_argument("--cache_dir", default=default_cache_dir(),
                   help="demo world and (with --store_in_cache) the store root of the data root's converted "
                        "feature stores")
    d.add_argument("--store_in_cache", action="store_true",
                   help="keep the store root (one converted store per feature file, shared with fine-tuning, "
                        "and the tokenised sentences) under --cache_dir/stores/<root name>-<hash of the root's "
                        "path> instead of <data_root>/lxmert_fast (fine-tuning: give that folder as --store_dir)")
    d.add_argument("--demo_images", type=int, default=2000, help="images of the demo world")
    add_demo_objects_argument(d)
    d.add_argument("--skip_bad", action="store_true", help="skip (and report) malformed data rows instead of failing")
    d.add_argument("--num_workers", type=int, default=None, help="data loader workers per process (default: 0 on CPU, where the step already uses every core, 4 on GPU)")
    d.add_argument("--mask_on", choices=("device", "workers"), default="device",
                   help="apply word/object masking on the training device or in the loader workers")


def _add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The pre-training tasks and their losses (the original switches too)."""
    t = p.add_argument_group("tasks and losses")
    t.add_argument("--tasks", default="mlm,matched,obj,qa", help="pre-training tasks (subset of mlm,matched,obj,qa)")
    t.add_argument("--taskMaskLM", action="store_true", help="original switch; any task switch selects exactly the given ones")
    t.add_argument("--taskMatched", action="store_true")
    t.add_argument("--taskObjPredict", action="store_true")
    t.add_argument("--taskQA", action="store_true")
    t.add_argument("--visual_losses", "--visualLosses", default="obj,attr,feat", help="object-prediction losses")
    t.add_argument("--word_mask_rate", "--wordMaskRate", type=float, default=0.15)
    t.add_argument("--obj_mask_rate", "--objMaskRate", type=float, default=0.15)
    t.add_argument("--obj_label_loss", choices=("all", "masked"), default="all",
                   help="object/attribute label losses on all objects (released code) or masked ones (paper)")
    t.add_argument("--qa_from_epoch", type=int, default=0,
                   help="QA loss from this epoch on: 0 = the released single stage, 10 (of 20) = the paper")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model: its size and shape, initial weights, attention backend and kernels."""
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("base", "small", "tiny"), default=None,
                   help="size preset (default: base with --data_root; on the demo world the demo model, small "
                        "narrowed to hidden 64, one layer per encoder, no dropout)")
    m.add_argument("--llayers", type=int, default=None)
    m.add_argument("--xlayers", type=int, default=None)
    m.add_argument("--rlayers", type=int, default=None)
    m.add_argument("--model_config", default=None, help="a config.json (ours or HF's) instead of a preset")
    m.add_argument("--config_overrides", default=None,
                   help="change the preset's or --model_config's shape or initialisation, as HF's run_mlm.py: "
                        "\"hidden_size=128,intermediate_size=512,initializer_range=0.05\" (not with --from_pretrained)")
    m.add_argument("--from_pretrained", "--loadLXMERT", default=None,
                   help="initial weights: HF dir, original .pth or ours")
    m.add_argument("--fromScratch", action="store_true", help="accepted for the original command line (the default)")
    m.add_argument("--attention_backend", default="auto")
    m.add_argument("--kernels", default="torch", choices=("torch", "triton", "apex"))
    m.add_argument("--row_budget_sigmas", type=float, default=6.0,
                   help="static room for masked words/objects: expected count + this many standard deviations "
                        "(a batch beyond it runs eagerly with room for every row: exact either way)")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Validation, the grounding check and the export."""
    e = p.add_argument_group("evaluation and export")
    e.add_argument("--eval_batches", type=int, default=None, help="limit validation to this many batches per process")
    e.add_argument("--no_export", action="store_true", help="skip the final HF export")
    e.add_argument("--grounding_eval", choices=("auto", "yes", "no"), default="auto",
                   help="at the end, compare masked-word accuracy with the true vs shuffled images (and the object/"
                        "colour words where the data names them) and matching accuracy (auto: on the demo world)")
    e.add_argument("--grounding_batches", type=int, default=16,
                   help="held-out batches per process for the grounding check")


def demo_defaults(args) -> bool:
    """Whether the demo's model and DeepSpeed config apply: the demo world and no model chosen (--model,
    --model_config, --from_pretrained), as the quick start runs."""
    return args.data_root is None and not (args.model or args.model_config or args.from_pretrained)


def selected_tasks(args) -> tuple[str, ...]:
    original = {"mlm": args.taskMaskLM, "matched": args.taskMatched, "obj": args.taskObjPredict, "qa": args.taskQA}
    if any(original.values()):
        return tuple(t for t in TASKS if original[t])
    tasks = tuple(x.strip() for x in args.tasks.split(",") if x.strip())
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UsageError(f"--tasks: unknown {unknown}; expected a subset of {','.join(TASKS)}")
    if not tasks:
        raise UsageError("--tasks: no task selected")
    return tasks


def selected_visual_losses(args) -> tuple[str, ...]:
    losses = tuple(x.strip() for x in args.visual_losses.split(",") if x.strip())
    unknown = sorted(set(losses) - set(VISUAL_LOSSES))
    if unknown:
        raise UsageError(f"--visual_losses: unknown {unknown}; expected a subset of obj,attr,feat")
    return losses


# ---------------------------------------------------------------------------------------------- data
class DataSetup:
    """Everything the recipe needs from the data side."""

    def __init__(self, train, valid, index, data_root: str, is_demo: bool, vocab: str):
        self.train, self.valid, self.index = train, valid, index
        self.data_root, self.is_demo, self.vocab = data_root, is_demo, vocab


def _check_data_paths(data_root: str, train: list[str], valid: list[str], vocab: str,
                      features: Optional[dict] = None) -> None:
    missing = []
    features = features or {}
    for split in train + valid:
        if split not in SPLIT_FEATURE_FILES:
            raise UsageError(f"unknown pre-training split {split!r}: expected one of {sorted(SPLIT_FEATURE_FILES)}")
        for rel in (os.path.join("lxmert", f"{split}.json"), features.get(split, SPLIT_FEATURE_FILES[split])):
            if not os.path.exists(os.path.join(data_root, rel)) and rel not in missing:
                missing.append(rel)
    if not os.path.exists(os.path.join(data_root, "lxmert", "all_ans.json")):
        missing.append(os.path.join("lxmert", "all_ans.json"))
    if not os.path.exists(vocab):
        missing.append(f"{vocab} (the WordPiece vocab: bert-base-uncased's vocab.txt for the real data; --vocab)")
    if missing:
        raise UsageError(f"--data_root {data_root}: missing " + "; ".join(missing))


def _store_dir(data_root: str, cache_dir: Optional[str]) -> str:
    """The store root of ``data_root``: ``<data_root>/lxmert_fast``, or with a cache
    ``<cache_dir>/stores/<root name>-<hash of the root's path>``, one converted store per feature file."""
    root = os.path.abspath(data_root)
    if cache_dir is None:
        return os.path.join(root, "lxmert_fast")
    # the root's name for people, a hash of its path so two roots of one name never share a store root
    key = f"{os.path.basename(root)}-{hashlib.sha256(root.encode()).hexdigest()[:8]}"
    return os.path.join(cache_dir, "stores", key)


def build_data(args, trainer: Trainer) -> DataSetup:
    data_root, is_demo = trainer.data_root(args.data_root, cache_dir=args.cache_dir, demo_images=args.demo_images,
                                           demo_objects=jobs_demo_objects(args.demo_objects, args.data_root))
    train_splits, valid_splits = split_names(args.train), split_names(args.valid or "")
    vocab = args.vocab or os.path.join(data_root, "vocab.txt")
    try:
        features = parse_feature_overrides(args.features)
    except TaskDataError as err:
        raise UsageError(str(err)) from None
    _check_data_paths(data_root, train_splits, valid_splits, vocab, features)
    store_dir = _store_dir(data_root, args.cache_dir if args.store_in_cache else None)
    tasks = selected_tasks(args)
    log = trainer.log if trainer.is_main else None
    common = dict(store_dir=store_dir, vocab=vocab, skip_bad=args.skip_bad, qa_sets=args.qa_sets,
                  task_matched="matched" in tasks, task_qa="qa" in tasks, seed=args.seed, features=features,
                  features_format=args.features_format, features_map=args.features_map)

    def build():  # rank 0 converts and tokenises (cached, atomic); the others then open the caches
        # one store per feature file under one store root: the held-out split (minival, in val2014)
        # reads the store the training splits converted, and fine-tuning finds them again
        train = build_pretrain_dataset(data_root, train_splits, log=log, **common)
        valid = (build_pretrain_dataset(data_root, valid_splits, log=log, **dict(common, task_qa=True, task_matched=True))
                 if valid_splits else None)
        return train, valid

    train, valid = trainer.node_first(build)
    lacking = label_loss_problems(selected_visual_losses(args) if "obj" in tasks else (),
                                  [train.store] + ([valid.store] if valid else []))
    if lacking:
        raise UsageError(lacking)
    return DataSetup(train, valid, train.index, data_root, is_demo, vocab)



# ---------------------------------------------------------------------------------------------- model
def build_model_config(args, data: DataSetup) -> LxmertConfig:
    tasks = selected_tasks(args)
    vlosses = selected_visual_losses(args)
    index = data.index
    switches = dict(
        task_mask_lm="mlm" in tasks, task_matched="matched" in tasks, task_obj_predict="obj" in tasks and bool(vlosses),
        task_qa="qa" in tasks, visual_obj_loss="obj" in vlosses, visual_attr_loss="attr" in vlosses,
        visual_feat_loss="feat" in vlosses, obj_label_loss=args.obj_label_loss,
        attention_backend=args.attention_backend, kernels=args.kernels,
    )
    shape = {k: v for k, v in (("l_layers", args.llayers), ("x_layers", args.xlayers), ("r_layers", args.rlayers))
             if v is not None}
    feat_dim = data.train.store.feat_dim
    try:
        overrides = LxmertConfig.parse_overrides(args.config_overrides or "")
    except ConfigError as err:
        raise UsageError(f"--config_overrides: {err}") from None
    if overrides and args.from_pretrained:
        raise UsageError("--config_overrides cannot change a --from_pretrained model (its weights fix the shape)")
    shape.update(overrides)
    if args.from_pretrained or args.model_config:
        source = args.from_pretrained or args.model_config
        if args.model_config:
            config = LxmertConfig.from_json(args.model_config)
        else:
            if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
                config = LxmertConfig.from_json(source)
            else:
                raw, cfg_path = read_checkpoint(source)
                config = LxmertConfig.from_json(cfg_path) if cfg_path else infer_config(
                    original_to_hf(raw) if detect_layout(raw) == "original" else raw)
        if shape and not args.model_config:
            raise UsageError("--llayers/--xlayers/--rlayers cannot change a --from_pretrained model")
        try:
            config = config.replace(**shape)
        except ConfigError as err:
            raise UsageError(f"{source} with --config_overrides/--llayers/--xlayers/--rlayers: {err}") from None
        problems = []
        if config.vocab_size != index.vocab_size:
            problems.append(f"vocab_size {config.vocab_size} vs the tokenizer's {index.vocab_size} ({data.vocab})")
        if config.visual_feat_dim != feat_dim:
            problems.append(f"visual_feat_dim {config.visual_feat_dim} vs the features' {feat_dim}")
        if switches["task_qa"] and config.num_qa_labels != index.num_answers:
            problems.append(f"num_qa_labels {config.num_qa_labels} vs the answer table's {index.num_answers}")
        if problems:
            raise UsageError(f"the model ({source}) does not fit the data: " + "; ".join(problems))
        return config.replace(**switches)
    preset = args.model or ("small" if data.is_demo else "base")
    if demo_defaults(args):  # the demo model: the flags still win
        shape = {**DEMO_MODEL, **shape}
    try:
        return LxmertConfig.preset(preset, **{
            "vocab_size": index.vocab_size, "visual_feat_dim": feat_dim, "num_qa_labels": max(1, index.num_answers),
            "num_object_labels": DEFAULT_NUM_OBJ_CLASSES, "num_attr_labels": DEFAULT_NUM_ATTR_CLASSES,
            "max_position_embeddings": max(512, index.meta["max_len"]),
            "visual_loss_normalizer": RELEASED_VISUAL_LOSS_NORMALIZER, **shape, **switches})  # --config_overrides win
    except ConfigError as err:
        raise UsageError(f"--model {preset} with --config_overrides/--llayers/--xlayers/--rlayers: {err}") from None


def build_model(config: LxmertConfig, args, ds_config: dict):
    """Our model (never transformers' classes) - under ZeRO-3 built inside deepspeed.zero.Init, so that
    no process ever holds the full model; pretrained weights are loaded whole, then partitioned."""
    if args.from_pretrained:
        # transformers' from_pretrained returns the model in eval mode; the runtime trains what it is given
        return LxmertForPreTraining.from_pretrained(args.from_pretrained, config=config).train()
    if zero_stage_of(ds_config) == 3:
        import deepspeed  # heavy: about 0.5 s on top of torch, only for ZeRO-3

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return LxmertForPreTraining(config)
    return LxmertForPreTraining(config)


# ---------------------------------------------------------------------------------------------- batches
def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """The model's keyword arguments; float inputs in the engine's dtype (targets stay fp32)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "labels",
            "obj_labels", "matched_label", "ans")
    out = {k: batch[k] for k in keys if k in batch}
    out["visual_feats"] = out["visual_feats"].to(dtype)
    out["visual_pos"] = out["visual_pos"].to(dtype)
    return out


# ---------------------------------------------------------------------------------------------- the recipe
class PretrainRecipe(Recipe):
    job = "pretrain"
    job_name = "pretrain"
    outputs = ("hf", "result.json", "model_config.json", "ds_config.json")

    def __init__(self, args):
        self.args = args
        self.tasks = selected_tasks(args)
        selected_visual_losses(args)
        self.overflow_batches = 0
        if demo_defaults(args) and args.deepspeed_config is None:  # the demo's batch and lr, on any device
            args.deepspeed_config = DEMO_DS_CONFIG

    # -- building -----------------------------------------------------------------------------------
    def build_data(self, trainer: Trainer, micro_batch_size: int, accumulation: int) -> None:
        args = self.args
        if args.grounding_eval == "yes" and not (args.valid or "").strip():
            raise UsageError("--grounding_eval yes needs held-out data (--valid): the check predicts words of "
                             "held-out captions")
        self.data = build_data(args, trainer)
        self.config = build_model_config(args, self.data)
        self.mask_cfg = self.data.index.masking_config(args.word_mask_rate, args.obj_mask_rate)
        self.micro_batch_size = micro_batch_size
        self.train_loader = self._loader(trainer, self.data.train, micro_batch_size, shuffle=True, drop_last=True,
                                         workers_mask=args.mask_on == "workers", accumulation=accumulation)
        # generators of the training path, per rank: the masking (device) and its selection draws (host)
        self.mask_gen = torch.Generator(device=trainer.device)
        self.mask_gen.manual_seed(args.seed * 1000 + 17 * trainer.rank + 1)
        self.select_gen = torch.Generator()
        self.select_gen.manual_seed(args.seed * 1000 + 17 * trainer.rank + 2)
        self.loss_names = self.config.pretraining_losses

    def _loader(self, trainer: Trainer, dataset, micro: int, *, shuffle: bool, drop_last: bool, workers_mask: bool,
                workers=None, accumulation=None):
        if workers is None:
            workers = self.args.num_workers
        if workers is None:  # on a CPU the step uses every core: a loader process competes with it (the demo
            workers = 4 if trainer.device.type == "cuda" else 0  # steps 7% faster without one on 2 cores)
        dataset.masking = self.mask_cfg if workers_mask else None
        loader = make_pretrain_loader(dataset, micro, rank=trainer.rank, world_size=trainer.world, seed=self.args.seed,
                                      shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                                      persistent_workers=False, accumulation=accumulation)
        # The DataLoader draws its workers' base seed when an iterator starts: from its own generator,
        # not the global one, so that a resumed run's dropout stream is not shifted by that draw.
        gen = torch.Generator()
        gen.manual_seed(self.args.seed * 7919 + trainer.rank)
        loader.loader.generator = gen
        return loader

    def schedule(self, steps_per_epoch: int):
        return (DEMO_STEPS, None) if self.data.is_demo else (None, 20)

    def warmup_ratio(self) -> float:
        return 0.05

    def default_eval_every(self, total_steps: int) -> int:
        return max(1, total_steps // 2)

    def build_model(self, trainer: Trainer, ds_config: dict):
        if trainer.is_main:
            os.makedirs(trainer.out_dir, exist_ok=True)
            atomic_write_text(os.path.join(trainer.out_dir, "model_config.json"), self.config.to_json_string())
        return build_model(self.config, self.args, ds_config)

    def describe(self, trainer: Trainer) -> list[str]:
        c = self.config
        self.flops = train_flops_per_sample(
            c, seq_len=self.data.index.meta["max_len"], num_objects=self.data.train.store.num_boxes,
            mlm_tokens=self.args.word_mask_rate * self.data.index.meta["max_len"],
            masked_objects=self.args.obj_mask_rate * self.data.train.store.num_boxes)
        return [f"lxmert-fast pre-training: {'demo world' if self.data.is_demo else 'data'} {self.data.data_root}; "
                f"{len(self.data.train)} training items"
                + (f", {len(self.data.valid)} held out" if self.data.valid is not None else "")
                + f"; model hidden {c.hidden_size}, layers l{c.l_layers}/x{c.x_layers}/r{c.r_layers}, vocab "
                  f"{c.vocab_size}; tasks {','.join(self.tasks)}; QA from epoch {self.args.qa_from_epoch}"]

    def flops_per_sample(self) -> Optional[float]:
        return getattr(self, "flops", None)

    def generators(self) -> dict[str, torch.Generator]:
        return {"mask": self.mask_gen, "mask_select": self.select_gen}

    # -- training ---------------------------------------------------------------------------------
    def epoch_begins(self, trainer: Trainer, epoch: int) -> None:
        self.qa_on = epoch >= self.args.qa_from_epoch

    def micro_step(self, trainer: Trainer, raw: dict):
        if self.args.mask_on == "device":
            draws = draw_selection(raw, self.select_gen)
            counts = selection_counts(raw, draws, self.mask_cfg)
            batch = mask_pretrain_batch(to_device({**raw, **draws}, trainer.device), self.mask_cfg, self.mask_gen)
        else:  # masked by the workers: the counts are on the host already
            counts = masked_counts(raw)
            batch = to_device(raw, trainer.device)
        if not self.qa_on and "ans" in batch:
            batch["ans"] = torch.full_like(batch["ans"], -100)
        budget, fits = self._row_budget(trainer, batch, counts)
        with contextlib.nullcontext() if fits else eager_forward(self.args.compile):
            out = trainer.engine(**model_inputs(batch, trainer.dtype), row_budget=budget)
        return out.loss, out.losses

    def _row_budget(self, trainer: Trainer, batch: dict, counts: tuple[int, int]):
        """The static row budget for this batch shape, and whether this batch's masked words and objects
        (counted on the host) fit it. One that does not gets room for every row (exact) and runs eagerly, so
        the compiled step keeps its one shape."""
        batch_size, seq_len = batch["input_ids"].shape
        num_objects = batch["visual_feats"].shape[1]
        budget = RowBudget.for_batch(batch_size, seq_len, num_objects, self.args.word_mask_rate,
                                     self.args.obj_mask_rate, self.args.row_budget_sigmas)
        if budget.fits(*counts):
            return budget, True
        self.overflow_batches += 1
        trainer.log(f"a batch masks {counts[0]} words and {counts[1]} objects, beyond the row budget "
                    f"({budget.words}, {budget.objects}): it runs with room for every row (exact; eager)")
        return RowBudget.full(batch_size, seq_len, num_objects), False

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        if self.data.valid is None:
            return {}
        engine = trainer.engine
        loader = self._loader(trainer, self.data.valid, trainer.settings.micro_batch_size, shuffle=False,
                              drop_last=False, workers_mask=False, workers=0)
        acc = PretrainEval(trainer.device)
        captured: dict[str, Any] = {}
        head = getattr(engine.module, "obj_predict_head", None)
        hook = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("obj", out)) if head else None
        gen = torch.Generator(device=trainer.device)
        gen.manual_seed(self.args.seed + 7 * trainer.rank + 12345)
        try:
            for i, raw in enumerate(loader):
                if self.args.eval_batches is not None and i >= self.args.eval_batches:
                    break
                batch = mask_pretrain_batch(to_device(raw, trainer.device), self.mask_cfg, gen)
                captured.clear()
                out = engine(**model_inputs(batch, trainer.dtype))
                acc.update(batch, out, captured.get("obj"))
        finally:
            if hook is not None:
                hook.remove()
        return acc.result()

    def grounding(self, trainer: Trainer) -> Optional[dict[str, float]]:
        """Does the model read the image? Masked-word accuracy with the true vs shuffled images: over a random
        15% of the words (any data), and over the object and colour words where the data names them (the
        demo world's demo.json); matching accuracy. Needs a held-out split."""
        if self.data.valid is None:
            raise UsageError("--grounding_eval yes needs held-out data (--valid): the check predicts words of "
                             "held-out captions")
        cfg = self.mask_cfg
        gen = torch.Generator(device=trainer.device)
        gen.manual_seed(self.args.seed + 31 * trainer.rank + 4242)
        maskers = {"masked_words": lambda raw: mask_words(
            raw["input_ids"], raw["attention_mask"], vocab_size=cfg.vocab_size, mask_id=cfg.mask_id,
            never_mask=cfg.never_mask, generator=gen, prob=cfg.word_prob)}
        named = self._named_word_ids()
        if named is not None:
            maskers["named_words"] = lambda raw: mask_target_words(raw["input_ids"], named, cfg.mask_id)
        loader = self._loader(trainer, self.data.valid, trainer.settings.micro_batch_size, shuffle=True,
                              drop_last=True, workers_mask=False, workers=0)
        trainer.engine.eval()
        try:
            with preserved_rng(), eager_forward(self.args.compile), torch.no_grad():
                limit = self.args.grounding_batches
                batches = (raw for i, raw in enumerate(loader) if limit is None or i < limit)
                counts = grounding_counts(lambda **kw: trainer.engine(**kw), batches, maskers, trainer.device,
                                          trainer.dtype)
        finally:
            trainer.engine.train()
        return grounding_result(counts, maskers)

    def _named_word_ids(self) -> Optional[torch.Tensor]:
        """The single-piece object and colour words the data names (the demo world's demo.json), or None."""
        meta_path = os.path.join(self.data.data_root, "demo.json")
        if not os.path.exists(meta_path):
            return None
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        tok = load_tokenizer(self.data.vocab)
        ids = []
        for word in meta["classes"] + meta["colors"]:
            pieces = tok(word, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1 and pieces[0] != tok.unk_token_id:
                ids.append(pieces[0])
        return torch.tensor(ids)

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, trainer: Trainer, result: dict) -> dict:
        args = self.args
        result["data_root"] = self.data.data_root
        result["overflow_batches"] = self.overflow_batches
        if not result.get("completed"):
            return result
        want = args.grounding_eval == "yes" or (args.grounding_eval == "auto" and self.data.is_demo)
        if want:
            g = self.grounding(trainer)
            result["grounding"] = g
            line = (f"grounding: masked words {g['masked_acc_true_image']:.3f} with the true image vs "
                    f"{g['masked_acc_shuffled_image']:.3f} with images shuffled across the batch "
                    f"({int(g['masked_words_true'])} words)")
            if "word_acc_true_image" in g:
                line += (f"; object/colour words {g['word_acc_true_image']:.3f} vs {g['word_acc_shuffled_image']:.3f} "
                         f"({int(g['words_true'])} words)")
            trainer.log(line + f"; matching accuracy {g['matched_acc']:.3f} ({int(g['matched_pairs'])} pairs)")
            trainer.engine.monitor.write_events([(f"Grounding/{k}", v, result["step"]) for k, v in g.items()])
        if not args.no_export:
            export_dir = os.path.join(trainer.out_dir, "hf")
            export_hf(trainer.engine, lambda: LxmertForPreTraining(self.config), export_dir)
            if trainer.is_main and self.config.task_qa:
                # the QA head's rows by answer, so fine-tuning copies the rows of shared answers
                atomic_write_json(os.path.join(export_dir, ANSWERS_FILE), list(self.data.index.answers))
            trainer.log(f"exported the model to {export_dir} (config.json + model.safetensors; "
                        f"transformers.LxmertForPreTraining.from_pretrained loads it)")
            result["export_dir"] = export_dir
        return result


# ---------------------------------------------------------------------------------------------- the command
def run(argv: Optional[list[str]] = None) -> dict:
    """Parse, set up, train; the result (raises on errors). For in-process use."""
    select_accelerator()  # DS_ACCELERATOR=cpu without a GPU, before DeepSpeed is imported
    args = build_parser().parse_args(argv)
    return Trainer(args, PretrainRecipe(args)).run()


def main(argv: Optional[list[str]] = None) -> int:
    return run_job(run, argv)


if __name__ == "__main__":
    from lxmert_fast.train.entry import exit_script

    exit_script(main)
