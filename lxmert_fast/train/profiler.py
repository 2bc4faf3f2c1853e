"""DeepSpeed's FLOPs profiler at a chosen step, its count set beside `lxmert_fast/flops.py`'s.

``--flops_profile_step N`` (or the DeepSpeed config's own ``flops_profiler`` section) profiles the forward
of optimizer step N (1-based, as the log counts; DeepSpeed's ``profile_step`` counts completed steps from
0, so the section gets N - 1). DeepSpeed writes its per-module table to ``output_file`` (filled with
``<output_dir>/logs/flops_profile.txt`` when absent or "auto"), and `FlopsProbe` reads its totals while
they exist (after that step's forward, before its optimizer step) and logs one line (also in
result.json, ``flops_profile``), comparing like with like:

* DeepSpeed's profiler counts the multiply-adds (MACs) of the torch functions it patches (``F.linear``,
  ``torch.matmul``, ``F.scaled_dot_product_attention``, ...) while the model's forward runs on rank 0's
  micro-batch: the forward only, and only ops reached through those Python functions (an attention
  inside a custom op, such as the Triton backend's, is not seen). Its "flops" add element-wise work
  (LayerNorm, GELU, softmax, adds), which flops.py leaves out.
* flops.py (the recipe's ``flops_per_sample()``) gives TRAINING FLOPs per sample = 6 x the forward's
  MACs, at the expected number of masked rows.

So the line sets DeepSpeed's forward MACs per sample against flops.py's training figure / 6. They differ
by what the model computed beyond the expected masked rows: the static row budget (expected count + a
margin, `lxmert_fast.model.rows`) pads the masked-word and masked-object rows the heads decode. Under
ZeRO-3 with ``memory_efficient_linear`` (DeepSpeed's default) the profiler counts every Linear twice: the
line says so (``linear_counted_twice`` in the result).

A compiled model (``--compile``) runs eagerly at the profiled step: the profiler counts through patched
Python functions, which a compiled graph never calls. With activation checkpointing the recomputation
runs in backward, outside the profiled forward; the section's ``recompute_fwd_factor`` (DeepSpeed's
fwd+bwd estimate, when ``wall_clock_breakdown`` prints one) is then filled with 1.0 when absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Optional

import torch.nn.functional as F

from lxmert_fast.train.compile import eager_forward
from lxmert_fast.train.ds_auto import AUTO, DSConfigError

SECTION = "flops_profiler"
DEFAULT_OUTPUT = "flops_profile.txt"  # under <output_dir>/logs


def fill_flops_profiler(cfg: dict, *, profile_step: Optional[int], output_dir: str,
                        activation_checkpointing: bool = False) -> None:
    """Fill, in place, the config's ``flops_profiler`` section from ``--flops_profile_step`` (1-based optimizer
    step; None: the config's own section, if any, as it is) and its "auto"/absent output file."""
    sec = cfg.get(SECTION)
    if sec is not None and not isinstance(sec, dict):
        raise DSConfigError(f"DeepSpeed config: {SECTION} = {sec!r}: expected an object")
    if profile_step is not None:
        if isinstance(profile_step, bool) or not isinstance(profile_step, int) or profile_step < 1:
            raise DSConfigError(f"--flops_profile_step {profile_step!r}: expected an optimizer step >= 1")
        sec = cfg.setdefault(SECTION, {})
        given = sec.get("profile_step", AUTO)
        if sec.get("enabled") and given != AUTO and given != profile_step - 1:
            raise DSConfigError(f"--flops_profile_step {profile_step} contradicts the DeepSpeed config's "
                                f"{SECTION}.profile_step = {given} (step {given + 1} as the log counts); drop one")
        sec["enabled"] = True
        sec["profile_step"] = profile_step - 1
    if not sec or not sec.get("enabled"):
        return
    if sec.get("profile_step", 1) == AUTO:
        raise DSConfigError(f"DeepSpeed config: {SECTION}.profile_step = \"auto\": give --flops_profile_step N")
    if sec.get("output_file", AUTO) in (AUTO, None):
        sec["output_file"] = os.path.join(output_dir, "logs", DEFAULT_OUTPUT)
    if activation_checkpointing and "recompute_fwd_factor" not in sec:
        sec["recompute_fwd_factor"] = 1.0


def profiled_step(cfg: dict) -> Optional[int]:
    """The optimizer step (1-based) the config profiles, or None."""
    sec = cfg.get(SECTION) or {}
    if not sec.get("enabled"):
        return None
    return int(sec.get("profile_step", 1)) + 1


def hand_outputs_to_deepspeed(engine):
    """Let DeepSpeed's backward hooks see the tensors of our models' outputs; returns the hook's handle.

    ``engine.forward`` registers hooks on the tensors of the model's output that start DeepSpeed's backward
    (its backward timers, ZeRO's backward bookkeeping); it looks for them in tensors, tuples, lists and
    dicts only. Our models return dataclasses (transformers' field names, not a dict), so those hooks are
    never registered, and an engine with its timers on (a ``flops_profiler`` section or
    ``wall_clock_breakdown``) fails in its first backward ("timer is not started"). This forward hook on the
    model hands DeepSpeed the dataclass's fields as a list, as ``engine.forward`` does for a dict output.
    """
    from deepspeed.runtime.utils import register_output_backward_hooks  # heavy: only for DeepSpeed's engine

    def hook(module, args, output):
        if dataclasses.is_dataclass(output) and not isinstance(output, (dict, list, tuple)):
            register_output_backward_hooks([getattr(output, f.name) for f in dataclasses.fields(output)],
                                           preprocess_once_fn=engine._backward_prologue,
                                           preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)

    return engine.module.register_forward_hook(hook)


class FlopsProbe:
    """Reads DeepSpeed's profile of one micro-batch's forward and sets it beside flops.py's figure.

    Use ``with probe.step(engine): loss = <forward>`` around every micro-batch's forward: at the profiled
    step the forward runs eagerly (also when compiled) and, on rank 0, the totals are read as the block
    ends (DeepSpeed stops counting at the forward's end and drops the totals in the optimizer step).
    """

    def __init__(self, engine, *, micro_batch_size: int, flops_per_sample: Optional[float], compile_mode: str,
                 log: Callable[[str], None]):
        self.output_hook = None
        if engine.engine_timers.backward_inner_timers:  # DeepSpeed's timers are on (see hand_outputs_to_deepspeed)
            self.output_hook = hand_outputs_to_deepspeed(engine)
        self.micro_batch_size = micro_batch_size
        self.flops_per_sample = flops_per_sample
        self.compile_mode = compile_mode
        self.log = log
        self.result: Optional[dict] = None

    @staticmethod
    def _profiling(engine) -> bool:
        return bool(engine.flops_profiler_enabled()) and engine.global_steps == engine.flops_profiler_profile_step()

    @contextlib.contextmanager
    def step(self, engine) -> Iterator[None]:
        if not self._profiling(engine):
            yield
            return
        with eager_forward(self.compile_mode):
            yield
        if engine.global_rank == 0 and self.result is None:
            self._read(engine)

    def _read(self, engine) -> None:
        prof = getattr(engine, "flops_profiler", None)
        if prof is None or not prof.started:
            return
        micro = self.micro_batch_size
        macs, flops = float(prof.get_total_macs()), float(prof.get_total_flops())
        step = engine.global_steps + 1
        out_file = engine.flops_profiler_output_file()
        res = {"step": step, "micro_batch_size": micro,
               "deepspeed_forward_macs_per_sample": macs / micro,
               "deepspeed_forward_flops_per_sample": flops / micro,
               "forward_seconds": float(prof.get_total_duration()), "output_file": out_file,
               "flops_py_train_flops_per_sample": self.flops_per_sample,
               "flops_py_forward_macs_per_sample": None, "ratio": None}
        line = (f"FLOPs profiler (DeepSpeed), step {step}: forward {macs / micro / 1e9:.4g} GMAC per sample counted "
                f"in the model's torch functions (rank 0's micro-batch of {micro}; {flops / micro / 1e9:.4g} GFLOP "
                f"with element-wise ops)")
        if self.flops_per_sample:
            ours = self.flops_per_sample / 6.0
            res["flops_py_forward_macs_per_sample"] = ours
            res["ratio"] = macs / micro / ours
            line += (f" vs flops.py {ours / 1e9:.4g} GMAC per sample (its training {self.flops_per_sample / 1e9:.4g} "
                     f"GFLOP / 6): x{res['ratio']:.3f}")
        if _linear_is_zero3s():
            res["linear_counted_twice"] = True
            line += ("; NOTE: F.linear is ZeRO-3's memory-efficient linear here, and DeepSpeed's profiler counts both "
                     "it and the matmul inside it: every Linear twice (zero_optimization.memory_efficient_linear "
                     "false for a comparable count)")
        self.log(line + (f"; per-module table: {out_file}" if out_file else ""))
        self.result = res


def _linear_is_zero3s() -> bool:
    """Whether ``torch.nn.functional.linear`` is ZeRO-3's wrapper (``deepspeed.zero.Init`` with
    ``memory_efficient_linear``, DeepSpeed's default, installs it): it calls ``torch.addmm`` or
    ``Tensor.matmul``, which the profiler patches too, so each Linear layer's MACs are counted twice
    (measured: x2.02 of the same model's count under ZeRO-0/2)."""
    return getattr(F.linear, "__module__", "") == "deepspeed.runtime.zero.linear"
