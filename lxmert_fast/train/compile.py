"""`--compile none|default|max-autotune|reduce-overhead`: the model's forward and backward as one
static graph each (`torch.compile(fullgraph=True, dynamic=False)`).

The model's `forward` is compiled in place, before DeepSpeed wraps the model: its state-dict keys,
checkpoints and exports are unchanged, and the module hooks DeepSpeed adds around the forward
(timers, ZeRO bookkeeping) stay eager, outside the graph. A graph break is an error naming its cause (fullgraph),
never a silent eager run. `reduce-overhead` is inductor with CUDA graphs: it needs a CUDA device
and is refused elsewhere. Work outside the training step (validation, the grounding check, the
rare batch that needs a larger row budget) runs the same module eagerly (`eager_forward`), so it
neither recompiles the step nor is captured in a graph.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")
COMPILE_BACKENDS = ("inductor", "eager")


class CompileModeError(ValueError):
    """A --compile mode this run cannot use (the message says why)."""


def check_compile_mode(mode: str, device: torch.device, zero_stage: int = 0, backend: str = "inductor") -> None:
    if mode not in COMPILE_MODES:
        raise CompileModeError(f"--compile {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if backend not in COMPILE_BACKENDS:
        raise CompileModeError(f"--compile_backend {backend!r}: expected one of {', '.join(COMPILE_BACKENDS)}")
    if backend == "eager" and mode not in ("none", "default"):
        raise CompileModeError(f"--compile {mode} --compile_backend eager: the eager backend takes no mode "
                               f"(use --compile default, or the inductor backend)")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise CompileModeError(f"--compile reduce-overhead captures CUDA graphs; this run is on {device.type}: "
                               f"use --compile default (or none)")
    if mode != "none" and zero_stage == 3:
        raise CompileModeError("--compile with ZeRO-3: ZeRO-3 gathers and releases parameters in module hooks "
                               "around every submodule's forward, which a whole-model graph cannot hold; use "
                               "ZeRO 0/1/2 with --compile, or --compile none with ZeRO-3")


def compile_model(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """Compile ``model``'s forward in place for ``mode`` (none: unchanged). Returns the model.

    ``backend`` "eager" is TorchDynamo alone (the graph is captured whole, then run by PyTorch as it is):
    seconds instead of inductor's minutes, to check that a step compiles without a break; no speed-up, and
    a mode other than "default" means nothing to it (refused)."""
    if mode == "none":
        return model
    check_compile_mode(mode, torch.device("cpu") if mode != "reduce-overhead" else torch.device("cuda"),
                       backend=backend)
    kwargs = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False, **kwargs)
    return model


def step_begins(mode: str) -> None:
    """Call before each training step's forward: with CUDA graphs, the outputs of the previous
    replay may be overwritten from here on (the trainer has read what it needs by then)."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def eager_forward(mode: str) -> Iterator[None]:
    """Run compiled modules eagerly inside this block (no recompile, no capture)."""
    if mode == "none":
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield
