"""LXMERT pre-training with DeepSpeed.

    deepspeed lxmert_fast/pretrain.py --deepspeed_config ds_configs/zero2.json \\
        --data_root data --train mscoco_train,mscoco_nominival,vgnococo --valid mscoco_minival \\
        --taskMaskLM --taskObjPredict --taskMatched --taskQA --visualLosses obj,attr,feat \\
        --wordMaskRate 0.15 --objMaskRate 0.15 --model base --epochs 20 --output_dir runs/lxmert

    python -m lxmert_fast.pretrain          # the demo world, a small model, a few minutes on a CPU

Without --data_root the job pre-trains on the demo world (generated on first use under
--cache_dir). The DeepSpeed config owns batch size, precision, optimizer, LR schedule, clipping
and ZeRO; this script only fills its "auto" entries (batch split, schedule length) and reads the
settings back from the engine. See `--help` for every flag.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (`deepspeed lxmert_fast/pretrain.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lxmert_fast.engine import select_accelerator  # noqa: E402

select_accelerator()  # DS_ACCELERATOR=cpu without a GPU, before DeepSpeed is imported anywhere

import torch  # noqa: E402
import warnings  # noqa: E402

# DeepSpeed calls torch.distributed functions that torch >= 2.12 marks deprecated, on every step.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")

from lxmert_fast import engine as E  # noqa: E402
from lxmert_fast.config import ConfigError, LxmertConfig  # noqa: E402
from lxmert_fast.data.demo import DEFAULT_OBJECTS, add_demo_objects_argument  # noqa: E402
from lxmert_fast.flops import device_name, peak_tflops_for, throughput, train_flops_per_sample  # noqa: E402
from lxmert_fast.model.rows import RowBudget  # noqa: E402
from lxmert_fast.train.compile import (COMPILE_MODES, CompileModeError, check_compile_mode,  # noqa: E402
                                       compile_model, eager_forward, step_begins)

TASKS = ("mlm", "matched", "obj", "qa")
TASK_FIELDS = {"mlm": "task_mask_lm", "matched": "task_matched", "obj": "task_obj_predict", "qa": "task_qa"}
LOSS_NAMES = ("mlm", "matched", "obj", "attr", "feat", "qa")
VISUAL_LOSSES = ("obj", "attr", "feat")
DEFAULT_CACHE = os.environ.get("LXMERT_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lxmert_fast"))


class UsageError(ValueError):
    """A bad command line or a data/model mismatch found before training starts."""


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="LXMERT pre-training with DeepSpeed (demo world by default; --data_root for the real data).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--data_root", default=None,
                   help="the original data/ folder (lxmert/*.json, mscoco_imgfeat/, vg_gqa_imgfeat/); "
                        "none = the demo world")
    d.add_argument("--train", default="mscoco_train,mscoco_nominival,vgnococo", help="training splits")
    d.add_argument("--valid", default="mscoco_minival", help="held-out split ('' = no validation)")
    d.add_argument("--vocab", default=None, help="vocab.txt or tokenizer dir (default <data_root>/vocab.txt)")
    d.add_argument("--qa_sets", "--qaSets", default=None, help="restrict the QA answer table to these sets (vqa,gqa,visual7w)")
    d.add_argument("--cache_dir", default=DEFAULT_CACHE,
                   help="demo world and (with --store_in_cache) converted feature stores")
    d.add_argument("--store_in_cache", action="store_true",
                   help="put converted feature stores under --cache_dir instead of <data_root>/lxmert_fast")
    d.add_argument("--demo_images", type=int, default=2000, help="images of the demo world")
    add_demo_objects_argument(d)
    d.add_argument("--skip_bad", action="store_true", help="skip (and report) malformed data rows instead of failing")
    d.add_argument("--num_workers", type=int, default=None, help="data loader workers per process (default: 1 on CPU, 4 on GPU)")
    d.add_argument("--mask_on", choices=("device", "workers"), default="device",
                   help="apply word/object masking on the training device or in the loader workers")

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

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("base", "small", "tiny"), default=None,
                   help="size preset (default: small on the demo world, base with --data_root)")
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
    m.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the model's forward and backward as whole static graphs (reduce-overhead: "
                        "with CUDA graphs, GPU only); none = eager")
    m.add_argument("--row_budget_sigmas", type=float, default=6.0,
                   help="static room for masked words/objects: expected count + this many standard deviations "
                        "(a batch beyond it runs eagerly with room for every row: exact either way)")

    r = p.add_argument_group("run")
    r.add_argument("--epochs", type=int, default=None, help="default: 20 with --data_root, else as --max_steps needs")
    r.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps (sets the LR schedule's length; default 200 on the demo world)")
    r.add_argument("--stop_at_step", type=int, default=None,
                   help="stop (after a checkpoint) at this step, keeping the full run's schedule; resume later")
    r.add_argument("--micro_batch_size", type=int, default=None,
                   help="fills an \"auto\" train_micro_batch_size_per_gpu of the DeepSpeed config (32 when nothing fixes it)")
    r.add_argument("--warmup_ratio", type=float, default=0.05, help="fills an \"auto\" warmup_num_steps")
    r.add_argument("--output_dir", "--output", default="runs/pretrain")
    r.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoints/latest")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run (its checkpoints and logs are deleted)")
    r.add_argument("--seed", type=int, default=9595)
    r.add_argument("--log_every", type=int, default=10)
    r.add_argument("--eval_every", type=int, default=None, help="steps between validations (default: half-way; 0 = at the end only)")
    r.add_argument("--eval_batches", type=int, default=None, help="limit validation to this many batches per process")
    r.add_argument("--save_every", type=int, default=1000, help="steps between checkpoints (also at epoch ends and the end)")
    r.add_argument("--keep_checkpoints", type=int, default=3)
    r.add_argument("--no_export", action="store_true", help="skip the final HF export")
    r.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: a table by GPU name)")
    r.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop when the loss has been non-finite this many steps in a row")
    r.add_argument("--no_progress", action="store_true", help="no progress bar")
    r.add_argument("--cpu_threads", type=int, default=None,
                   help="torch threads per process on CPU (default: OMP_NUM_THREADS when set, else the cores "
                        "divided among the local processes; 1 is far faster on a CPU shared with other jobs)")
    r.add_argument("--grounding_eval", choices=("auto", "yes", "no"), default="auto",
                   help="at the end, compare masked object/colour word accuracy with true vs shuffled images "
                        "(auto: on the demo world)")
    r.add_argument("--grounding_batches", type=int, default=8, help="held-out batches per process for the grounding check")
    r.add_argument("--debug_nonfinite_from_step", type=int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    import deepspeed

    deepspeed.add_config_arguments(p)
    return p


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
    """Everything the loop needs from the data side."""

    def __init__(self, train, valid, index, data_root: str, is_demo: bool, vocab: str):
        self.train, self.valid, self.index = train, valid, index
        self.data_root, self.is_demo, self.vocab = data_root, is_demo, vocab


def _check_data_paths(data_root: str, train: list[str], valid: list[str], vocab: str) -> None:
    from lxmert_fast.data.pretrain_data import SPLIT_FEATURE_FILES

    if not os.path.isdir(data_root):
        raise UsageError(f"--data_root {data_root}: no such directory (expected the original data/ folder "
                         f"with lxmert/*.json, mscoco_imgfeat/, vg_gqa_imgfeat/)")
    missing = []
    for split in train + valid:
        if split not in SPLIT_FEATURE_FILES:
            raise UsageError(f"unknown pre-training split {split!r}: expected one of {sorted(SPLIT_FEATURE_FILES)}")
        for rel in (os.path.join("lxmert", f"{split}.json"), SPLIT_FEATURE_FILES[split]):
            if not os.path.exists(os.path.join(data_root, rel)) and rel not in missing:
                missing.append(rel)
    if not os.path.exists(os.path.join(data_root, "lxmert", "all_ans.json")):
        missing.append(os.path.join("lxmert", "all_ans.json"))
    if not os.path.exists(vocab):
        missing.append(f"{vocab} (the WordPiece vocab: bert-base-uncased's vocab.txt for the real data; --vocab)")
    if missing:
        raise UsageError(f"--data_root {data_root}: missing " + "; ".join(missing))


def _store_dir(data_root: str, splits: list[str], cache_dir: Optional[str]) -> Optional[str]:
    if cache_dir is None:
        return None
    from lxmert_fast.data.pretrain_data import feature_files_for

    tag = "+".join(os.path.basename(p).replace("_obj36.tsv", "") for p in feature_files_for(data_root, splits))
    root = os.path.abspath(data_root)
    # the root's name for people, a hash of its path so two roots of one name never share a store
    key = f"{os.path.basename(root)}-{hashlib.sha256(root.encode()).hexdigest()[:8]}"
    return os.path.join(cache_dir, "stores", f"{key}-{tag}")


def build_data(args, rank: int, log) -> DataSetup:
    from lxmert_fast.data.pretrain_data import build_pretrain_dataset, feature_files_for, split_names

    is_demo = args.data_root is None
    if is_demo:
        from lxmert_fast.data.demo import ensure_demo_data

        data_root = None
        if rank == 0:
            data_root = ensure_demo_data(args.cache_dir, images=args.demo_images, seed=0, log=log,
                                         objects=args.demo_objects or DEFAULT_OBJECTS)
        data_root = E.broadcast_object(data_root)
    else:
        if args.demo_objects is not None:
            raise UsageError("--demo_objects shapes the demo world; it does not apply with --data_root")
        data_root = os.path.abspath(args.data_root)
    train_splits, valid_splits = split_names(args.train), split_names(args.valid or "")
    vocab = args.vocab or os.path.join(data_root, "vocab.txt")
    _check_data_paths(data_root, train_splits, valid_splits, vocab)
    cache = os.path.join(args.cache_dir) if args.store_in_cache else None
    train_store = _store_dir(data_root, train_splits, cache)
    tasks = selected_tasks(args)
    masking = None  # set later, when the index (vocab) is known
    common = dict(vocab=vocab, skip_bad=args.skip_bad, qa_sets=args.qa_sets, task_matched="matched" in tasks,
                  task_qa="qa" in tasks, seed=args.seed)
    # Rank 0 converts and tokenises (cached, atomic); the others then open the caches.
    train = valid = None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            train = build_pretrain_dataset(data_root, train_splits, store_dir=train_store,
                                           masking=masking, log=log if rank == 0 else None, **common)
            if valid_splits:
                # Reuse the training store when it holds the held-out images (minival is in val2014).
                valid_store = train.store.path if set(feature_files_for(data_root, valid_splits)) <= set(
                    feature_files_for(data_root, train_splits)) else _store_dir(data_root, valid_splits, cache)
                v_common = dict(common, task_qa=True, task_matched=True)
                valid = build_pretrain_dataset(data_root, valid_splits, store_dir=valid_store,
                                               log=log if rank == 0 else None, **v_common)
        E.barrier()
    return DataSetup(train, valid, train.index, data_root, is_demo, vocab)


# ---------------------------------------------------------------------------------------------- model
def build_model_config(args, data: DataSetup) -> LxmertConfig:
    from lxmert_fast.data.formats import DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES

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
            from lxmert_fast.model.convert import infer_config, original_to_hf, read_checkpoint, detect_layout

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
    try:
        return LxmertConfig.preset(
            preset, vocab_size=index.vocab_size, visual_feat_dim=feat_dim,
            num_qa_labels=max(1, index.num_answers), num_object_labels=DEFAULT_NUM_OBJ_CLASSES,
            num_attr_labels=DEFAULT_NUM_ATTR_CLASSES, max_position_embeddings=max(512, index.meta["max_len"]),
            **shape, **switches,
        )
    except ConfigError as err:
        raise UsageError(f"--model {preset} with --config_overrides/--llayers/--xlayers/--rlayers: {err}") from None


def build_model(config: LxmertConfig, args, ds_config: dict):
    """Our model (never transformers' classes) - under ZeRO-3 built inside deepspeed.zero.Init, so that
    no process ever holds the full model; pretrained weights are loaded whole, then partitioned."""
    from lxmert_fast import LxmertForPreTraining

    if args.from_pretrained:
        return LxmertForPreTraining.from_pretrained(args.from_pretrained, config=config)
    if E.zero_stage_of(ds_config) == 3:
        import deepspeed

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


@contextlib.contextmanager
def preserved_rng():
    """Work outside the training path (validation, checkpoints) leaves every global RNG as it found it."""
    state = E.rng_state()
    try:
        yield
    finally:
        E.set_rng_state(state)


# ---------------------------------------------------------------------------------------------- the job
def cpu_threads(requested: Optional[int], environ=None) -> int:
    """Torch threads for one CPU process: ``requested``, else ``OMP_NUM_THREADS`` when set (as torch
    itself would), else the cores this process may use divided among the processes of this node
    (oversubscribed OpenMP threads crawl: two jobs of 2 threads on 2 cores ran 30x slower)."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--cpu_threads must be at least 1, got {requested}")
        return requested
    omp = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise UsageError(f"OMP_NUM_THREADS={omp!r}: expected a positive integer (or pass --cpu_threads N)")
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local))


class Trainer:
    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = E.init_distributed()
        self.is_main = self.rank == 0
        self.log_lines: list[str] = []
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(args.cpu_threads))

    # -- output ---------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.is_main:
            bar = getattr(self, "bar", None)
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        E.seed_everything(args.seed)
        self.tasks = selected_tasks(args)
        ds_path = args.deepspeed_config or E.default_ds_config_path()
        raw_cfg = E.load_ds_config(ds_path)
        try:
            check_compile_mode(args.compile, self.device, E.zero_stage_of(raw_cfg))
        except CompileModeError as err:
            raise UsageError(str(err)) from None
        # The batch split first (the loader needs the micro batch), the step counts after.
        _, micro, accum = E.resolve_batch_size(raw_cfg, self.world, args.micro_batch_size)
        self.ds_path = ds_path
        self.data = build_data(args, self.rank, self.log)
        self.config = build_model_config(args, self.data)
        self.mask_cfg = self.data.index.masking_config(args.word_mask_rate, args.obj_mask_rate)
        self.train_loader = self._loader(self.data.train, micro, shuffle=True, drop_last=True,
                                         workers_mask=args.mask_on == "workers")
        micro_per_epoch = len(self.train_loader)
        self.accum = accum
        self.steps_per_epoch = micro_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise UsageError(f"the training set ({len(self.data.train)} items) is smaller than one optimizer step "
                             f"({micro} x {accum} x {self.world} samples)")
        is_demo = self.data.is_demo
        if args.max_steps is None and args.epochs is None:
            max_steps = 200 if is_demo else None
            epochs = 20
        else:
            max_steps, epochs = args.max_steps, args.epochs
        if max_steps is not None:
            self.total_steps = max_steps
            self.epochs = math.ceil(max_steps / self.steps_per_epoch) if epochs is None else epochs
            self.total_steps = min(max_steps, self.epochs * self.steps_per_epoch)
        else:
            self.epochs = epochs
            self.total_steps = epochs * self.steps_per_epoch
        self.out_dir = os.path.abspath(args.output_dir)
        self.ckpt = E.CheckpointManager(os.path.join(self.out_dir, "checkpoints"), keep=args.keep_checkpoints)
        self._check_output_dir()
        self.ds_config = E.prepare_ds_config(
            raw_cfg, world_size=self.world, total_steps=self.total_steps, output_dir=self.out_dir,
            micro_batch_size=args.micro_batch_size, warmup_ratio=args.warmup_ratio,
        )
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            E.atomic_write_json(os.path.join(self.out_dir, "ds_config.json"), self.ds_config)
            self.config.to_json(os.path.join(self.out_dir, "model_config.json"))
        E.seed_everything(args.seed)
        model = build_model(self.config, args, self.ds_config)
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        compile_model(model, args.compile)
        self.engine = E.initialize(model, self.ds_config)
        E.seed_everything(args.seed + 1_000_003 * self.rank)  # same init everywhere, per-rank dropout streams
        self.settings = E.optim_settings(self.engine)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.settings.precision, torch.float32)
        self.mask_gen = torch.Generator(device=self.device)
        self.mask_gen.manual_seed(args.seed * 1000 + 17 * self.rank + 1)
        # the masking's selection draws, made on the host so that the row budget is known before the step
        self.select_gen = torch.Generator()
        self.select_gen.manual_seed(args.seed * 1000 + 17 * self.rank + 2)
        self.overflow_batches = 0
        self.flops_per_sample = train_flops_per_sample(
            self.config, seq_len=self.data.index.meta["max_len"], num_objects=self.data.train.store.num_boxes,
            mlm_tokens=args.word_mask_rate * self.data.index.meta["max_len"],
            masked_objects=args.obj_mask_rate * self.data.train.store.num_boxes,
        )
        self.peak = args.peak_tflops or (peak_tflops_for(device_name()) if self.device.type == "cuda" else None)
        self.log(
            f"lxmert-fast pre-training: {'demo world' if is_demo else 'data'} {self.data.data_root}; "
            f"{len(self.data.train)} training items"
            + (f", {len(self.data.valid)} held out" if self.data.valid is not None else "")
            + f"; model {n_params / 1e6:.1f}M parameters ({self._model_desc()}); tasks {','.join(self.tasks)}; "
            f"{self.world} process(es) on {device_name()}"
        )
        self.log(f"DeepSpeed ({os.path.relpath(ds_path) if os.path.exists(ds_path) else ds_path}): "
                 f"{self.settings.describe()}")
        self.log(f"schedule: {self.epochs} epoch(s) x {self.steps_per_epoch} steps, {self.total_steps} steps in all; "
                 f"QA from epoch {args.qa_from_epoch}; {self.flops_per_sample / 1e9:.2f} GFLOP per sample")

    def _check_output_dir(self) -> None:
        args = self.args
        earlier = self.ckpt.latest_tag() is not None or bool(self.ckpt.tags())
        if args.resume:
            if self.ckpt.latest_tag() is None:
                raise UsageError(f"--resume: no checkpoint in {self.ckpt.directory} (no 'latest' file)")
            return
        if earlier and not args.overwrite:
            raise UsageError(f"--output_dir {self.out_dir} holds checkpoints of an earlier run: pass --resume to "
                             f"continue it, --overwrite to start afresh there, or another --output_dir")
        E.barrier()
        if earlier and self.is_main:
            import shutil

            for sub in ("checkpoints", "logs", "hf"):
                shutil.rmtree(os.path.join(self.out_dir, sub), ignore_errors=True)
        E.barrier()

    def _model_desc(self) -> str:
        c = self.config
        return f"hidden {c.hidden_size}, layers l{c.l_layers}/x{c.x_layers}/r{c.r_layers}, vocab {c.vocab_size}"

    def _loader(self, dataset, micro: int, *, shuffle: bool, drop_last: bool, workers_mask: bool, workers=None):
        from lxmert_fast.data.pretrain_data import make_pretrain_loader

        dataset.masking = self.mask_cfg if workers_mask else None
        if workers is None:
            workers = self.args.num_workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 1
        loader = make_pretrain_loader(dataset, micro, rank=self.rank, world_size=self.world, seed=self.args.seed,
                                      shuffle=shuffle, drop_last=drop_last, num_workers=workers,
                                      persistent_workers=False)
        # The DataLoader draws its workers' base seed when an iterator starts: from its own generator,
        # not the global one, so that a resumed run's dropout stream is not shifted by that draw.
        gen = torch.Generator()
        gen.manual_seed(self.args.seed * 7919 + self.rank)
        loader.loader.generator = gen
        return loader

    # -- checkpoint state -------------------------------------------------------------------------
    def client_state(self, step: int, epoch: int, sampler_state: dict) -> dict:
        rngs = E.all_gather_object(E.rng_state({"mask": self.mask_gen, "mask_select": self.select_gen}))
        return {
            "step": step,
            "epoch": epoch,
            "sampler": sampler_state,
            "rng": rngs,
            "world_size": self.world,
            "seed": self.args.seed,
            "total_steps": self.total_steps,
            "model_config": self.config.to_dict(),
            "train_batch_size": self.settings.train_batch_size,
        }

    def restore(self) -> tuple[int, int]:
        state = self.ckpt.load(self.engine)
        problems = []
        if state.get("world_size") != self.world:
            problems.append(f"it was written by {state.get('world_size')} processes, this run has {self.world}")
        if state.get("train_batch_size") != self.settings.train_batch_size:
            problems.append(f"train_batch_size {state.get('train_batch_size')} vs {self.settings.train_batch_size}")
        if state.get("total_steps") != self.total_steps:
            problems.append(f"a schedule of {state.get('total_steps')} steps vs {self.total_steps} now "
                            f"(same --max_steps/--epochs needed)")
        if state.get("seed") != self.args.seed:
            problems.append(f"seed {state.get('seed')} vs {self.args.seed}")
        if problems:
            raise E.TrainingError(f"--resume: checkpoint {self.ckpt.latest_tag()} does not fit this run: "
                                  + "; ".join(problems))
        self.train_loader.load_state_dict(state["sampler"])
        E.set_rng_state(state["rng"][self.rank], {"mask": self.mask_gen, "mask_select": self.select_gen})
        self.log(f"resumed from {self.ckpt.directory}/{self.ckpt.latest_tag()}: step {state['step']}, "
                 f"epoch {state['epoch']}, batch {state['sampler']['position']} of the epoch")
        return int(state["step"]), int(state["epoch"])

    def save(self, step: int, epoch: int, sampler_state: dict) -> Optional[str]:
        if not self._finite_since_last_save():
            self.log(f"step {step}: not saving a checkpoint: the loss was non-finite since the last one")
            return None
        with preserved_rng():
            tag = self.ckpt.save(self.engine, step, self.client_state(step, epoch, sampler_state), self.rank)
        self.bad_since_save.zero_()
        return tag

    # -- non-finite losses ----------------------------------------------------------------------
    def _nonfinite_status(self) -> tuple[int, int]:
        t = torch.stack([self.streak, self.bad_since_save]).to(torch.float64)
        import torch.distributed as tdist

        if tdist.is_initialized() and self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t[0].item()), int(t[1].item())

    def _finite_since_last_save(self) -> bool:
        streak, bad = self._nonfinite_status()
        if self.settings.precision == "fp16":
            return streak == 0  # the loss scaler skipped the overflowing steps: the weights are intact
        return bad == 0

    def _check_nonfinite(self, step: int) -> None:
        streak, _ = self._nonfinite_status()
        if streak >= self.args.max_nonfinite_steps:
            last = self.ckpt.latest_tag()
            where = (f"the last good checkpoint, {os.path.join(self.ckpt.directory, last)}, is intact "
                     f"(continue from it with --resume, e.g. with a lower learning rate)") if last else \
                "no checkpoint had been written"
            raise E.TrainingError(
                f"the training loss has been non-finite (NaN/inf) for {streak} steps in a row, up to step {step}; "
                f"stopping. {where}"
            )

    # -- validation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        from lxmert_fast.data.masking import mask_pretrain_batch
        from lxmert_fast.metrics import PretrainEval

        if self.data.valid is None:
            return {}
        engine = self.engine
        loader = self._loader(self.data.valid, self.settings.micro_batch_size, shuffle=False, drop_last=False,
                              workers_mask=False, workers=0)
        acc = PretrainEval(self.device)
        captured: dict[str, Any] = {}
        head = getattr(engine.module, "obj_predict_head", None)
        hook = head.register_forward_hook(lambda mod, inp, out: captured.__setitem__("obj", out)) if head else None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.args.seed + 7 * self.rank + 12345)
        engine.eval()
        try:
            with torch.no_grad(), preserved_rng(), eager_forward(self.args.compile):
                for i, raw in enumerate(loader):
                    if self.args.eval_batches is not None and i >= self.args.eval_batches:
                        break
                    batch = mask_pretrain_batch(to_device(raw, self.device), self.mask_cfg, gen)
                    captured.clear()
                    out = engine(**model_inputs(batch, self.dtype))
                    acc.update(batch, out, captured.get("obj"))
        finally:
            engine.train()
            if hook is not None:
                hook.remove()
        return acc.result()

    def grounding(self) -> Optional[dict[str, float]]:
        from lxmert_fast.data.tokenization import load_tokenizer
        from lxmert_fast.metrics import grounding_counts, grounding_result

        meta_path = os.path.join(self.data.data_root, "demo.json")
        if self.data.valid is None or not os.path.exists(meta_path):
            return None
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        tok = load_tokenizer(self.data.vocab)
        ids = []
        for word in meta["classes"] + meta["colors"]:
            pieces = tok(word, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1 and pieces[0] != tok.unk_token_id:
                ids.append(pieces[0])
        loader = self._loader(self.data.valid, self.settings.micro_batch_size, shuffle=True, drop_last=True,
                              workers_mask=False, workers=0)
        self.engine.eval()
        try:
            with preserved_rng(), eager_forward(self.args.compile):
                limit = self.args.grounding_batches
                batches = (raw for i, raw in enumerate(loader) if limit is None or i < limit)
                counts = grounding_counts(lambda **kw: self.engine(**kw), batches, torch.tensor(ids),
                                          self.mask_cfg.mask_id, self.device, self.dtype)
        finally:
            self.engine.train()
        return grounding_result(counts)

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        from lxmert_fast.data.masking import draw_selection, mask_pretrain_batch, masked_counts, selection_counts

        args, engine = self.args, self.engine
        step, start_epoch = 0, 0
        if args.resume:
            step, start_epoch = self.restore()
        eval_every = args.eval_every if args.eval_every is not None else max(1, self.total_steps // 2)
        stop_at = min(self.total_steps, args.stop_at_step) if args.stop_at_step else self.total_steps
        # Without ZeRO and in fp32 DeepSpeed computes no gradient norm: measure it on logging steps.
        self.own_grad_norm = E.zero_stage_of(self.ds_config) == 0 and self.settings.precision == "fp32"
        self.last_grad_norm: Optional[float] = None
        self.streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_since_save = torch.zeros((), dtype=torch.int64, device=self.device)
        loss_names = ("total",) + LOSS_NAMES
        sums = torch.zeros(len(loss_names), dtype=torch.float64, device=self.device)
        interval = {"micro": 0, "steps": 0, "data_s": 0.0, "t0": time.perf_counter()}
        history: list[dict] = []
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not self.is_main or args.no_progress,
                        desc="pre-training", dynamic_ncols=True, mininterval=1.0)
        micro_in_epoch_cap = self.steps_per_epoch * self.accum
        last_eval: dict[str, float] = {}
        finished = step >= stop_at
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, self.epochs):
                if finished:
                    break
                self.train_loader.set_epoch(epoch)
                qa_on = epoch >= args.qa_from_epoch
                it = iter(self.train_loader)
                consumed = self.train_loader._consumed
                while consumed < micro_in_epoch_cap:
                    t_wait = time.perf_counter()
                    try:
                        raw = next(it)
                    except StopIteration:
                        break
                    interval["data_s"] += time.perf_counter() - t_wait
                    consumed += 1
                    if args.mask_on == "device":
                        draws = draw_selection(raw, self.select_gen)
                        counts = selection_counts(raw, draws, self.mask_cfg)
                        batch = mask_pretrain_batch(to_device({**raw, **draws}, self.device), self.mask_cfg,
                                                    self.mask_gen)
                    else:  # masked by the workers: the counts are on the host already
                        counts = masked_counts(raw)
                        batch = to_device(raw, self.device)
                    if not qa_on and "ans" in batch:
                        batch["ans"] = torch.full_like(batch["ans"], -100)
                    budget, fits = self._row_budget(batch, counts)
                    step_begins(args.compile)
                    with contextlib.nullcontext() if fits else eager_forward(args.compile):
                        out = engine(**model_inputs(batch, self.dtype), row_budget=budget)
                    loss = out.loss
                    if args.debug_nonfinite_from_step is not None and step + 1 >= args.debug_nonfinite_from_step:
                        loss = loss * float("nan")
                    engine.backward(loss)
                    if self.own_grad_norm and consumed % self.accum == 0 and (
                            (step + 1) % args.log_every == 0 or step + 1 == stop_at):
                        self.last_grad_norm = E.grad_norm(engine.module.parameters())  # before step() clips/zeroes
                    engine.step()
                    detached = loss.detach().to(torch.float64)
                    finite = torch.isfinite(detached)
                    vals = [detached] + [out.losses[n].detach().to(torch.float64) if n in out.losses
                                         else torch.zeros((), dtype=torch.float64, device=self.device)
                                         for n in LOSS_NAMES]
                    sums += torch.where(finite, torch.stack(vals), torch.zeros_like(sums))
                    interval["micro"] += 1
                    self.streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
                    self.bad_since_save += (~finite).to(torch.int64)
                    if consumed % self.accum:
                        continue
                    # ---- an optimizer step is complete
                    step += 1
                    interval["steps"] += 1
                    self.bar.update(1)
                    if self.device.type == "cpu" or step % args.log_every == 0:
                        self._check_nonfinite(step)
                    if step % args.log_every == 0 or step == stop_at:
                        row = self._log_interval(step, epoch, sums, loss_names, interval)
                        history.append(row)
                        sums.zero_()
                        interval.update(micro=0, steps=0, data_s=0.0, t0=time.perf_counter())
                    if eval_every and step % eval_every == 0 and step != self.total_steps:
                        last_eval = self._run_eval(step)
                    end_of_epoch = consumed >= micro_in_epoch_cap
                    if step == stop_at or (args.save_every and step % args.save_every == 0) or end_of_epoch:
                        if end_of_epoch:
                            sampler_state = dict(self.train_loader.state_dict(), epoch=epoch + 1, position=0)
                            self.save(step, epoch + 1, sampler_state)
                        else:
                            self.save(step, epoch, self.train_loader.state_dict())
                    if step >= stop_at:
                        finished = True
                        break
                del it
        finally:
            self.bar.close()
            self.bar = None
        result: dict[str, Any] = {"step": step, "history": history, "data_root": self.data.data_root}
        if step >= self.total_steps:
            last_eval = self._run_eval(step)
            result["eval"] = last_eval
            want_grounding = args.grounding_eval == "yes" or (args.grounding_eval == "auto" and self.data.is_demo)
            if want_grounding:
                g = self.grounding()
                if g is not None:
                    result["grounding"] = g
                    self.log("grounding (masked object/colour words of held-out captions): "
                             f"accuracy {g['word_acc_true_image']:.3f} with the true image vs "
                             f"{g['word_acc_shuffled_image']:.3f} with images shuffled across the batch "
                             f"({int(g['words_true'])} words); matching accuracy {g['matched_acc']:.3f} "
                             f"({int(g['matched_pairs'])} pairs)")
                    engine.monitor.write_events([(f"Grounding/{k}", v, step) for k, v in g.items()])
            if not args.no_export:
                export_dir = os.path.join(self.out_dir, "hf")
                E.export_hf(engine, lambda: __import__("lxmert_fast").LxmertForPreTraining(self.config), export_dir)
                if self.is_main and self.config.task_qa:
                    # the QA head's rows by answer, so fine-tuning copies the rows of shared answers
                    from lxmert_fast.model.task_heads import ANSWERS_FILE

                    E.atomic_write_json(os.path.join(export_dir, ANSWERS_FILE), list(self.data.index.answers))
                self.log(f"exported the model to {export_dir} (config.json + model.safetensors; "
                         f"transformers.LxmertForPreTraining.from_pretrained loads it)")
                result["export_dir"] = export_dir
        else:
            self.log(f"stopped at step {step} of {self.total_steps} (--stop_at_step); continue with --resume")
        if self.is_main:
            E.atomic_write_json(os.path.join(self.out_dir, "result.json"), result)
        return result

    def _row_budget(self, batch: dict, counts: tuple[int, int]) -> tuple[RowBudget, bool]:
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
        self.log(f"a batch masks {counts[0]} words and {counts[1]} objects, beyond the row budget "
                 f"({budget.words}, {budget.objects}): it runs with room for every row (exact; eager)")
        return RowBudget.full(batch_size, seq_len, num_objects), False

    def _run_eval(self, step: int) -> dict[str, float]:
        res = self.evaluate()
        if res:
            self.engine.monitor.write_events([(f"Valid/{k}", v, step) for k, v in res.items()])
            self.log(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        return res

    def _log_interval(self, step: int, epoch: int, sums: torch.Tensor, names, interval) -> dict:
        import torch.distributed as tdist

        counts = torch.cat([sums, torch.tensor([float(interval["micro"])], dtype=torch.float64, device=self.device)])
        if tdist.is_initialized() and self.world > 1:
            tdist.all_reduce(counts, op=tdist.ReduceOp.SUM)
        micro_total = max(counts[-1].item(), 1.0)
        means = {n: v / micro_total for n, v in zip(names, counts[:-1].tolist())}
        elapsed = max(time.perf_counter() - interval["t0"], 1e-9)
        samples = interval["steps"] * self.settings.train_batch_size
        sps = samples / elapsed
        tflops, mfu = throughput(sps, self.flops_per_sample, self.world, self.peak)
        grad_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (no ZeRO, fp32)
        grad_norm = float(grad_norm) if grad_norm is not None else self.last_grad_norm
        lr = self.engine.get_lr()[0]
        row = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, "samples_per_s": sps,
               "tflops": tflops, "mfu": mfu, "data_wait": interval["data_s"] / elapsed,
               **{f"loss_{n}": means[n] for n in names if n == "total" or n in self._active_losses()}}
        if self.settings.precision == "fp16":
            row["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        events = [(f"Train/loss/{n}", means[n], step) for n in names if n == "total" or n in self._active_losses()]
        if grad_norm is not None:
            events.append(("Train/grad_norm", grad_norm, step))
        events += [("Train/lr", lr, step), ("Train/samples_per_s", sps, step),
                   ("Train/data_wait_share", row["data_wait"], step), ("Train/tflops_per_device", tflops, step)]
        if mfu is not None:
            events.append(("Train/mfu", mfu, step))
        self.engine.monitor.write_events(events)
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        tf_s = f"{tflops:.3f}"
        self.log(
            f"step {step}/{self.total_steps} ep {epoch} | loss {means['total']:.4f} ("
            + " ".join(f"{n} {means[n]:.3f}" for n in LOSS_NAMES if n in self._active_losses())
            + f") | lr {lr:.2e} | gnorm {'n/a' if grad_norm is None else f'{grad_norm:.3f}'} | {sps:.1f} samples/s | TFLOP/s {tf_s} | MFU {mfu_s}"
            f" | data wait {100 * row['data_wait']:.1f}%"
        )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means['total']:.3f}", refresh=False)
        return row

    def _active_losses(self) -> tuple[str, ...]:
        c = self.config
        active = []
        if c.task_mask_lm:
            active.append("mlm")
        if c.task_matched:
            active.append("matched")
        if c.task_obj_predict:
            active += list(c.visual_losses)
        if c.task_qa:
            active.append("qa")
        return tuple(active)


def _data_errors() -> tuple[type, ...]:
    from lxmert_fast.config import ConfigError
    from lxmert_fast.data.formats import DataFormatError
    from lxmert_fast.data.store import StoreError
    from lxmert_fast.model.convert import CheckpointError

    return (ConfigError, DataFormatError, StoreError, CheckpointError)


def _report(err: BaseException) -> None:
    """The error on rank 0 (every rank reaches the same decision; one message is enough)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {err}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        trainer = Trainer(args)
        trainer.setup()
        trainer.train()
    except E.TrainingError as err:
        _report(err)
        return 3
    except (UsageError, E.DSConfigError, FileNotFoundError) + _data_errors() as err:
        _report(err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
