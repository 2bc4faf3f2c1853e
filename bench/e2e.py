"""End-to-end pre-training throughput: our recipe's optimizer step against transformers' model.

Ours: `Trainer.train_step` of a `PretrainRecipe` built by `pretrain.py`'s own parser from a command line
(`pretrain_argv`: the bench world as ``--data_root``, a DeepSpeed config, ``--model base`` ...): the step
users run, nothing copied. Where DeepSpeed does not import, the same recipe with ``--engine torch``
(plain PyTorch in one process), labelled so in the row.

The peer: transformers' `LxmertForPreTraining` with the same weights (our recipe's initialisation), on
the same micro-batches masked the same way (the recipe's masking functions and generators), with
`torch.optim.AdamW` and gradient clipping 1.0: fp32 on a CPU, bf16 autocast on a GPU, eager or under
`torch.compile` (graph breaks allowed).

The bench world: the demo world (2048-d features, 36 boxes, 20 tokens) with its vocabulary and answer
table padded to LXMERT-base's sizes (30522 words, 9500 answers), so the model has the recipe's shapes.
A variant is timed on a few prefetched optimizer steps of batches, cycled.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import math
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers
from torch._dynamo.utils import counters

from bench.common import (PeakMemory, dispatcher_calls, is_out_of_memory, median, short_error, synchronize,
                          time_calls)
from lxmert_fast import pretrain
from lxmert_fast.data.demo import ensure_demo_data
from lxmert_fast.data.masking import draw_selection, mask_pretrain_batch
from lxmert_fast.data.pretrain_data import build_pretrain_dataset, split_names
from lxmert_fast.checkpoints.layouts import ours_to_hf
from lxmert_fast.train.compile import CompileModeError, check_compile_mode
from lxmert_fast.train.ds_config import load_ds_config
from lxmert_fast.train.process import select_accelerator
from lxmert_fast.train.runtime import Trainer, UsageError

BASE_VOCAB, BASE_ANSWERS = 30522, 9500
WORLD_SPLITS = "mscoco_train,mscoco_nominival,vgnococo"  # pretrain.py's default --train


@dataclass(frozen=True)
class Variant:
    """One row of the end-to-end table. ``model``: "ours" (the recipe) or "hf" (the peer)."""

    key: str
    model: str = "ours"
    compile: str = "none"            # --compile (ours) / torch.compile mode (hf)
    backend: str = "auto"            # ours: --attention_backend
    kernels: str = ""                # ours: --kernels ("": triton on a GPU, torch on a CPU)
    config: str = ""                 # ours: the DeepSpeed config ("": zero2.json on a GPU, cpu.json on a CPU)
    activation_checkpointing: bool = False
    batch: Optional[int] = None      # this variant's own batch, one micro-batch (None: the run's)

    def estimate_gb(self, params: int, batch: int) -> float:
        """GPU memory this variant is expected to hold at its peak (the GPU check's planner): weights,
        gradients and AdamW state (16 B a parameter, bf16 masters included), activations (per sample, by
        what the variant keeps for backward) and the CUDA context."""
        per_sample = 0.040 if self.model == "hf" else 0.030
        if self.compile != "none":
            per_sample *= 0.7
        if self.activation_checkpointing:
            per_sample *= 0.25
        return 16 * params / 2**30 + per_sample * (self.batch or batch) + 1.5


# Priority order on a GPU (the GPU check times them in this order; the kernel groups come after the first two).
GPU_VARIANTS = (
    Variant("ours"),
    Variant("hf", "hf"),
    Variant("ours compiled", compile="default"),
    Variant("hf compiled", "hf", compile="default"),
    Variant("ours reduce-overhead", compile="reduce-overhead"),
    Variant("ours max-autotune", compile="max-autotune"),
    Variant("ours sdpa", backend="sdpa", kernels="torch"),
    Variant("ours zero1", config="zero1.json"),
    Variant("ours activation checkpointing", activation_checkpointing=True),
    Variant("ours, batch 32", batch=32),
    Variant("ours compiled, batch 32", compile="default", batch=32),
    Variant("ours reduce-overhead, batch 32", compile="reduce-overhead", batch=32),
    Variant("ours zero3", config="zero3.json"),
)
CPU_VARIANTS = (Variant("ours"), Variant("hf", "hf"))
HEAD_OF_LINE = ("ours", "hf")  # timed before the kernel groups


@dataclass
class Settings:
    preset: str = "base"             # base | tiny (dry runs and --quick)
    batch: int = 256                 # samples per optimizer step
    micro_batch: Optional[int] = None  # None: the whole batch in one micro-batch
    steps: int = 10                  # timed steps (rounds)
    warmup: int = 3                  # untimed steps (the first compiles)
    compile_backend: str = "inductor"
    engine: str = "deepspeed"        # torch where DeepSpeed does not import
    threads: Optional[int] = None    # CPU threads
    world: Path = Path("bench_world")
    work: Path = Path("bench_work")
    prefetch_steps: int = 2

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- the bench world
def ensure_world(directory: Path, preset: str, images: int = 200) -> tuple[Path, Path]:
    """(data root, vocab file) of the bench world under ``directory``: built once, with its stores and sentence
    index, under a lock (several runs and workers may ask at once); READY marks a complete one."""
    root = directory / f"{preset}-n{images}"
    vocab = root / "vocab_padded.txt"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "READY").is_file():
            return root, vocab
        shutil.rmtree(root, ignore_errors=True)  # an interrupted build
        demo = Path(ensure_demo_data(str(directory / "demo"), images=images, seed=0, log=None))
        (root / "lxmert").mkdir(parents=True)
        for entry in demo.iterdir():  # the demo's files, linked; the answer table and the vocabulary padded
            if entry.name != "lxmert":
                (root / entry.name).symlink_to(entry.resolve())
        for entry in (demo / "lxmert").iterdir():
            if entry.name != "all_ans.json":
                (root / "lxmert" / entry.name).symlink_to(entry.resolve())
        answers = json.loads((demo / "lxmert" / "all_ans.json").read_text(encoding="utf-8"))
        words = [w for w in (demo / "vocab.txt").read_text(encoding="utf-8").split("\n") if w]
        if preset == "base":
            answers += [{"ans": f"bench answer {i}", "dsets": ["vqa"]} for i in range(BASE_ANSWERS - len(answers))]
            words += [f"[unused{i}]" for i in range(BASE_VOCAB - len(words))]
        (root / "lxmert" / "all_ans.json").write_text(json.dumps(answers), encoding="utf-8")
        vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
        # the stores and the sentence index, made once here rather than by every worker at once
        build_pretrain_dataset(str(root), split_names(WORLD_SPLITS), store_dir=str(root / "lxmert_fast"),
                               vocab=str(vocab), log=None)
        (root / "READY").write_text("bench world\n", encoding="utf-8")
    return root, vocab


def bench_config(v: Variant, s: Settings, out: Path) -> Path:
    """The variant's DeepSpeed config: the packaged one with the benchmark's batch split, monitors off."""
    cfg = load_ds_config(v.config or ("zero2.json" if s.cuda else "cpu.json"))
    batch = v.batch or s.batch
    cfg["train_batch_size"] = batch
    cfg["train_micro_batch_size_per_gpu"] = batch if v.batch else (s.micro_batch or batch)
    cfg["gradient_accumulation_steps"] = "auto"
    # torch's fused AdamW: DeepSpeed's FusedAdam would JIT-build a CUDA extension (minutes) on a fresh machine
    cfg["optimizer"]["params"].update(torch_adam=True, fused=True)
    for section in ("tensorboard", "csv_monitor", "wandb", "comet"):
        if section in cfg:
            cfg[section]["enabled"] = False
    if s.cuda and "zero3" in (v.config or ""):
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ds_config.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def pretrain_argv(v: Variant, s: Settings, out: Path, engine: Optional[str] = None) -> tuple[list[str], str]:
    """The command line of `pretrain.py` this variant runs, and how the row shows it (paths named)."""
    root, vocab = ensure_world(s.world, s.preset)
    config = bench_config(v, s, out)
    paths = {"--data_root": (str(root), "<bench world>"), "--vocab": (str(vocab), "<padded vocab>"),
             "--deepspeed_config": (str(config), f"<{v.config or ('zero2.json' if s.cuda else 'cpu.json')}, "
                                                 f"batch {v.batch or s.batch}, torch's fused AdamW>"),
             "--output_dir": (str(out / "run"), "<scratch>")}
    shown = ["--valid", "", "--model", s.preset, "--attention_backend", v.backend,
             "--kernels", v.kernels or ("triton" if s.cuda else "torch"), "--compile", v.compile,
             "--compile_backend", s.compile_backend, "--engine", engine or s.engine]
    if v.activation_checkpointing:
        shown.append("--activation_checkpointing")
    if s.threads:
        shown += ["--cpu_threads", str(s.threads)]
    argv = [a for flag, (path, _) in paths.items() for a in (flag, path)] + shown
    argv += ["--train", WORLD_SPLITS, "--max_steps", "100000", "--eval_every", "0", "--save_every", "0",
             "--no_export", "--grounding_eval", "no", "--no_progress", "--num_workers", "0", "--overwrite",
             "--seed", "0"]
    display = " ".join(a for flag, (_, name) in paths.items() for a in (flag, name)) + " " + shlex.join(shown)
    return argv, "pretrain.py " + display


# ---------------------------------------------------------------------------------------------- the contenders
def build_trainer(argv: list[str]):
    """`pretrain.py`'s trainer, set up (data, model, engine), at the start of epoch 0."""
    select_accelerator()
    args = pretrain.build_parser().parse_args(argv)
    trainer = Trainer(args, pretrain.PretrainRecipe(args))
    trainer.setup()
    trainer.recipe.train_loader.set_epoch(0)
    trainer.recipe.epoch_begins(trainer, 0)
    return trainer


def prefetch(trainer, steps: int) -> list[tuple[dict, int]]:
    """``steps`` optimizer steps of (raw micro-batch, seed) from the recipe's loader, held in memory."""
    loader = trainer.recipe.train_loader
    out = []
    for raw in itertools.islice(iter(loader), steps * trainer.accum):
        out.append((raw, loader.micro_seed()))
    return out


class Ours:
    """The recipe's step: `Trainer.train_step` on prefetched micro-batches."""

    def __init__(self, v: Variant, s: Settings, out: Path):
        argv, shown = pretrain_argv(v, s, out)
        self.trainer = build_trainer(argv)
        self.source = itertools.cycle(prefetch(self.trainer, s.prefetch_steps))
        self.loss: Optional[torch.Tensor] = None
        t = self.trainer
        self.describe = {"setup": shown,
                         "engine": t.args.engine, "precision": t.settings.precision, "zero_stage": t.settings.zero_stage,
                         "micro_batch": t.settings.micro_batch_size, "accum": t.accum,
                         "batch": t.settings.train_batch_size, "flops_per_sample": t.recipe.flops_per_sample()}

    def step(self) -> None:
        self.loss = self.trainer.train_step(self.source)


class Peer:
    """transformers' model in a plain loop, fed what the recipe feeds ours (see the module's docstring)."""

    def __init__(self, v: Variant, s: Settings, out: Path):
        # the recipe builds the data, the masking and the initial weights: with the torch engine in fp32
        # (nothing of DeepSpeed needed), the model handed over and freed before anything is timed
        trainer = build_trainer(pretrain_argv(replace(v, config="cpu.json", compile="none"), s, out, "torch")[0])
        recipe, self.device, self.accum = trainer.recipe, trainer.device, trainer.accum
        weights = trainer.engine.fp32_state_dict()
        config = recipe.config
        flops = recipe.flops_per_sample()
        self.source = itertools.cycle(prefetch(trainer, s.prefetch_steps))
        trainer.engine = None
        del trainer
        hf_config = transformers.LxmertConfig(**{k: getattr(config, k) for k in config.hf_field_names()})
        model = transformers.LxmertForPreTraining(hf_config)
        missing, unexpected = model.load_state_dict(ours_to_hf(weights, config), strict=False)
        if unexpected or [k for k in missing if "decoder.weight" not in k]:  # the tied MLM decoder is not a key
            raise RuntimeError(f"the peer does not take our weights: missing {missing}, unexpected {unexpected}")
        self.model = model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
        self.forward = self.model if v.compile == "none" else torch.compile(
            self.model, backend=s.compile_backend,
            **({"mode": v.compile} if s.compile_backend == "inductor" and v.compile != "default" else {}))
        self.recipe = recipe
        self.autocast = s.cuda
        self.loss: Optional[torch.Tensor] = None
        self.describe = {"setup": "transformers.LxmertForPreTraining, torch AdamW, clipping 1.0, "
                                  + ("bf16 autocast" if s.cuda else "fp32")
                                  + (f", torch.compile ({v.compile}, {s.compile_backend})" if v.compile != "none" else ""),
                         "engine": "plain loop", "precision": "bf16 autocast" if s.cuda else "fp32",
                         "micro_batch": s.micro_batch or (v.batch or s.batch), "accum": self.accum,
                         "batch": v.batch or s.batch, "flops_per_sample": flops}

    def step(self) -> None:
        r = self.recipe
        for _ in range(self.accum):
            raw, _seed = next(self.source)
            draws = draw_selection(raw, r.select_gen)
            batch = mask_pretrain_batch(pretrain.to_device({**raw, **draws}, self.device), r.mask_cfg, r.mask_gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.forward(**pretrain.model_inputs(batch, torch.float32)).loss
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.detach()


def refusal(v: Variant, s: Settings) -> Optional[str]:
    """Why the recipe refuses ``v`` on this device before it builds anything (its own check of the compile
    mode: CUDA graphs need CUDA, the eager backend takes no mode), or None. The coordinator asks first and
    starts no worker for a refused variant; a worker would stop at the same check."""
    try:
        check_compile_mode(v.compile, torch.device("cuda" if s.cuda else "cpu"), backend=s.compile_backend)
    except CompileModeError as err:
        return short_error(err)
    return None


def build(v: Variant, s: Settings):
    out = s.work / v.key.replace(" ", "_").replace(",", "")
    return (Peer if v.model == "hf" else Ours)(v, s, out)


# ---------------------------------------------------------------------------------------------- rows
def base_row(v: Variant, s: Settings) -> dict:
    return {"part": "e2e", "key": f"e2e:{v.key}", "variant": v.key, **{k: val for k, val in asdict(v).items()
                                                                       if k != "key"},
            "preset": s.preset, "batch": v.batch or s.batch, "warmup": s.warmup, "steps": s.steps,
            "compile_backend": s.compile_backend if v.compile != "none" else None}


def finish_row(row: dict, times: list[float], loss: Optional[torch.Tensor], peak_tflops: Optional[float]) -> dict:
    """Samples/s, TFLOP/s and MFU from the step times (median); "ok" only for a finite loss."""
    step_s = median(times)
    rate = row["batch"] / step_s
    tflops = rate * row["flops_per_sample"] / 1e12 if row.get("flops_per_sample") else None
    value = float(loss.detach().float()) if loss is not None else float("nan")
    row.update(step_s_all=times, step_s=step_s, samples_per_s=rate, tflops=tflops, loss=value,
               mfu=tflops / peak_tflops if tflops and peak_tflops else None,
               status="ok" if math.isfinite(value) else f"no figure (error): the loss is not finite ({value})")
    return row


def compile_counters() -> dict:
    """Graph breaks and graphs of this process's torch.compile calls."""
    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def measure_together(variants: list[Variant], s: Settings, peak_tflops: Optional[float],
                     log: Callable[[str], None] = print) -> list[dict]:
    """Every variant built in this process, then timed in interleaved rounds (the CPU comparison: ratios
    that hold on a loaded machine). A variant that fails to build is a row with its reason."""
    rows, live = {}, {}
    for v in variants:
        row = rows[v.key] = base_row(v, s)
        t0 = time.perf_counter()
        try:
            live[v.key] = build(v, s)
            row.update(live[v.key].describe, build_s=time.perf_counter() - t0)
            log(f"[e2e] {v.key}: built in {row['build_s']:.1f} s")
        except Exception as err:  # noqa: BLE001  (a variant that cannot run is a row saying why)
            row["status"] = f"no figure (error): {short_error(err)}"
            log(f"[e2e] {v.key}: {row['status']}")
    memory = PeakMemory()
    memory.reset()
    times = time_calls({k: lv.step for k, lv in live.items()}, s.steps, s.warmup)
    for key, lv in live.items():
        finish_row(rows[key], times[key], lv.loss, peak_tflops)
        rows[key].update(memory.fields(), timing="interleaved rounds, one process",
                         peak_mem_kind="one process for all variants (not separable)",
                         dispatcher_calls_per_step=dispatcher_calls(lv.step))
    return [rows[v.key] for v in variants]


def measure_alone(v: Variant, s: Settings, peak_tflops: Optional[float], wait_turn: Callable[[str], None],
                  on_phase: Callable[[str], None] = lambda phase: None, log: Callable[[str], None] = print) -> dict:
    """One variant in this process: build, warm up (the first step compiles), ``wait_turn(phase)`` until the
    device is quiet, then the timed steps; ``on_phase(name)`` as each phase begins. An out-of-memory or any
    error in any phase is a row with the phase and the reason."""
    row = base_row(v, s)
    phase = "building"
    memory = PeakMemory()
    try:
        on_phase(phase)
        t0 = time.perf_counter()
        live = build(v, s)
        row.update(live.describe, build_s=time.perf_counter() - t0)
        phase = "warming up"
        on_phase(phase)
        memory.reset()
        t0 = time.perf_counter()
        for _ in range(s.warmup):
            live.step()
        synchronize()
        row["warmup_s"] = time.perf_counter() - t0
        phase = "waiting for the device"
        on_phase(phase)
        wait_turn(phase)
        phase = "timing"
        on_phase(phase)
        times = time_calls({"step": live.step}, s.steps, warmup=1)["step"]
        finish_row(row, times, live.loss, peak_tflops)
        row.update(memory.fields(), timing="CUDA events" if s.cuda else "perf_counter", compile=v.compile,
                   **(compile_counters() if v.compile != "none" else {}))
        phase = "counting dispatcher calls"  # one more step, after the timed ones
        row["dispatcher_calls_per_step"] = dispatcher_calls(live.step)
    except Exception as err:  # noqa: BLE001  (a measured outcome: the row says what and where)
        kind = ("out of memory" if is_out_of_memory(err) else
                "unavailable" if isinstance(err, UsageError) else "error")  # refused here, with the reason
        row.update(status=f"no figure ({kind}): while {phase}: {short_error(err)}", phase=phase, **memory.fields())
        log(f"[e2e] {v.key}: {row['status']}")
    return row
