"""Fine-tune LXMERT on VQA, GQA or NLVR2: the recipe (data, model, loss, evaluation) on the shared runtime.

    deepspeed lxmert_fast/finetune.py --task vqa --data_root data --load snap/pretrained/Epoch20_LXRT.pth \\
        --deepspeed_config finetune_zero2.json --output_dir runs/vqa
    deepspeed lxmert_fast/finetune.py --task vqa --data_root data --load runs/vqa/best --test test
    python -m lxmert_fast.finetune --task nlvr2 --load runs/pretrain      # the demo world, on a CPU

Data in the original layout (see lxmert_fast/data/tasks.py); without --data_root the demo world
(generated on first use under --cache_dir). Defaults as the paper: batch 32, 4 epochs, lr 5e-5
(VQA, NLVR2) / 1e-5 (GQA), warmup 10% then linear decay, gradient clipping 5.0. The DeepSpeed
config owns batch size, precision, optimizer, schedule, clipping and ZeRO; the flags fill its
"auto" entries (the packaged finetune_*.json are all "auto") and a flag that contradicts a value the
config fixes is an error. Each epoch ends with an evaluation on --valid; the best model is kept in
<output_dir>/best (an HF directory + answers.json), the last in <output_dir>/last; checkpoints in
<output_dir>/checkpoints resume exactly (--resume). At the end the best model is evaluated again and
predictions of --valid and --test are written in the official formats (<split>_predict.json /
.csv). With --test and no --train: prediction only, from --load.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file (`deepspeed lxmert_fast/finetune.py`): find the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lxmert_fast.checkpoints import task as task_checkpoints  # noqa: E402
from lxmert_fast.checkpoints.export import full_fp32_state_dict  # noqa: E402
from lxmert_fast.config import LxmertConfig  # noqa: E402
from lxmert_fast.data import tasks as tasks_data  # noqa: E402
from lxmert_fast.data.demo import add_demo_objects_argument, jobs_demo_objects  # noqa: E402
from lxmert_fast.data.formats import DEFAULT_NUM_ATTR_CLASSES, DEFAULT_NUM_OBJ_CLASSES  # noqa: E402
from lxmert_fast.data.layouts import FORMAT_CHOICES as FEATURE_FORMATS  # noqa: E402
from lxmert_fast.data.tokenization import load_tokenizer  # noqa: E402
from lxmert_fast.flops import flop_breakdown  # noqa: E402
from lxmert_fast.model import task_heads  # noqa: E402
from lxmert_fast.train.ds_config import fill_from_flags  # noqa: E402
from lxmert_fast.train.entry import run_job  # noqa: E402
from lxmert_fast.train.process import all_gather_object, barrier, select_accelerator  # noqa: E402
from lxmert_fast.train.rng import preserved_rng  # noqa: E402
from lxmert_fast.train.runtime import (Recipe, Trainer, UsageError, add_runtime_arguments,  # noqa: E402
                                       default_cache_dir)

DEFAULTS = {"batch_size": 32, "epochs": 4, "warmup_ratio": 0.1, "grad_clip": 5.0}
# On the demo world (no --data_root) the demo model (hidden 64) learns from a few thousand examples: a higher lr and
# more epochs than the paper's, so that the README's example ends well above the majority answer in minutes.
DEMO_DEFAULTS = {"lr": 1e-3, "epochs": 20}

__all__ = ["build_parser", "FinetuneRecipe", "UsageError", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune LXMERT on VQA / GQA / NLVR2 with DeepSpeed (demo world by default).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=tasks_data.TASK_NAMES, help="the fine-tuning task")
    _add_data_arguments(p)
    _add_model_arguments(p)
    _add_optimisation_arguments(p)
    add_runtime_arguments(p, save_every=0, log_every=50)
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data: the real data or the demo world, splits, feature sources, the store root, loading."""

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
                   help="feature files for splits the defaults do not know: SPLIT=PATH[,SPLIT=PATH] (a TSV or a "
                        "source of another layout: docs/data.md)")
    d.add_argument("--features_format", default="auto", choices=FEATURE_FORMATS,
                   help="the feature files' layout (auto: detected from the files)")
    d.add_argument("--features_map", default=None,
                   help="JSON map from a non-TSV layout's image ids to the text files' ids (docs/data.md)")
    d.add_argument("--vocab", default=None, help="vocab.txt or tokenizer dir (default <data_root>/vocab.txt)")
    d.add_argument("--store_dir", default=None,
                   help="the store root: one converted store per feature file, found again by its content "
                        "and shared with pre-training (default <data_root>/lxmert_fast, pre-training's default; "
                        "after pre-training with --store_in_cache: <cache_dir>/stores/<root name>-<hash>)")
    d.add_argument("--cache_dir", default=default_cache_dir(), help="the demo world's home")
    d.add_argument("--demo_images", type=int, default=2000, help="images of the demo world")
    add_demo_objects_argument(d)
    d.add_argument("--skip_bad", action="store_true", help="skip (and report) malformed records instead of failing")
    d.add_argument("--num_workers", type=int, default=None, help="loader workers per process (default 0 on CPU, 4 on GPU)")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model: initial weights and their answer table, the QA head, size, attention, the GQA loss."""
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
    m.add_argument("--gqa_loss", choices=("ce", "bce"), default="ce",
                   help="GQA: cross-entropy on the top answer, or VQA's BCE x answers (the released default)")


def _add_optimisation_arguments(p: argparse.ArgumentParser) -> None:
    """The values that fill the DeepSpeed config's "auto" entries."""
    o = p.add_argument_group("optimisation (fill the DeepSpeed config's \"auto\" entries)")
    o.add_argument("--batch_size", type=int, default=None, help=f"total batch (default {DEFAULTS['batch_size']})")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default 5e-5 VQA/NLVR2, 1e-5 GQA; {DEMO_DEFAULTS['lr']:g} on the demo "
                        f"world)")
    o.add_argument("--grad_clip", type=float, default=None, help=f"default {DEFAULTS['grad_clip']}")
    o.add_argument("--eval_batch_size", type=int, default=None, help="default 2 x micro batch")


def _fmt_metrics(res: dict) -> str:
    parts = []
    for k, v in res.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
        elif isinstance(v, dict) and k == "per_type":
            parts.append("(" + ", ".join(f"{t} {s:.4f}" for t, s in v.items()) + ")")
    return " ".join(parts)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class FinetuneRecipe(Recipe):
    job = "finetune"
    eval_at_epoch_end = True
    outputs = ("best", "last", "result.json", "ds_config.json")

    def __init__(self, args):
        self.args = args
        self.spec = tasks_data.task_spec(args.task)
        self.job_name = f"finetune_{self.spec.name}"
        self.metric = tasks_data.MAIN_METRIC[self.spec.name]
        self.best: dict[str, Any] = {"epoch": None, self.metric: -1.0}
        self.history: list[dict] = []
        if args.output_dir is None:
            args.output_dir = os.path.join("runs", self.spec.name)

    # -- data ---------------------------------------------------------------------------------------
    def build_data(self, trainer: Trainer, micro_batch_size: int, accumulation: int) -> None:
        args, spec = self.args, self.spec
        demo_objects = jobs_demo_objects(args.demo_objects, args.data_root)  # the world pre-training used
        self.data_root, self.is_demo = trainer.data_root(args.data_root, cache_dir=args.cache_dir,
                                                         demo_images=args.demo_images, demo_objects=demo_objects)
        explicit_test = args.test is not None and args.test.strip() != ""
        train = args.train if args.train is not None else ("" if explicit_test else spec.train)
        # Prediction only (--test, no training): evaluate --valid only when it is asked for.
        valid = args.valid if args.valid is not None else (spec.valid if train else "")
        self.train_splits, self.valid_splits = tasks_data.split_list(train), tasks_data.split_list(valid)
        self.test_splits = tasks_data.split_list(args.test or "")
        vocab = args.vocab or os.path.join(self.data_root, "vocab.txt")
        if not os.path.exists(vocab):
            raise UsageError(f"vocab {vocab}: not found (the WordPiece vocab: bert-base-uncased's vocab.txt for the "
                             f"real data; --vocab)")
        self.tokenizer = load_tokenizer(vocab)
        self.answers = tasks_data.TaskAnswers.load(os.path.join(self.data_root, spec.name)) \
            if spec.kind == "qa" else None
        store_root = args.store_dir or os.path.join(self.data_root, "lxmert_fast")
        overrides = tasks_data.parse_feature_overrides(args.features)
        log = trainer.log if trainer.is_main else None

        def build():  # rank 0 converts the feature files first; the others then open the stores
            mk = lambda splits, label: tasks_data.build_task_dataset(  # noqa: E731
                spec, self.data_root, splits, tokenizer=self.tokenizer, answers=self.answers, store_root=store_root,
                require_label=label, feature_overrides=overrides, skip_bad=args.skip_bad, log=log,
                features_format=args.features_format, features_map=args.features_map)
            return (mk(self.train_splits, True) if self.train_splits else None,
                    mk(self.valid_splits, True) if self.valid_splits else None,
                    {s: mk([s], False) for s in self.test_splits})

        self.train_ds, self.valid_ds, self.test_ds = trainer.node_first(build)
        any_ds = self.train_ds or self.valid_ds or next(iter(self.test_ds.values()), None)
        if any_ds is None:
            raise UsageError("nothing to do: no --train, --valid or --test split")
        self.feat_dim = any_ds.feat_dim
        sizes = [f"{name} {','.join(ds.examples.splits)} {len(ds)}"
                 for name, ds in (("train", self.train_ds), ("valid", self.valid_ds), *self.test_ds.items())
                 if ds is not None]
        trainer.log(f"{spec.name} data {self.data_root}{' (demo world)' if self.is_demo else ''}: " + "; ".join(sizes)
                    + (f"; {len(self.answers)} answers" if self.answers is not None else ""))
        self.micro_batch_size = micro_batch_size
        if self.train_ds is not None:
            self.train_loader = tasks_data.make_task_loader(
                self.train_ds, micro_batch_size, rank=trainer.rank, world_size=trainer.world, seed=args.seed,
                shuffle=True, drop_last=True, num_workers=self._workers(trainer), accumulation=accumulation)
            # The DataLoader draws its workers' base seed when an iterator starts (at the first batch): from its
            # own generator, not the global one, so that a resumed run's dropout stream is not shifted by it.
            self.train_loader.loader.generator = torch.Generator().manual_seed(args.seed * 7919 + trainer.rank)
        self.config = self._model_config(trainer)

    def _workers(self, trainer: Trainer) -> int:
        if self.args.num_workers is not None:
            return self.args.num_workers
        return 4 if trainer.device.type == "cuda" else 0

    def fill_config(self, raw: dict) -> dict:
        args, spec = self.args, self.spec
        explicit = {flag for flag, value in (("--lr", args.lr), ("--grad_clip", args.grad_clip),
                                             ("--batch_size", args.batch_size)) if value is not None}
        return fill_from_flags(raw, {
            "--lr": ("optimizer.params.lr", args.lr if args.lr is not None else
                     DEMO_DEFAULTS["lr"] if args.data_root is None else spec.lr),
            "--grad_clip": ("gradient_clipping", args.grad_clip if args.grad_clip is not None else DEFAULTS["grad_clip"]),
            "--batch_size": ("train_batch_size", args.batch_size if args.batch_size is not None else DEFAULTS["batch_size"]),
        }, explicit)

    def schedule(self, steps_per_epoch: int):
        return None, DEMO_DEFAULTS["epochs"] if self.args.data_root is None else DEFAULTS["epochs"]

    def warmup_ratio(self) -> float:
        return DEFAULTS["warmup_ratio"]

    # -- model --------------------------------------------------------------------------------------
    def _model_config(self, trainer: Trainer) -> LxmertConfig:
        args = self.args
        self.given = LxmertConfig.from_json(args.model_config) if args.model_config else None
        self.ckpt = None
        if args.load:
            self.ckpt = task_checkpoints.read_task_checkpoint(args.load, config=self.given, log=trainer.log)
            config = self.ckpt.config
            source = self.ckpt.path
        elif self.given is not None:
            config, source = self.given, args.model_config
        else:
            preset = args.model or ("small" if self.is_demo else "base")
            config = LxmertConfig.preset(preset, vocab_size=len(self.tokenizer), visual_feat_dim=self.feat_dim,
                                         num_object_labels=DEFAULT_NUM_OBJ_CLASSES,
                                         num_attr_labels=DEFAULT_NUM_ATTR_CLASSES, max_position_embeddings=512)
            source = "the model preset"
        if args.attention_backend:
            config = config.replace(attention_backend=args.attention_backend)
        task_checkpoints.check_config_fits(config, vocab_size=len(self.tokenizer), feat_dim=self.feat_dim, source=source)
        return config

    def build_model(self, trainer: Trainer, ds_config: dict):
        args, spec = self.args, self.spec
        num_answers = len(self.answers) if self.answers is not None else None
        model = task_heads.build_task_model(spec.name, self.config, num_answers)
        if self.ckpt is not None:
            head_answers, where = (None, "")
            if spec.name != "nlvr2" and self.ckpt.qa_rows is not None:
                head_answers, where = task_checkpoints.find_head_answers(self.ckpt, load_answers=args.load_answers,
                                                                   data_root=self.data_root)
            self.load_info = task_checkpoints.load_task_weights(
                spec.name, model, self.ckpt, task_answers=self.answers.label2ans if self.answers else None,
                head_answers=head_answers, head_answers_source=where, unmatched=args.head_unmatched, log=trainer.log)
        else:
            self.load_info = {"kind": "random init"}
            trainer.log("no --load: the model starts from random weights")
        self.config = model.config
        self.model = model
        return model

    def describe(self, trainer: Trainer) -> list[str]:
        c = self.config
        return [f"fine-tuning {self.spec.name}: model hidden {c.hidden_size}, layers l{c.l_layers}/x{c.x_layers}/"
                f"r{c.r_layers}; warmup {self.args.warmup_ratio if self.args.warmup_ratio is not None else DEFAULTS['warmup_ratio']:g}"]

    def flops_per_sample(self) -> Optional[float]:
        """Training FLOPs of one example: 6 x the forward's multiply-adds of the encoder (twice for NLVR2's two
        images) and the task head."""
        c = self.config
        encoder = flop_breakdown(c, seq_len=self.train_ds.tokens.shape[1], num_objects=self.train_ds.num_boxes).encoder_macs
        d = c.hidden_size
        if self.spec.name == "nlvr2":
            macs = 2 * encoder + (2 * d) * (2 * d) + (2 * d) * 2
        else:
            macs = encoder + d * 2 * d + 2 * d * c.num_qa_labels
        return 6.0 * macs

    # -- training -----------------------------------------------------------------------------------
    def epoch_begins(self, trainer: Trainer, epoch: int) -> None:
        """The epoch's loss sum starts at 0, or where a resumed epoch's checkpoint left it."""
        loss, micro = getattr(self, "_resumed_epoch", None) or (0.0, 0)
        self._resumed_epoch = None
        self.epoch_loss = torch.tensor(loss, dtype=torch.float64, device=trainer.device)
        self.epoch_micro = micro

    def micro_step(self, trainer: Trainer, raw: dict):
        batch = to_device(raw, trainer.device)
        logits = task_heads.task_logits(self.spec.name, trainer.engine, batch, trainer.dtype)
        loss = task_heads.task_loss(self.spec.name, logits, batch, self.args.gqa_loss)
        self.epoch_loss += loss.detach().double()
        self.epoch_micro += 1
        return loss, {}

    # -- evaluation ---------------------------------------------------------------------------------
    def predict(self, trainer: Trainer, model, dataset, dtype: torch.dtype) -> dict:
        """{example id: prediction} over the whole split (sharded over ranks, gathered)."""
        bs = self.args.eval_batch_size or 2 * self.micro_batch_size
        loader = tasks_data.make_task_loader(dataset, bs, rank=trainer.rank, world_size=trainer.world, shuffle=False,
                                             drop_last=False, num_workers=0)
        by_row: dict[int, int] = {}
        was_training = model.training
        model.eval()
        try:
            with preserved_rng(), torch.no_grad():
                for batch in loader:
                    batch = to_device(batch, trainer.device)
                    logits = task_heads.task_logits(self.spec.name, model, batch, dtype)
                    for r, k in zip(batch["index"].tolist(), logits.argmax(-1).tolist()):
                        by_row[r] = k
        finally:
            model.train(was_training)
        merged: dict[int, int] = {}
        for part in all_gather_object(by_row):
            merged.update(part)
        return dataset.predictions_from(merged)

    def score(self, trainer: Trainer, model, dataset, dtype) -> tuple[dict, dict]:
        preds = self.predict(trainer, model, dataset, dtype)
        return tasks_data.evaluate(self.spec.name, preds, dataset.examples), preds

    def evaluate(self, trainer: Trainer) -> dict:
        if self.valid_ds is None:
            return {}
        res, _ = self.score(trainer, trainer.engine, self.valid_ds, trainer.dtype)
        return res

    def evaluated(self, trainer: Trainer, step: int, epoch: int, result: dict, epoch_end: bool) -> None:
        """At an epoch's end: the epoch's row, and the model kept in best/ when it is the best so far."""
        if not epoch_end:  # an --eval_every evaluation inside an epoch: logged by the runtime, nothing kept
            return
        train_loss = (self.epoch_loss / max(self.epoch_micro, 1)).item()
        self.epoch_loss.zero_()  # the sums belong to the epoch just ended (an epoch-end checkpoint holds zeros)
        self.epoch_micro = 0
        row: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": train_loss}
        if result:
            row["valid"] = result
            improved = result.get(self.metric, -1.0) > self.best[self.metric]
            trainer.log(f"epoch {epoch}/{trainer.epochs}: train loss {train_loss:.4f} | valid {_fmt_metrics(result)}"
                        + (" | best so far" if improved else ""))
            if improved:
                self.best = {"epoch": epoch, self.metric: result[self.metric], "valid": result}
                self.save_model(trainer, "best", {"epoch": epoch, "step": step, "valid": result})
        else:
            trainer.log(f"epoch {epoch}/{trainer.epochs}: train loss {train_loss:.4f}")
        self.history.append(row)

    def save_model(self, trainer: Trainer, name: str, extra: dict) -> Optional[str]:
        """Collective: the engine's full fp32 weights -> <output_dir>/<name> on rank 0."""
        state = full_fp32_state_dict(trainer.engine)
        path = os.path.join(trainer.out_dir, name)
        if trainer.is_main:
            cpu = task_heads.build_task_model(self.spec.name, self.config, len(self.answers) if self.answers else None)
            cpu.load_state_dict(state, strict=True)
            task_checkpoints.save_task_model(cpu, path, answers=self.answers.label2ans if self.answers else None,
                                       extra={"task": self.spec.name, **extra})
        barrier()
        return path

    def client_state(self) -> dict:
        """Kept in checkpoints: the best so far, the epoch rows, and the current epoch's loss sum (an epoch that
        ends after a resume reports the mean over all of its micro-batches)."""
        return {"best": self.best, "history": self.history,
                "epoch_loss": [float(self.epoch_loss.item()), self.epoch_micro]}

    def load_client_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.history = list(state.get("history", []))
        self._resumed_epoch = tuple(state["epoch_loss"]) if "epoch_loss" in state else None

    def majority(self) -> dict:
        if self.train_ds is None or self.valid_ds is None:
            return {}
        preds = tasks_data.majority_predictions(self.spec.name, self.train_ds.examples, self.valid_ds.examples)
        return tasks_data.evaluate(self.spec.name, preds, self.valid_ds.examples)

    def load_saved(self, path: str) -> torch.nn.Module:
        ckpt = task_checkpoints.read_task_checkpoint(path)
        model = task_heads.build_task_model(self.spec.name, ckpt.config, len(self.answers) if self.answers else None)
        task_checkpoints.load_task_weights(self.spec.name, model, ckpt,
                                     task_answers=self.answers.label2ans if self.answers else None,
                                     head_answers=self.answers.label2ans if self.answers else None,
                                     head_answers_source=path, log=lambda m: None)
        return model

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, trainer: Trainer, result: dict) -> dict:
        """Evaluate the best (else the last / loaded) model on --valid and --test; write predictions."""
        spec = self.spec
        result.update({"task": spec.name, "load": self.args.load, "load_info": getattr(self, "load_info", {}),
                       "data_root": self.data_root, "output_dir": trainer.out_dir})
        majority = self.majority()
        if majority:
            trainer.log(f"majority-answer baseline on {','.join(self.valid_ds.examples.splits)}: "
                        f"{_fmt_metrics(majority)}")
            result["majority"] = majority
        if trainer.engine is not None:
            result.update({"history": self.history, "best": self.best})
            if not result.get("completed"):
                return result
            self.save_model(trainer, "last", {"epoch": len(self.history), "step": result["step"]})
            trainer.log(f"fine-tuning: {result['step']} steps, {result['train_samples']} samples in "
                        f"{result['train_seconds']:.1f} s of training (evaluation excluded): "
                        f"{result['train_samples_per_s']:.1f} samples/s")
            best_dir = os.path.join(trainer.out_dir, "best")
            source = best_dir if os.path.isdir(best_dir) else os.path.join(trainer.out_dir, "last")
            model, dtype = self.load_saved(source), trainer.dtype
        else:
            source, model, dtype = self.args.load or "random init", self.model, torch.float32
            if trainer.device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        model = model.to(trainer.device, dtype=dtype)
        final: dict[str, Any] = {}
        files: dict[str, str] = {}
        splits: list[tuple[str, Any]] = []
        if self.valid_ds is not None:
            splits.append((",".join(self.valid_ds.examples.splits), self.valid_ds))
        splits += [(name, ds) for name, ds in self.test_ds.items() if name not in dict(splits)]
        for name, ds in splits:
            res, preds = self.score(trainer, model, ds, dtype)
            if trainer.is_main:
                path = os.path.join(trainer.out_dir, tasks_data.prediction_file_name(spec.name, name.replace(",", "+")))
                files[name] = tasks_data.write_predictions(spec.name, path, preds)
            final[name] = res
            trainer.log(f"{source}: {spec.name} {name}: " + (_fmt_metrics(res) if res else "unlabelled")
                        + f"; predictions -> {files.get(name, '(rank 0)')}")
        result.update({"final": final, "final_model": source, "predictions": files})
        return result


def run(argv: Optional[list[str]] = None) -> dict:
    """Parse, set up, train/evaluate; returns the result dict (raises on errors). For in-process use."""
    select_accelerator()  # DS_ACCELERATOR=cpu without a GPU, before DeepSpeed is imported
    args = build_parser().parse_args(argv)
    return Trainer(args, FinetuneRecipe(args)).run()


def main(argv: Optional[list[str]] = None) -> int:
    return run_job(run, argv, (tasks_data.TaskDataError,))


if __name__ == "__main__":
    from lxmert_fast.train.entry import exit_script

    exit_script(main)
