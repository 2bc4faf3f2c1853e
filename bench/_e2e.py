"""End-to-end pre-training throughput: one optimizer step of batch `batch` (global), per variant.

A step is what training does per optimizer step: for each of `accum` micro-batches, take a raw
(unmasked) batch from host memory, copy it to the device (pinned, non-blocking), mask it there
(`lxmert_fast.data.masking.mask_pretrain_batch`: 15% words, 15% objects, the released 80/10/10
rules), forward, backward; then clip the gradients to 1.0 and take the optimizer step.

Variants
  * ``hf``: transformers' LxmertForPreTraining, eager attention, torch.optim.AdamW (its
    default implementation), gradient clipping 1.0; bf16 autocast on GPU, fp32 on CPU. The peer.
  * ``hf+compile``: the same model under ``torch.compile(model)``.
  * ``ours <backend>``: lxmert_fast's LxmertForPreTraining under DeepSpeed with the project's config
    (``ds_configs/zero2.json``: ZeRO-2, bf16 on GPU; ``ds_configs/cpu.json``: no ZeRO, fp32, torch's
    fused AdamW on CPU),
    ``engine.backward`` / ``engine.step``; the ``triton`` backend also uses the fused Triton
    LayerNorm / GELU kernels (``kernels="triton"``).
  * ablations (the speed work, one change at a time against the best backend): the MLM decoder
    on every token instead of the masked ones, masking on the host, pageable blocking copies,
    the optimizer implementation (torch foreach AdamW / torch fused AdamW / DeepSpeed FusedAdam),
    ``torch.compile`` of our model, the triton backend with the torch LayerNorm / GELU.

The raw batch is ``bench/step_vs_hf.pretraining_batch``'s (20 tokens, 36 objects, half the pairs
mismatched), with [CLS] / [SEP] added and the features in fp16, as the feature store keeps them.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from _common import (MemoryProbe, PartTimeout, StepTimer, median, short_error, synchronize, time_limit)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH), str(REPO / "kernels")):
    if p not in sys.path:
        sys.path.insert(0, p)

TOKENS, OBJECTS = 20, 36
CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0  # bert-base-uncased
BACKENDS = ("eager", "sdpa", "triton", "flash_attn")


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    preset: str = "base"
    batch: int = 256              # global samples per optimizer step
    micro_batch: int = 256        # per device
    warmup: int = 5
    steps: int = 20
    device: str = "cuda"
    world_size: int = 1
    rank: int = 0
    variant_timeout: Optional[float] = None
    quick: bool = False
    compile_mode: Optional[str] = None  # torch.compile(mode=...)
    compile_backend: str = "inductor"
    compose_batch: Optional[int] = None  # report the step of this batch, composed from measured micro-steps

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"

    def accum(self, world: int) -> int:
        per_step = self.micro_batch * world
        if self.batch % per_step:
            raise ValueError(f"batch {self.batch} is not a multiple of micro-batch {self.micro_batch} x "
                             f"{world} device(s)")
        return self.batch // per_step


@dataclass
class Variant:
    name: str
    kind: str                      # "hf" | "ours" (DeepSpeed) | "ours_plain" (ours in the peer's plain loop)
    backend: str = "eager"         # attention backend (ours); HF is always eager
    kernels: str = "torch"         # our elementwise ops: torch | triton
    compile: bool = False
    optimizer: str = "torch"       # torch (GPU: foreach AdamW; CPU: fused, as cpu.json) | torch_fused | ds_fused
    masking: str = "device"        # device | host
    copy: str = "pinned"           # pinned (non-blocking) | pageable (blocking)
    mlm_decoder: str = "masked"    # masked | all
    group: str = "main"            # main | ablation
    note: str = ""
    compile_mode: Optional[str] = None  # torch.compile mode of this variant (None: Settings.compile_mode)
    fullgraph: bool = False        # torch.compile(fullgraph=True): a graph break is an error

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "note")}


def main_variants() -> list[Variant]:
    out = [Variant("hf", "hf", note="transformers LxmertForPreTraining (peer)"),
           Variant("hf+compile", "hf", compile=True, note="torch.compile(transformers model)")]
    for b in BACKENDS:
        out.append(Variant(f"ours {b}", "ours", backend=b, kernels="triton" if b == "triton" else "torch"))
    return out


def ablation_variants(best: str) -> list[Variant]:
    """One change at a time against `ours <best>` (the variant the speed work is measured on)."""
    base = Variant(f"ours {best}", "ours", backend=best, kernels="triton" if best == "triton" else "torch",
                   group="ablation")
    out = [replace(base, name=f"ours {best} | reference", note="the unchanged variant, measured with the ablations"),
           replace(base, name=f"ours {best} | MLM decoder on all tokens", mlm_decoder="all"),
        replace(base, name=f"ours {best} | no DeepSpeed (plain loop + torch AdamW)", kind="ours_plain",
                note="the model alone: the peer's loop (autocast bf16 on GPU) instead of the DeepSpeed engine")]
    if best == "triton":
        out.append(replace(base, name="ours triton | torch LayerNorm/GELU", kernels="torch"))
    out += [
        replace(base, name=f"ours {best} | masking on host", masking="host"),
        replace(base, name=f"ours {best} | pageable blocking copy", copy="pageable"),
        replace(base, name=f"ours {best} | torch fused AdamW", optimizer="torch_fused"),
        replace(base, name=f"ours {best} | DeepSpeed FusedAdam", optimizer="ds_fused"),  # may JIT-build
        replace(base, name=f"ours {best} | torch.compile", compile=True),  # the slowest to set up: last
    ]
    return out


# ---------------------------------------------------------------------------------------------- model configs
def model_config(preset: str, backend: str = "eager", kernels: str = "torch"):
    from lxmert_fast import LxmertConfig

    overrides = {}
    if preset == "tiny":
        # pretraining_batch draws word ids from [1000, vocab): the tiny preset's 120 words are too few
        overrides["vocab_size"] = 1200
    return LxmertConfig.preset(preset, attention_backend=backend, kernels=kernels, **overrides)


def hf_config(config):
    import transformers

    return transformers.LxmertConfig(**{k: getattr(config, k) for k in config.hf_field_names()})


def flops_per_sample(config, mlm_decoder: str = "masked") -> int:
    from lxmert_fast.flops import train_flops_per_sample

    if mlm_decoder == "all":  # transformers' model: every token, every object
        return train_flops_per_sample(config, TOKENS, OBJECTS)
    return train_flops_per_sample(config, TOKENS, OBJECTS, mlm_tokens=0.15 * TOKENS, masked_objects=0.15 * OBJECTS)


# ---------------------------------------------------------------------------------------------- batches
def raw_batch(config, batch: int, seed: int) -> dict:
    """A raw (unmasked) collated batch in the loader's layout, on the host."""
    from step_vs_hf import pretraining_batch

    b = pretraining_batch(config, batch, tokens=TOKENS, objects=OBJECTS, seed=seed)
    ids = b["input_ids"].clone()
    lengths = b["attention_mask"].sum(1)
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    feats, _ = b["obj_labels"]["feat"]
    obj_ids, obj_conf = b["obj_labels"]["obj"]
    attr_ids, attr_conf = b["obj_labels"]["attr"]
    return {
        "input_ids": ids, "attention_mask": b["attention_mask"], "token_type_ids": b["token_type_ids"],
        "visual_feats": feats.half(), "visual_pos": b["visual_pos"],
        "obj_ids": obj_ids, "obj_conf": obj_conf, "attr_ids": attr_ids, "attr_conf": attr_conf,
        "matched_label": b["matched_label"], "ans": b["ans"], "img_index": torch.arange(batch),
    }


def masking_config(config):
    from lxmert_fast.data.masking import MaskingConfig

    return MaskingConfig(vocab_size=config.vocab_size, mask_id=MASK_ID, never_mask=(CLS_ID, SEP_ID, PAD_ID))


class BatchSource:
    """Micro-batches of one variant: raw batches in (pinned) host memory, copied and masked per step."""

    def __init__(self, config, s: Settings, v: Variant, micro: int, accum: int):
        from lxmert_fast.data.masking import mask_pretrain_batch

        self.mask = mask_pretrain_batch
        self.cfg = masking_config(config)
        self.device = torch.device(s.device)
        self.v = v
        raw = raw_batch(config, micro * accum, seed=1000 + s.rank)
        pin = s.cuda and v.copy == "pinned"
        self.micro = [{k: (t[i * micro:(i + 1) * micro].contiguous().pin_memory() if pin else
                           t[i * micro:(i + 1) * micro].contiguous()) for k, t in raw.items()}
                      for i in range(accum)]
        self.non_blocking = pin
        self.gen = torch.Generator(device=self.device).manual_seed(s.rank)
        self.host_gen = torch.Generator().manual_seed(s.rank)

    def _to(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device, non_blocking=self.non_blocking)
        if isinstance(obj, dict):
            return {k: self._to(x) for k, x in obj.items()}
        if isinstance(obj, tuple):
            return tuple(self._to(x) for x in obj)
        return obj

    def get(self, i: int) -> dict:
        """The model's batch on the device, with "_counts": its (masked words, masked objects), known on the
        host before the step (as pretrain.py: the row budget of the compiled step depends on them)."""
        from lxmert_fast.data.masking import draw_selection, masked_counts, selection_counts

        raw = self.micro[i]
        if self.v.masking == "host":
            batch = self.mask(raw, self.cfg, self.host_gen)
            return {**self._to(batch), "_counts": masked_counts(batch)}
        # as pretrain.py (--mask_on device): the selection drawn on the host, the masking done on the device
        draws = draw_selection(raw, self.host_gen)
        counts = selection_counts(raw, draws, self.cfg)
        return {**self.mask(self._to({**raw, **draws}), self.cfg, self.gen), "_counts": counts}


def row_budget(batch: dict, sigmas: float = 6.0):
    """(RowBudget, fits) for one of our model's batches, as pretrain.py's trainer: room for the expected
    masked rows + `sigmas` standard deviations; a batch beyond it gets room for every row (exact) and
    runs eagerly (lxmert_fast.train.compile.eager_forward), so the compiled step keeps its one shape."""
    from lxmert_fast.model.rows import RowBudget

    b, t = batch["input_ids"].shape
    n = batch["visual_feats"].shape[1]
    budget = RowBudget.for_batch(b, t, n, 0.15, 0.15, sigmas)
    if budget.fits(*batch["_counts"]):
        return budget, True
    return RowBudget.full(b, t, n), False


def model_kwargs(batch: dict, dtype: Optional[torch.dtype] = None) -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "labels",
            "obj_labels", "matched_label", "ans")
    out = {k: batch[k] for k in keys}
    if dtype is not None:
        out["visual_feats"] = out["visual_feats"].to(dtype)
        out["visual_pos"] = out["visual_pos"].to(dtype)
    return out


# ---------------------------------------------------------------------------------------------- availability
def deepspeed_import_error() -> Optional[str]:
    """None when deepspeed imports here, else why not (the GPU machine has it only from carried wheels)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install raising anything)
        return short_error(err)
    return None


def without_deepspeed(v: Variant) -> Variant:
    """The same model without the DeepSpeed engine: the peer's plain loop (autocast bf16 on GPU) with
    torch's fused AdamW, labelled so (what the variants run as when deepspeed does not import)."""
    return replace(v, kind="ours_plain", optimizer="torch_fused",
                   note=(v.note + "; " if v.note else "") + "no DeepSpeed: plain loop + torch fused AdamW")


def compile_mode_of(v: Variant, s: Settings) -> Optional[str]:
    return v.compile_mode if v.compile_mode is not None else s.compile_mode


def compile_model(model, v: Variant, s: Settings):
    """torch.compile of transformers' `model` as the variant asks (mode); returns the callable to use.
    The 'eager' backend (dynamo only, for CPU smoke runs) takes no mode."""
    mode = compile_mode_of(v, s)
    kw = {"backend": s.compile_backend, "fullgraph": v.fullgraph}
    if s.compile_backend == "inductor" and mode not in (None, "default"):
        kw["mode"] = mode
    return torch.compile(model, **kw)


def compile_ours(model, v: Variant, s: Settings) -> str:
    """Our model's forward compiled in place, as `pretrain.py --compile MODE` does it
    (lxmert_fast.train.compile.compile_model: fullgraph, static shapes, before DeepSpeed wraps the
    model, whose module hooks stay eager). With another backend than inductor (the CPU smoke runs:
    'eager', dynamo only) the same flags through torch.compile directly. Returns what was called."""
    from lxmert_fast.train.compile import compile_model as recipe_compile

    mode = compile_mode_of(v, s) or "default"
    if s.compile_backend == "inductor":
        recipe_compile(model, mode)
        return f"lxmert_fast.train.compile.compile_model(model, {mode!r})"
    model.forward = torch.compile(model.forward, backend=s.compile_backend, fullgraph=True, dynamic=False)
    return f"torch.compile(model.forward, backend={s.compile_backend!r}, fullgraph=True, dynamic=False)"


def step_begins(v: Variant, s: Settings) -> None:
    """Before each step's forward: with CUDA graphs (reduce-overhead) the previous replay's outputs may
    be overwritten from here on (lxmert_fast.train.compile.step_begins)."""
    if v.compile and s.cuda and compile_mode_of(v, s) == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def unavailable_reason(v: Variant, s: Settings) -> Optional[str]:
    if v.kind == "hf":
        return None
    if v.kind == "ours":
        err = deepspeed_import_error()
        if err:
            return f"deepspeed is not importable ({err})"
    if (v.backend == "triton" or v.kernels == "triton") and not s.cuda:
        return "triton on CPU runs in the Triton interpreter, which is not a benchmark"
    if v.backend == "flash_attn":
        if not s.cuda:
            return "flash_attn needs CUDA"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not importable (package not installed)"
        try:
            import flash_attn  # noqa: F401
        except Exception as err:  # noqa: BLE001
            return f"flash_attn is not importable: {short_error(err)}"
    if v.optimizer == "ds_fused" and not s.cuda:
        return "optimizer ds_fused needs CUDA"
    if v.optimizer == "torch_fused" and not s.cuda and v.group == "ablation":
        return "torch fused AdamW is the default on CPU (cpu.json): the same thing as the reference"
    if (v.masking == "host" or v.copy == "pageable") and not s.cuda:
        return "host masking / copies are the same thing as the default on CPU"
    return None


# ---------------------------------------------------------------------------------------------- trainers
class HFTrainer:
    """A plain PyTorch training step: autocast bf16 on GPU, torch.optim.AdamW, clipping 1.0.
    Serves transformers' model (the peer) and, for kind "ours_plain", ours without DeepSpeed."""

    def __init__(self, config, s: Settings, v: Variant, accum: int):
        import transformers

        from lxmert_fast import LxmertForPreTraining

        torch.manual_seed(0)
        with torch.device(s.device):
            model = (LxmertForPreTraining(config) if v.kind == "ours_plain"
                     else transformers.LxmertForPreTraining(hf_config(config)))
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        kw = {"fused": True} if v.optimizer == "torch_fused" else {}
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, **kw)
        self.ours = v.kind == "ours_plain"
        self.compiled_with = None
        if v.compile and self.ours:
            self.compiled_with = compile_ours(model, v, s)
        elif v.compile:
            self.model_compiled = compile_model(model, v, s)
            self.compiled_with = f"torch.compile(model, backend={s.compile_backend!r}, mode={compile_mode_of(v, s)!r})"
        self.forward = getattr(self, "model_compiled", model)
        self.v, self.s = v, s
        self.cuda = s.cuda
        self.accum = accum
        self.zero_stage = None
        self.loss = None

    def micro_step(self, batch: dict, last: bool, probe: MemoryProbe) -> None:
        kw = model_kwargs(batch)
        ctx = contextlib.nullcontext()
        if self.ours:
            kw["row_budget"], fits = row_budget(batch)
            if not fits and self.v.compile:
                from lxmert_fast.train.compile import eager_forward

                ctx = eager_forward(compile_mode_of(self.v, self.s) or "default")
        step_begins(self.v, self.s)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda), ctx:
            loss = self.forward(**kw).loss
        probe.sample()
        (loss / self.accum).backward()
        probe.sample()
        if last:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            probe.sample()
        self.loss = loss.detach()

    def close(self) -> None:
        self.model = self.forward = self.opt = self.params = None


def ds_config(s: Settings, v: Variant, world: int) -> dict:
    """The project's config for this device (GPU: zero2.json, ZeRO-2; CPU: cpu.json, no ZeRO and
    torch's fused AdamW), with the benchmark's batch split, the variant's optimizer implementation
    and the monitors off."""
    from lxmert_fast.train.ds_config import load_ds_config, prepare_ds_config

    cfg = load_ds_config("zero2.json" if s.cuda else "cpu.json")
    cfg["train_batch_size"] = s.batch
    cfg["train_micro_batch_size_per_gpu"] = s.micro_batch
    cfg["gradient_accumulation_steps"] = "auto"
    params = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    params.pop("fused", None)
    if v.optimizer == "ds_fused":
        params.pop("torch_adam", None)
    else:
        params["torch_adam"] = True
        if v.optimizer == "torch_fused" or not s.cuda:
            params["fused"] = True  # DeepSpeed passes it on to torch.optim.AdamW (CPU: cpu.json's choice)
    for section in ("tensorboard", "csv_monitor", "wandb", "comet"):
        if section in cfg:
            cfg[section]["enabled"] = False
    cfg["steps_per_print"] = 10**9
    cfg["wall_clock_breakdown"] = False
    out_dir = tempfile.mkdtemp(prefix="lxmert_bench_ds_")
    return prepare_ds_config(cfg, world_size=world, total_steps=10**6, output_dir=out_dir,
                             micro_batch_size=s.micro_batch)


class OursTrainer:
    def __init__(self, config, s: Settings, v: Variant, accum: int):
        from lxmert_fast import LxmertForPreTraining
        from lxmert_fast.train.ds_config import initialize

        torch.manual_seed(0)
        with torch.device(s.device):
            model = LxmertForPreTraining(config)
        model.train()
        cfg = ds_config(s, v, s.world_size)
        # before DeepSpeed wraps the model, as pretrain.py: the forward method in place, so DeepSpeed's
        # module hooks (its throughput timer calls time.time()) run eagerly around the compiled graph
        self.compiled_with = compile_ours(model, v, s) if v.compile else None
        self.v, self.s = v, s
        self.engine = initialize(model, cfg)
        if self.engine.train_batch_size() != s.batch or self.engine.gradient_accumulation_steps() != accum:
            raise RuntimeError(f"engine batch {self.engine.train_batch_size()} / accumulation "
                               f"{self.engine.gradient_accumulation_steps()} differ from the benchmark's "
                               f"{s.batch} / {accum}")
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else (
            torch.float16 if self.engine.fp16_enabled() else None)
        self.zero_stage = int(self.engine.zero_optimization_stage())
        self.all_logits = v.mlm_decoder == "all"
        self.loss = None

    def micro_step(self, batch: dict, last: bool, probe: MemoryProbe) -> None:
        kw = model_kwargs(batch, self.dtype)
        if self.all_logits:
            kw["output_prediction_logits"] = True
        kw["row_budget"], fits = row_budget(batch)
        ctx = contextlib.nullcontext()
        if not fits and self.v.compile:
            from lxmert_fast.train.compile import eager_forward

            ctx = eager_forward(compile_mode_of(self.v, self.s) or "default")
        step_begins(self.v, self.s)
        with ctx:
            loss = self.engine(**kw).loss
        probe.sample()
        self.engine.backward(loss)
        probe.sample()
        self.engine.step()
        if last:
            probe.sample()
        self.loss = loss.detach()

    def close(self) -> None:
        eng = self.engine
        self.engine = None
        if eng is not None and hasattr(eng, "destroy"):
            try:
                eng.destroy()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------- measurement
def base_row(v: Variant, s: Settings, peak_tflops: Optional[float]) -> dict:
    world = s.world_size if v.kind == "ours" else 1
    config = model_config(s.preset, v.backend, v.kernels)
    adamw = "torch fused AdamW" if v.optimizer == "torch_fused" else "torch.optim.AdamW"
    framework = {"hf": f"transformers, {adamw}",
                 "ours": "DeepSpeed (GPU: zero2.json, ZeRO-2 bf16; CPU: cpu.json, no ZeRO, fp32) with "
                         + ("DeepSpeed FusedAdam" if v.optimizer == "ds_fused" else
                            "torch fused AdamW" if (v.optimizer == "torch_fused" or not s.cuda) else "torch AdamW"),
                 "ours_plain": f"plain PyTorch loop (as the peer's, autocast bf16 on GPU), {adamw}"}[v.kind]
    return {
        "part": "e2e", "variant": v.name, **v.describe(), "note": v.note,
        "precision": s.precision, "preset": s.preset, "batch": s.batch, "micro_batch": s.micro_batch,
        "accum": s.accum(world), "devices": world, "tokens": TOKENS, "objects": OBJECTS,
        "warmup": s.warmup, "steps": s.steps,
        "model_flops_per_sample": flops_per_sample(config, "masked"),
        "executed_flops_per_sample": flops_per_sample(config, "all" if (v.kind == "hf" or v.mlm_decoder == "all")
                                                      else "masked"),
        "peak_tflops_measured": peak_tflops,
        "framework": framework,
        "compile_backend": s.compile_backend if v.compile else None,
        "compile_mode": (compile_mode_of(v, s) or "default") if v.compile else None,
        "fullgraph": v.fullgraph if v.compile else None,
        "timing": "cuda events" if s.cuda else "perf_counter",
    }


class Live:
    """One built variant: its trainer, batches and memory probe; `step()` = one optimizer step."""

    def __init__(self, v: Variant, s: Settings, row: dict):
        world = s.world_size if v.kind == "ours" else 1
        self.accum = s.accum(world)
        config = model_config(s.preset, v.backend, v.kernels)
        self.v, self.trainer = v, None
        self.probe = MemoryProbe(s.cuda)
        self.trainer = (OursTrainer if v.kind == "ours" else HFTrainer)(config, s, v, self.accum)
        row["zero_stage"] = self.trainer.zero_stage
        if self.trainer.compiled_with:
            row["compiled_with"] = self.trainer.compiled_with
        self.source = BatchSource(config, s, v, s.micro_batch, self.accum)
        self.micro_timer = StepTimer(s.cuda)
        self.timing = False

    def step(self) -> None:
        for i in range(self.accum):
            if self.timing:
                with self.micro_timer:
                    self.trainer.micro_step(self.source.get(i), i == self.accum - 1, self.probe)
            else:
                self.trainer.micro_step(self.source.get(i), i == self.accum - 1, self.probe)

    def timed_steps(self, steps: int) -> dict:
        """Time `steps` optimizer steps (each micro-step too): the row's step times, the last loss, the
        memory probe's and the micro-steps' fields."""
        timer = StepTimer(self.probe.cuda)
        self.timing = True
        for _ in range(steps):
            with timer:
                self.step()
        times = timer.seconds()
        loss = float(self.trainer.loss.float().item())
        return {"step_s_all": [round(t, 6) for t in times], "loss": loss, **self.probe.fields(), **self.micro_fields()}

    def micro_fields(self) -> dict:
        """Each timed micro-step's time: the last of each step is the boundary one (it also takes
        the optimizer step); the others only forward + backward (+ DeepSpeed's bookkeeping)."""
        t = self.micro_timer.seconds()
        nb = [x for i, x in enumerate(t) if i % self.accum != self.accum - 1]
        b = [x for i, x in enumerate(t) if i % self.accum == self.accum - 1]
        return {"micro_s_nonboundary_all": [round(x, 6) for x in nb], "micro_s_boundary_all": [round(x, 6) for x in b]}

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
        self.trainer = self.source = None


def _cleanup(s: Settings, compiled: bool) -> None:
    gc.collect()
    if s.cuda:
        torch.cuda.empty_cache()
    if compiled:
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass


def measure(v: Variant, s: Settings, peak_tflops: Optional[float], log=print) -> dict:
    """Build, warm up and time one variant; returns its row (status "ok", "failed: ..." or
    "unavailable: ...")."""
    row = base_row(v, s, peak_tflops)
    why = unavailable_reason(v, s)
    if why:
        row["status"] = f"unavailable: {why}"
        return row
    live = None
    t_build = time.perf_counter()
    try:
        with time_limit(s.variant_timeout, v.name):
            live = Live(v, s, row)
            t0 = time.perf_counter()
            for _ in range(s.warmup):
                live.step()
            synchronize()
            row["build_s"] = round(t0 - t_build, 2)
            row["warmup_s"] = round(time.perf_counter() - t0, 2)
            row.update(live.timed_steps(s.steps))
        loss = row["loss"]
        row["status"] = "ok" if math.isfinite(loss) else f"failed: loss is not finite ({loss})"
        finalize(row, s.batch, row["devices"], s.compose_batch)
    except PartTimeout as err:
        row["status"] = f"failed: {err}"
    except Exception as err:  # noqa: BLE001  (a failure to compile/run is a measured outcome)
        row["status"] = f"failed: {short_error(err)}"
        log(f"  {v.name}: {row['status']}")
    finally:
        if live is not None:
            live.close()
        live = None
        _cleanup(s, v.compile)
    return row


def measure_interleaved(vs: list[Variant], s: Settings, peak_tflops: Optional[float], log=print) -> list[dict]:
    """All of `vs` built side by side, warmed up, then timed one optimizer step each in turn
    (A B C A B C ...): slow drifts of a shared machine's load hit every variant alike, so the
    ratios hold even when the absolute rates wander. Memory is not separable per variant here
    (peak_mem_gb is left empty); a sequential run gives it."""
    rows = {v.name: base_row(v, s, peak_tflops) for v in vs}
    live: dict[str, Live] = {}
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    try:
        for v in vs:
            row = rows[v.name]
            why = unavailable_reason(v, s)
            if why:
                row["status"] = f"unavailable: {why}"
                continue
            t0 = time.perf_counter()
            try:
                with time_limit(s.variant_timeout, v.name):
                    live[v.name] = Live(v, s, row)
                    t1 = time.perf_counter()
                    for _ in range(s.warmup):
                        live[v.name].step()
                    synchronize()
                row.update(build_s=round(t1 - t0, 2), warmup_s=round(time.perf_counter() - t1, 2))
                live[v.name].timing = True
                log(f"[e2e] {v.name}: built and warmed up ({time.perf_counter() - t0:.1f} s)")
            except Exception as err:  # noqa: BLE001
                row["status"] = f"failed: {err}" if isinstance(err, PartTimeout) else f"failed: {short_error(err)}"
                log(f"[e2e] {v.name}: {row['status']}")
                if v.name in live:
                    live.pop(v.name).close()
        for i in range(s.steps):
            for name in list(live):
                timer = StepTimer(s.cuda)
                try:
                    with timer:
                        live[name].step()
                    times[name] += timer.seconds()
                except Exception as err:  # noqa: BLE001
                    rows[name]["status"] = f"failed: {short_error(err)}"
                    live.pop(name).close()
            log(f"[e2e] interleaved step {i + 1}/{s.steps}: "
                + ", ".join(f"{n} {times[n][-1]:.3g} s" for n in live if times[n]))
        for name, lv in live.items():
            row = rows[name]
            loss = float(lv.trainer.loss.float().item())
            row.update(step_s_all=[round(t, 6) for t in times[name]], loss=loss, peak_mem_gb=None, **lv.micro_fields(),
                       peak_mem_kind="not separable (variants interleaved in one process)",
                       timing=row["timing"] + ", interleaved")
            row["status"] = "ok" if math.isfinite(loss) else f"failed: loss is not finite ({loss})"
            finalize(row, s.batch, row["devices"], s.compose_batch)
    finally:
        for lv in live.values():
            lv.close()
        live.clear()
        _cleanup(s, any(v.compile for v in vs))
    return [rows[v.name] for v in vs]


def finalize(row: dict, batch: int, world: int, compose_batch: Optional[int] = None) -> None:
    """The figures derived from the step times (median step -> samples/s, TFLOP/s, MFU).

    compose_batch: report a step of that many samples instead, composed from the measured
    micro-steps: (n - 1) x median non-boundary micro-step + median boundary micro-step, with n
    micro-batches per step (used where a full recipe-sized step is too slow to time repeatedly,
    i.e. on CPU). The measured step of `batch` stays in measured_* fields."""
    times = row["step_s_all"]
    step_s = median(times)
    nb, b = row.get("micro_s_nonboundary_all") or [], row.get("micro_s_boundary_all") or []
    if nb or b:
        row["micro_s_nonboundary"], row["micro_s_boundary"] = median(nb), median(b)
    compose_batch = compose_batch or row.get("compose_batch")
    if compose_batch and compose_batch != batch:
        per_micro = row["micro_batch"] * world
        if compose_batch % per_micro or not nb or not b:
            raise ValueError(f"--compose-batch {compose_batch}: needs a multiple of micro-batch x devices "
                             f"({per_micro}) and at least 2 micro-batches per measured step")
        n = compose_batch // per_micro
        row.update(compose_batch=compose_batch, measured_batch=batch, measured_step_s=step_s,
                   measured_samples_per_s=batch / step_s,
                   timing_basis=f"step of {compose_batch} composed: {n - 1} x non-boundary + 1 x boundary micro-step "
                                f"(medians of the measured ones)")
        step_s = (n - 1) * median(nb) + median(b)
        batch = compose_batch
        row["batch"] = batch
    rate = batch / step_s  # samples/s of all `world` devices together
    per_dev = rate / world
    peak = row.get("peak_tflops_measured")
    tflops = per_dev * row["model_flops_per_sample"] / 1e12
    row.update(step_s=step_s, step_s_min=min(times), step_s_max=max(times), samples_per_s=rate,
               samples_per_s_per_device=per_dev, tflops_per_device=tflops,
               mfu=(tflops / peak) if peak else None)


def merge_rounds(rows: list[dict]) -> dict:
    """One row from the same variant measured in several rounds (each round builds it afresh):
    all step times pooled, the median over them; ok only if every round was."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    bad = [r["status"] for r in rows if r.get("status") != "ok"]
    out["rounds"] = len(rows)
    if bad:
        out["status"] = bad[0]
        return out
    out["step_s_all"] = [t for r in rows for t in r["step_s_all"]]
    for k in ("micro_s_nonboundary_all", "micro_s_boundary_all"):
        out[k] = [t for r in rows for t in r.get(k, [])]
    if out.get("measured_batch"):
        out["batch"] = out["measured_batch"]
    out["step_s_per_round"] = [median(r["step_s_all"]) for r in rows]
    for k in ("peak_mem_gb", "process_max_rss_gb"):
        if k in out:
            out[k] = max(r.get(k) or 0 for r in rows)
    out["loss"] = rows[-1].get("loss")
    finalize(out, out["batch"], out["devices"], out.get("compose_batch"))
    return out


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_peer = per-device samples/s / the HF peer's, from the same run (and to hf+compile);
    ablation rows also get ratio_to_reference, against the unchanged variant of their group."""
    by_name = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    peer = by_name.get("hf")
    comp = by_name.get("hf+compile")
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r.get("group") == "ablation":
            ref = by_name.get(r["variant"].split(" | ")[0] + " | reference")
            if ref:
                r["ratio_to_reference"] = r["samples_per_s_per_device"] / ref["samples_per_s_per_device"]
        if peer:
            r["ratio_to_peer"] = r["samples_per_s_per_device"] / peer["samples_per_s_per_device"]
        if comp:
            r["ratio_to_compiled_peer"] = r["samples_per_s_per_device"] / comp["samples_per_s_per_device"]


def best_backend(rows: list[dict], cuda: bool) -> str:
    """The backend the ablations run against: triton on GPU when it ran, else the fastest of ours."""
    ok = {r["backend"]: r for r in rows if r.get("status") == "ok" and r.get("kind") == "ours"
          and r.get("group") == "main"}
    if cuda and "triton" in ok:
        return "triton"
    if ok:
        return max(ok.values(), key=lambda r: r["samples_per_s"])["backend"]
    return "triton" if cuda else "sdpa"
