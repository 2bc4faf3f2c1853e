"""The elementwise ops the layers call, with interchangeable implementations.

- `residual_layer_norm(x, residual, ln, dropout_p)` = LayerNorm(dropout(x) + residual)
- `linear_gelu(x, linear)` = erf-GELU(x W^T + b)

`TorchOps` is plain PyTorch (HF's exact sequence of ops). `TritonOps` calls the fused kernels of
the separately installed `lxmert_kernels` package; `ApexOps` NVIDIA apex's FusedLayerNorm.
`make_ops(name)` builds one and raises, naming the reason, when it cannot (never falls back).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class OpsUnavailableError(RuntimeError):
    """The requested fused-op implementation cannot be used here (the message says why)."""


class TorchOps:
    """Stateless apart from the modules an implementation imported: copies of a model share one
    (``copy.deepcopy`` returns it)."""

    name = "torch"

    def __deepcopy__(self, memo: dict) -> "TorchOps":
        return self

    def residual_layer_norm(self, x: Tensor, residual: Tensor, ln: nn.LayerNorm, dropout_p: float) -> Tensor:
        x = F.dropout(x, p=dropout_p, training=dropout_p > 0.0)
        return F.layer_norm(x + residual, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def linear_gelu(self, x: Tensor, linear: nn.Linear) -> Tensor:
        return F.gelu(linear(x))  # the module is called: an adapter wrapping it (PEFT's LoRA) takes part

    def supports(self, x: Tensor) -> list[str]:
        return []


class TritonOps(TorchOps):
    """Fused Triton kernels from `lxmert_kernels` (CUDA tensors, or any device under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self) -> None:
        try:
            self._k = importlib.import_module("lxmert_kernels")
        except ImportError as err:
            raise OpsUnavailableError(
                f"kernels='triton' needs the lxmert-kernels package (pip install ./kernels): {err}"
            ) from None

    def residual_layer_norm(self, x, residual, ln, dropout_p):
        return self._k.layer_norm(x, ln.weight, ln.bias, eps=ln.eps, residual=residual, dropout_p=dropout_p)

    def linear_gelu(self, x, linear):
        if type(linear) is not nn.Linear or linear.bias is None:
            raise OpsUnavailableError(
                f"kernels='triton' fuses the bias of a plain nn.Linear into GELU; this one is a {type(linear).__name__}"
                f"{'' if linear.bias is not None else ' without a bias'} (e.g. wrapped by an adapter): use "
                f"kernels='torch' (model.set_kernels('torch'))")
        return self._k.bias_gelu(F.linear(x, linear.weight), linear.bias)


class ApexOps(TorchOps):
    """NVIDIA apex's fused LayerNorm kernel (the residual add and dropout stay in PyTorch)."""

    name = "apex"

    def __init__(self) -> None:
        try:
            module = importlib.import_module("apex.normalization")
            self._fused_layer_norm = module.fused_layer_norm_affine
        except (ImportError, AttributeError) as err:
            raise OpsUnavailableError(
                f"kernels='apex' needs NVIDIA apex built with its CUDA extensions "
                f"(apex.normalization.fused_layer_norm_affine): {err}"
            ) from None

    def residual_layer_norm(self, x, residual, ln, dropout_p):
        x = F.dropout(x, p=dropout_p, training=dropout_p > 0.0)
        return self._fused_layer_norm(x + residual, ln.weight, ln.bias, ln.normalized_shape, ln.eps)


def make_ops(name: str) -> TorchOps:
    if name == "torch":
        return TorchOps()
    if name == "triton":
        return TritonOps()
    if name == "apex":
        return ApexOps()
    raise OpsUnavailableError(f"unknown kernels {name!r}: expected torch, triton or apex")
