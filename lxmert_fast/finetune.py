"""Fine-tune LXMERT on VQA, GQA or NLVR2 with DeepSpeed, and write submission files.

    deepspeed lxmert_fast/finetune.py --task vqa --data_root data --load snap/pretrained/Epoch20_LXRT.pth \\
        --deepspeed_config ds_configs/finetune_zero2.json --output_dir runs/vqa
    deepspeed lxmert_fast/finetune.py --task vqa --data_root data --load runs/vqa/best --test test
    python -m lxmert_fast.finetune --task nlvr2 --load runs/pretrain      # the demo world, on a CPU

Data in the original layout (see lxmert_fast/data/tasks.py); without --data_root the demo world
(generated on first use under --cache_dir). Defaults as the paper: batch 32, 4 epochs, lr 5e-5
(VQA, NLVR2) / 1e-5 (GQA), warmup 10% then linear decay, gradient clipping 5.0. The DeepSpeed
config owns batch size, precision, optimizer, schedule, clipping and ZeRO; the flags fill its
"auto" entries (ds_configs/finetune_*.json are all "auto") and a flag that contradicts a value the
config fixes is an error. Each epoch ends with an evaluation on --valid; the best model is kept in
<output_dir>/best (an HF directory + answers.json), the last in <output_dir>/last; at the end the
best model is evaluated again and predictions of --valid and --test are written in the official
formats (<split>_predict.json / .csv). With --test and no --train: prediction only, from --load.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (`deepspeed lxmert_fast/finetune.py`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lxmert_fast.engine import select_accelerator  # noqa: E402

select_accelerator()  # DS_ACCELERATOR=cpu without a GPU, before DeepSpeed is imported anywhere

import torch  # noqa: E402

from lxmert_fast import engine as E  # noqa: E402
from lxmert_fast.config import LxmertConfig  # noqa: E402
from lxmert_fast.data.demo import DEFAULT_OBJECTS, add_demo_objects_argument  # noqa: E402
from lxmert_fast.data import tasks as T  # noqa: E402
from lxmert_fast.model import task_heads as H  # noqa: E402
from lxmert_fast.train.compile import (COMPILE_MODES, CompileModeError, check_compile_mode,  # noqa: E402
                                       compile_model, eager_forward, step_begins)

DEFAULT_CACHE = os.environ.get("LXMERT_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lxmert_fast"))
DEFAULTS = {"batch_size": 32, "epochs": 4, "warmup_ratio": 0.1, "grad_clip": 5.0}


class UsageError(ValueError):
    """A bad command line or a data/model mismatch found before training starts."""


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune LXMERT on VQA / GQA / NLVR2 with DeepSpeed (demo world by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=T.TASK_NAMES, help="the fine-tuning task")
    d = p.add_argument_group("data")
    d.add_argument("--data_root", default=None,
                   help="the original data/ folder (vqa/, gqa/, nlvr2/, *_imgfeat/); none = the demo world")
    d.add_argument("--train", default=None,
                   help="training splits (default: vqa train,nominival; gqa train,valid; nlvr2 train; "
                        "none when --test is given); '' = no training")
    d.add_argument("--valid", default=None,
                   help="evaluation split(s) (default: vqa minival; gqa testdev; nlvr2 valid; none when only "
                        "predicting); '' = none")
    d.add_argument("--test", default=None,
                   help="splits to predict (comma list); scored too when labelled. Without --train: no training")
    d.add_argument("--features", default=None,
                   help="feature files for splits the defaults do not know: SPLIT=PATH[,SPLIT=PATH]")
    d.add_argument("--vocab", default=None, help="vocab.txt or tokenizer dir (default <data_root>/vocab.txt)")
    d.add_argument("--store_dir", default=None,
                   help="where converted feature stores go (default <data_root>/lxmert_fast)")
    d.add_argument("--cache_dir", default=DEFAULT_CACHE, help="the demo world's home")
    d.add_argument("--demo_images", type=int, default=2000, help="images of the demo world")
    add_demo_objects_argument(d)
    d.add_argument("--skip_bad", action="store_true", help="skip (and report) malformed records instead of failing")
    d.add_argument("--num_workers", type=int, default=None, help="loader workers per process (default 0 on CPU, 4 on GPU)")

    m = p.add_argument_group("model")
    m.add_argument("--load", default=None,
                   help="initial weights: our pre-training output dir / export / DeepSpeed checkpoint, an HF directory "
                        "(lxmert-base-uncased, lxmert-vqa/gqa-uncased), the original Epoch20_LXRT.pth, or a "
                        "fine-tuned <output_dir>/best. None = random initialisation")
    m.add_argument("--load_answers", default=None,
                   help="the answer table of --load's QA head (all_ans.json, label2ans or ans2label); default: found "
                        "beside the checkpoint or <data_root>/lxmert/all_ans.json")
    m.add_argument("--head_unmatched", choices=("init", "zero"), default="init",
                   help="answer rows the checkpoint's QA head lacks: fresh init, or zeros (the original code)")
    m.add_argument("--model", choices=("base", "small", "tiny"), default=None,
                   help="size preset without --load (default: small on the demo world, base otherwise)")
    m.add_argument("--model_config", default=None, help="a config.json for random init, or for reading --load")
    m.add_argument("--attention_backend", default=None, help="override the attention backend (eager, sdpa, auto...)")
    m.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the model's forward and backward as whole static graphs while training "
                        "(reduce-overhead: with CUDA graphs, GPU only); none = eager")
    m.add_argument("--gqa_loss", choices=("ce", "bce"), default="ce",
                   help="GQA: cross-entropy on the top answer, or VQA's BCE x answers (the released default)")

    r = p.add_argument_group("optimisation (fill the DeepSpeed config's \"auto\" entries)")
    r.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    r.add_argument("--batch_size", type=int, default=None, help=f"total batch (default {DEFAULTS['batch_size']})")
    r.add_argument("--micro_batch_size", type=int, default=None, help="per-device micro batch (default: batch / world)")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5 VQA/NLVR2, 1e-5 GQA)")
    r.add_argument("--warmup_ratio", type=float, default=None, help=f"default {DEFAULTS['warmup_ratio']}")
    r.add_argument("--grad_clip", type=float, default=None, help=f"default {DEFAULTS['grad_clip']}")
    r.add_argument("--max_steps", type=int, default=None, help="cap the optimizer steps (the schedule's length)")

    o = p.add_argument_group("run")
    o.add_argument("--output_dir", "--output", default=None, help="default runs/<task>")
    o.add_argument("--seed", type=int, default=9595)
    o.add_argument("--log_every", type=int, default=50)
    o.add_argument("--eval_batch_size", type=int, default=None, help="default 2 x micro batch")
    o.add_argument("--cpu_threads", type=int, default=None,
                   help="torch threads on CPU (1 is far faster on a CPU shared with other jobs)")
    o.add_argument("--no_progress", action="store_true")
    o.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    import deepspeed

    deepspeed.add_config_arguments(p)
    return p


# ---------------------------------------------------------------------------------------------- DeepSpeed config
def default_ds_config_path() -> str:
    name = "finetune_zero2.json" if torch.cuda.is_available() else "finetune_cpu.json"
    return os.path.join(E.DS_CONFIG_DIR, name)


def fill_finetune_config(cfg: dict, *, lr: float, batch_size: int, grad_clip: float, explicit: set[str]) -> dict:
    """Fill the "auto" lr / gradient_clipping / train_batch_size; a flag given against a fixed value is an error."""
    import copy

    cfg = copy.deepcopy(cfg)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for flag, holder, key, value in (("--lr", params, "lr", lr), ("--grad_clip", cfg, "gradient_clipping", grad_clip),
                                     ("--batch_size", cfg, "train_batch_size", batch_size)):
        cur = holder.get(key, E.AUTO)
        if cur is None or cur == E.AUTO:
            holder[key] = value
        elif flag in explicit and float(cur) != float(value):
            where = "optimizer.params.lr" if key == "lr" else key
            raise E.DSConfigError(f"{flag} {value:g} contradicts the DeepSpeed config's {where} = {cur}; "
                                  f"set it to \"auto\" there or drop the flag")
    return cfg


# ---------------------------------------------------------------------------------------------- helpers
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@contextlib.contextmanager
def preserved_cpu_rng():
    """DataLoader iterators draw their base seed from the global RNG: keep that from shifting dropout."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _fmt_metrics(res: dict) -> str:
    parts = []
    for k, v in res.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
        elif isinstance(v, dict) and k == "per_type":
            parts.append("(" + ", ".join(f"{t} {s:.4f}" for t, s in v.items()) + ")")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- the job
class FineTuner:
    def __init__(self, args):
        self.args = args
        self.spec = T.task_spec(args.task)
        self.rank, self.world, self.device = E.init_distributed()
        self.is_main = self.rank == 0
        self.bar = None
        if self.device.type == "cpu" and args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)

    def log(self, msg: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    # -- data -----------------------------------------------------------------------------------
    def _data_root(self) -> tuple[str, bool]:
        if self.args.data_root is not None:
            if self.args.demo_objects is not None:
                raise UsageError("--demo_objects shapes the demo world; it does not apply with --data_root")
            root = os.path.abspath(self.args.data_root)
            if not os.path.isdir(root):
                raise UsageError(f"--data_root {root}: no such directory")
            return root, False
        from lxmert_fast.data.demo import ensure_demo_data

        root = None
        if self.is_main:
            root = ensure_demo_data(self.args.cache_dir, images=self.args.demo_images, seed=0, log=self.log,
                                   objects=self.args.demo_objects or DEFAULT_OBJECTS)
        return E.broadcast_object(root), True

    def setup_data(self) -> None:
        from lxmert_fast.data.tokenization import load_tokenizer

        args, spec = self.args, self.spec
        self.data_root, self.is_demo = self._data_root()
        explicit_test = args.test is not None and args.test.strip() != ""
        train = args.train if args.train is not None else ("" if explicit_test else spec.train)
        # Prediction only (--test, no training): evaluate --valid only when it is asked for.
        valid = args.valid if args.valid is not None else (spec.valid if train else "")
        self.train_splits, self.valid_splits = T.split_list(train), T.split_list(valid)
        self.test_splits = T.split_list(args.test or "")
        vocab = args.vocab or os.path.join(self.data_root, "vocab.txt")
        if not os.path.exists(vocab):
            raise UsageError(f"vocab {vocab}: not found (the WordPiece vocab: bert-base-uncased's vocab.txt for the "
                             f"real data; --vocab)")
        self.tokenizer = load_tokenizer(vocab)
        self.vocab = vocab
        self.answers = T.TaskAnswers.load(os.path.join(self.data_root, spec.name)) if spec.kind == "qa" else None
        store_root = args.store_dir or os.path.join(self.data_root, "lxmert_fast")
        overrides = T.parse_feature_overrides(args.features)
        self.train_ds = self.valid_ds = None
        self.test_ds: dict[str, T.TaskDataset] = {}
        # Rank 0 converts the feature files first; the others then open the stores.
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                mk = lambda splits, label: T.build_task_dataset(  # noqa: E731
                    spec, self.data_root, splits, tokenizer=self.tokenizer, answers=self.answers,
                    store_root=store_root, require_label=label, feature_overrides=overrides, skip_bad=args.skip_bad,
                    log=self.log if self.is_main else None)
                if self.train_splits:
                    self.train_ds = mk(self.train_splits, True)
                if self.valid_splits:
                    self.valid_ds = mk(self.valid_splits, True)
                for s in self.test_splits:
                    self.test_ds[s] = mk([s], False)
            E.barrier()
        any_ds = self.train_ds or self.valid_ds or next(iter(self.test_ds.values()), None)
        if any_ds is None:
            raise UsageError("nothing to do: no --train, --valid or --test split")
        self.feat_dim = any_ds.feat_dim
        sizes = []
        for name, ds in (("train", self.train_ds), ("valid", self.valid_ds), *self.test_ds.items()):
            if ds is not None:
                sizes.append(f"{name} {','.join(ds.examples.splits)} {len(ds)}")
        self.log(f"{spec.name} data {self.data_root}{' (demo world)' if self.is_demo else ''}: " + "; ".join(sizes)
                 + (f"; {len(self.answers)} answers" if self.answers is not None else ""))

    # -- model ----------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        args = self.args
        num_answers = len(self.answers) if self.answers is not None else None
        given = LxmertConfig.from_json(args.model_config) if args.model_config else None
        vocab_size = len(self.tokenizer)
        self.load_info: dict[str, Any] = {}
        if args.load:
            ckpt = H.read_task_checkpoint(args.load, config=given, log=self.log)
            config = ckpt.config
            if args.attention_backend:
                config = config.replace(attention_backend=args.attention_backend)
            H.check_config_fits(config, vocab_size=vocab_size, feat_dim=self.feat_dim, source=ckpt.path)
            model = H.build_task_model(args.task, config, num_answers)
            head_answers, where = (None, "")
            if args.task != "nlvr2" and ckpt.qa_rows is not None:
                head_answers, where = H.find_head_answers(ckpt, load_answers=args.load_answers,
                                                          data_root=self.data_root)
            self.load_info = H.load_task_weights(
                args.task, model, ckpt, task_answers=self.answers.label2ans if self.answers else None,
                head_answers=head_answers, head_answers_source=where, unmatched=args.head_unmatched, log=self.log)
        else:
            if given is not None:
                config = given
            else:
                from lxmert_fast.data.formats import DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES

                preset = args.model or ("small" if self.is_demo else "base")
                config = LxmertConfig.preset(preset, vocab_size=vocab_size, visual_feat_dim=self.feat_dim,
                                             num_object_labels=DEFAULT_NUM_OBJ_CLASSES,
                                             num_attr_labels=DEFAULT_NUM_ATTR_CLASSES,
                                             max_position_embeddings=512)
            if args.attention_backend:
                config = config.replace(attention_backend=args.attention_backend)
            H.check_config_fits(config, vocab_size=vocab_size, feat_dim=self.feat_dim,
                                source=args.model_config or "the model preset")
            model = H.build_task_model(args.task, config, num_answers)
            self.load_info = {"kind": "random init"}
            self.log("no --load: the model starts from random weights")
        self.config = model.config
        return model

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        args, spec = self.args, self.spec
        try:
            check_compile_mode(args.compile, self.device)  # before any data work; ZeRO-3 is checked below
        except CompileModeError as err:
            raise UsageError(str(err)) from None
        E.seed_everything(args.seed)
        self.out_dir = os.path.abspath(args.output_dir or os.path.join("runs", spec.name))
        self.setup_data()
        E.seed_everything(args.seed)
        self.model = self.build_model()
        self.engine = None
        self.train_loader = None
        if self.train_ds is None:
            return
        ds_path = args.deepspeed_config or default_ds_config_path()
        raw = E.load_ds_config(ds_path)
        explicit = {f for f, v in (("--lr", args.lr), ("--grad_clip", args.grad_clip), ("--batch_size", args.batch_size))
                    if v is not None}
        raw = fill_finetune_config(
            raw, lr=args.lr if args.lr is not None else spec.lr,
            batch_size=args.batch_size if args.batch_size is not None else DEFAULTS["batch_size"],
            grad_clip=args.grad_clip if args.grad_clip is not None else DEFAULTS["grad_clip"], explicit=explicit)
        _, micro, accum = E.resolve_batch_size(raw, self.world, args.micro_batch_size)
        self.train_loader, self.train_sampler = T.make_task_loader(
            self.train_ds, micro, rank=self.rank, world_size=self.world, seed=args.seed, shuffle=True, drop_last=True,
            num_workers=self._workers())
        self.accum = accum
        self.steps_per_epoch = len(self.train_loader) // accum
        if self.steps_per_epoch == 0:
            raise UsageError(f"the training set ({len(self.train_ds)} examples) is smaller than one optimizer step "
                             f"({micro} x {accum} x {self.world})")
        self.epochs = args.epochs if args.epochs is not None else DEFAULTS["epochs"]
        self.total_steps = self.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
            self.epochs = min(self.epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        warmup = args.warmup_ratio if args.warmup_ratio is not None else DEFAULTS["warmup_ratio"]
        self.ds_config = E.prepare_ds_config(raw, world_size=self.world, total_steps=self.total_steps,
                                             output_dir=self.out_dir, micro_batch_size=args.micro_batch_size,
                                             warmup_ratio=warmup, job_name=f"finetune_{spec.name}")
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            E.atomic_write_json(os.path.join(self.out_dir, "ds_config.json"), self.ds_config)
        try:
            check_compile_mode(args.compile, self.device, E.zero_stage_of(self.ds_config))
        except CompileModeError as err:
            raise UsageError(str(err)) from None
        compile_model(self.model, args.compile)
        self.engine = E.initialize(self.model, self.ds_config)
        self.settings = E.optim_settings(self.engine)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.settings.precision, torch.float32)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model {n_params / 1e6:.2f}M parameters (hidden {self.config.hidden_size}, layers "
                 f"l{self.config.l_layers}/x{self.config.x_layers}/r{self.config.r_layers}); {self.world} process(es) "
                 f"on {self.device}")
        self.log(f"DeepSpeed ({ds_path}): {self.settings.describe()}")
        self.log(f"schedule: {self.epochs} epoch(s) x {self.steps_per_epoch} steps, {self.total_steps} steps; "
                 f"warmup {warmup:g}")

    def _workers(self) -> int:
        if self.args.num_workers is not None:
            return self.args.num_workers
        return 4 if self.device.type == "cuda" else 0

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, dataset: T.TaskDataset, dtype: torch.dtype) -> dict:
        """{example id: prediction} over the whole split (sharded over ranks, gathered)."""
        bs = self.args.eval_batch_size or 2 * (self.settings.micro_batch_size if self.engine is not None
                                               else (self.args.micro_batch_size or DEFAULTS["batch_size"]))
        loader, _ = T.make_task_loader(dataset, bs, rank=self.rank, world_size=self.world, shuffle=False,
                                       drop_last=False, num_workers=0)
        by_row: dict[int, int] = {}
        was_training = model.training
        model.eval()
        try:
            with preserved_cpu_rng(), eager_forward(self.args.compile):
                for batch in loader:
                    batch = to_device(batch, self.device)
                    logits = H.task_logits(self.spec.name, model, batch, dtype)
                    for r, k in zip(batch["index"].tolist(), logits.argmax(-1).tolist()):
                        by_row[r] = k
        finally:
            model.train(was_training)
        merged: dict[int, int] = {}
        for part in E.all_gather_object(by_row):
            merged.update(part)
        return dataset.predictions_from(merged)

    def evaluate(self, model, dataset: T.TaskDataset, dtype: torch.dtype) -> tuple[dict, dict]:
        preds = self.predict(model, dataset, dtype)
        return T.evaluate(self.spec.name, preds, dataset.examples), preds

    def majority(self) -> dict:
        if self.train_ds is None or self.valid_ds is None:
            return {}
        preds = T.majority_predictions(self.spec.name, self.train_ds.examples, self.valid_ds.examples)
        return T.evaluate(self.spec.name, preds, self.valid_ds.examples)

    # -- saving ---------------------------------------------------------------------------------
    def save(self, name: str, extra: dict) -> Optional[str]:
        """Collective: the engine's full fp32 weights -> <output_dir>/<name> on rank 0."""
        state = E.full_fp32_state_dict(self.engine)
        path = os.path.join(self.out_dir, name)
        if self.is_main:
            cpu = H.build_task_model(self.spec.name, self.config, len(self.answers) if self.answers else None)
            cpu.load_state_dict(state, strict=True)
            H.save_task_model(cpu, path, answers=self.answers.label2ans if self.answers else None,
                              extra={"task": self.spec.name, **extra})
        E.barrier()
        return path

    def load_saved(self, path: str) -> torch.nn.Module:
        ckpt = H.read_task_checkpoint(path)
        model = H.build_task_model(self.spec.name, ckpt.config, len(self.answers) if self.answers else None)
        H.load_task_weights(self.spec.name, model, ckpt, task_answers=self.answers.label2ans if self.answers else None,
                            head_answers=self.answers.label2ans if self.answers else None,
                            head_answers_source=path, log=lambda m: None)
        return model

    # -- training -------------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        args, spec, engine = self.args, self.spec, self.engine
        metric = T.MAIN_METRIC[spec.name]
        history: list[dict] = []
        best: dict[str, Any] = {"epoch": None, metric: -1.0}
        majority = self.majority()
        if majority:
            self.log(f"majority-answer baseline on {','.join(self.valid_ds.examples.splits)}: {_fmt_metrics(majority)}")
        step = 0
        train_time = 0.0
        trained_samples = 0
        self.bar = tqdm(total=self.total_steps, disable=not self.is_main or args.no_progress, desc=f"fine-tune {spec.name}",
                        dynamic_ncols=True, mininterval=1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_n = 0
        interval_t0, interval_steps = time.perf_counter(), 0
        try:
            for epoch in range(self.epochs):
                if step >= self.total_steps:
                    break
                self.train_sampler.set_epoch(epoch)
                epoch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                epoch_micro = 0
                t_epoch = time.perf_counter()
                with preserved_cpu_rng():
                    it = iter(self.train_loader)
                micro = 0
                cap = self.steps_per_epoch * self.accum
                for batch in it:
                    if micro >= cap:
                        break
                    batch = to_device(batch, self.device)
                    step_begins(args.compile)
                    logits = H.task_logits(spec.name, engine, batch, self.dtype)
                    loss = H.task_loss(spec.name, logits, batch, args.gqa_loss)
                    engine.backward(loss)
                    engine.step()
                    micro += 1
                    d = loss.detach().double()
                    loss_sum += d
                    epoch_loss += d
                    loss_n += 1
                    epoch_micro += 1
                    if micro % self.accum:
                        continue
                    step += 1
                    interval_steps += 1
                    self.bar.update(1)
                    if step % args.log_every == 0 or step == self.total_steps:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - interval_t0
                        sps = interval_steps * self.settings.train_batch_size / max(elapsed, 1e-9)
                        mean = (loss_sum / max(loss_n, 1)).item()
                        E.finite_or_raise(mean, f"the training loss at step {step}")
                        lr = engine.get_lr()[0]
                        self.log(f"step {step}/{self.total_steps} ep {epoch} | loss {mean:.4f} | lr {lr:.2e} | "
                                 f"{sps:.1f} samples/s")
                        engine.monitor.write_events([("Train/loss", mean, step), ("Train/lr", lr, step),
                                                     ("Train/samples_per_s", sps, step)])
                        loss_sum.zero_()
                        loss_n = 0
                        interval_t0, interval_steps = time.perf_counter(), 0
                    if step >= self.total_steps:
                        break
                del it
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                train_time += time.perf_counter() - t_epoch
                trained_samples += epoch_micro * self.settings.micro_batch_size * self.world
                row: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                       "train_loss": (epoch_loss / max(epoch_micro, 1)).item()}
                if self.valid_ds is not None:
                    res, _ = self.evaluate(engine, self.valid_ds, self.dtype)
                    row["valid"] = res
                    engine.monitor.write_events([(f"Valid/{k}", v, step) for k, v in res.items()
                                                 if isinstance(v, float)])
                    improved = res.get(metric, -1.0) > best[metric]
                    self.log(f"epoch {epoch + 1}/{self.epochs}: train loss {row['train_loss']:.4f} | valid "
                             f"{_fmt_metrics(res)}{' | best so far' if improved else ''}")
                    if improved:
                        best = {"epoch": epoch + 1, metric: res[metric], "valid": res}
                        self.save("best", {"epoch": epoch + 1, "step": step, "valid": res})
                else:
                    self.log(f"epoch {epoch + 1}/{self.epochs}: train loss {row['train_loss']:.4f}")
                history.append(row)
                interval_t0 = time.perf_counter()
        finally:
            self.bar.close()
            self.bar = None
        self.save("last", {"epoch": len(history), "step": step})
        sps = trained_samples / max(train_time, 1e-9)
        self.log(f"fine-tuning: {step} steps, {trained_samples} samples in {train_time:.1f} s of training "
                 f"(evaluation excluded): {sps:.1f} samples/s")
        return {"history": history, "best": best, "majority": majority, "steps": step,
                "train_samples": trained_samples, "train_seconds": train_time, "train_samples_per_s": sps}

    # -- the end ----------------------------------------------------------------------------------
    def final(self, result: dict) -> dict:
        """Evaluate the best (else the last / loaded) model on --valid and --test; write predictions."""
        spec = self.spec
        if self.engine is not None:
            best_dir = os.path.join(self.out_dir, "best")
            source = best_dir if os.path.isdir(best_dir) else os.path.join(self.out_dir, "last")
            model = self.load_saved(source)
            dtype = self.dtype
        else:
            source = self.args.load or "random init"
            model = self.model
            dtype = torch.float32
            if self.device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        model = model.to(self.device, dtype=dtype)
        final: dict[str, Any] = {}
        files: dict[str, str] = {}
        splits: list[tuple[str, T.TaskDataset]] = []
        if self.valid_ds is not None:
            splits.append((",".join(self.valid_ds.examples.splits), self.valid_ds))
        splits += [(name, ds) for name, ds in self.test_ds.items() if name not in dict(splits)]
        for name, ds in splits:
            res, preds = self.evaluate(model, ds, dtype)
            if self.is_main:
                path = os.path.join(self.out_dir, T.prediction_file_name(spec.name, name.replace(",", "+")))
                files[name] = T.write_predictions(spec.name, path, preds)
            final[name] = res
            self.log(f"{source}: {spec.name} {name}: " + (_fmt_metrics(res) if res else "unlabelled")
                     + f"; predictions -> {files.get(name, '(rank 0)')}")
        result.update({"final": final, "final_model": source, "predictions": files})
        return result

    def run(self) -> dict:
        result: dict[str, Any] = {"task": self.spec.name, "load": self.args.load, "load_info": self.load_info,
                                  "data_root": self.data_root, "output_dir": self.out_dir}
        if self.engine is not None:
            result.update(self.train())
            result["settings"] = vars(self.settings)
        result = self.final(result)
        if self.is_main:
            E.atomic_write_json(os.path.join(self.out_dir, "result.json"), result)
        E.barrier()
        return result


def _errors() -> tuple[type, ...]:
    from lxmert_fast.config import ConfigError
    from lxmert_fast.data.formats import DataFormatError
    from lxmert_fast.data.store import StoreError
    from lxmert_fast.model.convert import CheckpointError

    return (UsageError, E.DSConfigError, FileNotFoundError, ConfigError, DataFormatError, StoreError,
            CheckpointError, T.TaskDataError)


def run(argv: Optional[list[str]] = None) -> dict:
    """Parse, set up, train/evaluate; returns the result dict (raises on errors). For in-process use."""
    args = build_parser().parse_args(argv)
    ft = FineTuner(args)
    ft.setup()
    return ft.run()


def main(argv: Optional[list[str]] = None) -> int:
    try:
        run(argv)
    except E.TrainingError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except _errors() as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
