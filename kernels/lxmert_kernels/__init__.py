"""lxmert_kernels: Triton kernels for LXMERT (attention, cross-attention, LayerNorm, GELU).

Imports torch and triton only and touches no device at import time. Kernels need CUDA
tensors, or ``TRITON_INTERPRET=1`` set before this package is imported (CPU interpreter).
"""
from .cross_attention import bidirectional_cross_attention, cross_attention_dropout_mask
from . import tuning
from .flash_attention import attention_dropout_mask, flash_attention, flash_attention_qkv
from .gelu import bias_gelu
from .layer_norm import layer_norm, layer_norm_dropout_mask

__version__ = "0.2.0"

__all__ = [
    "flash_attention",
    "flash_attention_qkv",
    "bidirectional_cross_attention",
    "layer_norm",
    "bias_gelu",
    "attention_dropout_mask",
    "cross_attention_dropout_mask",
    "layer_norm_dropout_mask",
    "tuning",
    "__version__",
]
