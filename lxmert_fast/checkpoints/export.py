"""The engine's full fp32 weights, gathered from any ZeRO stage, and written as an HF directory."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lxmert_fast.train.errors import TrainingError
from lxmert_fast.train.process import barrier
from lxmert_fast.utils import atomic_directory


def full_fp32_state_dict(engine) -> Optional[dict[str, torch.Tensor]]:
    """The model's full fp32 weights on CPU, on rank 0 (None elsewhere). Collective: call on every rank.

    ZeRO-1/2 and the bf16/fp16 optimizers: the fp32 master copy (`safe_get_full_fp32_param`);
    ZeRO-3: the partitions gathered; plain fp32: the module's parameters; the torch engine: its own.
    """
    if hasattr(engine, "fp32_state_dict"):  # lxmert_fast.train.torch_engine.TorchEngine (one process)
        return engine.fp32_state_dict()
    import deepspeed  # heavy (about 0.5 s), only for DeepSpeed's engine (absent where the torch engine is used)
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().clone()
            else:
                full = param.detach()
        if rank == 0:
            out[name] = full.detach().to("cpu", torch.float32).clone()
    for name, buf in module.named_buffers():
        if rank == 0:
            out[name] = buf.detach().to("cpu").clone()
    return out if rank == 0 else None


def export_hf(engine, build_model: Callable[[], nn.Module], directory: str) -> Optional[str]:
    """Write an HF directory (config.json + model.safetensors) from the engine's fp32 weights.

    Collective (all ranks call it); rank 0 writes. `build_model()` makes a CPU model of the same config.
    """
    state = full_fp32_state_dict(engine)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        model = build_model()
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # e.g. the MLM decoder: the word embeddings
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise TrainingError(f"export: state dict does not fit the model: missing {missing}, unexpected {unexpected}")
        with atomic_directory(directory) as tmp:  # the directory holds a complete export or the previous one
            model.save_pretrained(tmp)
    barrier()
    return directory if rank == 0 else None
