"""Flash attention (non-causal, key-padding mask, attention dropout) for LXMERT's short sequences.

Public entry point: :func:`flash_attention`. Kernels live in ``_attention_core`` and are shared
with :mod:`lxmert_kernels.cross_attention`.
"""
from __future__ import annotations

import math

import torch

from . import _attention_core as core
from ._common import check_device, check_dropout, check_dtype, resolve_seed


def _check_head_dim(D: int) -> None:
    if D < 16 or D > 128 or D & (D - 1):
        raise ValueError(f"lxmert_kernels attention: head dim must be a power of two in [16, 128], got {D}")


def _check_mask(key_padding_mask, B: int, LK: int, device) -> None:
    if key_padding_mask is None:
        return
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"lxmert_kernels attention: key_padding_mask must be a bool tensor (True = keep), "
            f"got {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != (B, LK):
        raise ValueError(
            f"lxmert_kernels attention: key_padding_mask must have shape (B, Lk) = {(B, LK)}, "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != device:
        raise ValueError("lxmert_kernels attention: key_padding_mask is on another device than q")


class FlashAttentionFunction(torch.autograd.Function):
    """Kernel contract.

    Inputs
      q_blhd (B, Lq, H, D), k_blhd (B, Lk, H, D), v_blhd (B, Lk, H, D): one dtype among
        float16 / bfloat16 / float32; any strides (views of a packed qkv tensor are read in
        place); D a power of two in [16, 128]; Lq and Lk independent.
      key_padding_mask_bl (B, Lk) bool, True = keep, or None. Non-causal.
      dropout_p in [0, 1) on the attention probabilities; seed (int) drives Philox
        (``tl.rand``) with offsets from (batch, head, query, key).
    Output
      o_blhd (B, Lq, H, D) contiguous, dtype of q. A query row whose keys are all masked
      gives 0 (never NaN) and receives zero gradient.
    Saved for backward
      q, k, v (the caller's tensors, no copies), o, lse_bhl (B, H, Lq) float32 logsumexp of
      the scaled scores (+inf on fully masked rows), the mask and the seed; the backward
      regenerates the dropout mask from the seed.
    Numerics
      fp32 accumulation and softmax statistics; on GPU the matmul operands stay in the input
      dtype (fp32 inputs use IEEE fp32 dots, no tf32). In the Triton interpreter everything is
      computed in fp32.
    Backward
      preprocess (delta = rowsum(dO * O)), a dK/dV kernel over key blocks and a dQ kernel over
      query blocks: no atomics, so two backward passes give bitwise identical gradients.
    """

    @staticmethod
    def forward(ctx, q_blhd, k_blhd, v_blhd, key_padding_mask_bl, dropout_p, softmax_scale, seed):
        o_blhd, lse_bhl = core.attention_forward(
            q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed
        )
        ctx.save_for_backward(q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl)
        ctx.softmax_scale = softmax_scale
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        return o_blhd

    @staticmethod
    def backward(ctx, do_blhd):
        q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, mask_bl = ctx.saved_tensors
        dq_blhd = torch.empty(q_blhd.shape, dtype=q_blhd.dtype, device=q_blhd.device)
        dk_blhd = torch.empty(k_blhd.shape, dtype=k_blhd.dtype, device=k_blhd.device)
        dv_blhd = torch.empty(v_blhd.shape, dtype=v_blhd.dtype, device=v_blhd.device)
        core.attention_backward(
            do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, mask_bl,
            ctx.softmax_scale, ctx.dropout_p, ctx.seed, dq_blhd, dk_blhd, dv_blhd,
        )
        return dq_blhd, dk_blhd, dv_blhd, None, None, None, None


def flash_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None):
    """Attention softmax(q k^T * scale) v per batch and head, flash-attn layout.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D). float16, bfloat16 or float32 (all the same);
        D a power of two between 16 and 128. Arbitrary strides are read without copies.
      key_padding_mask: optional bool (B, Lk), True = keep this key.
      dropout_p: attention-probability dropout in [0, 1).
      softmax_scale: default 1/sqrt(D).
      seed: Philox seed for dropout; None draws one from torch's default generator (so
        ``torch.manual_seed`` makes it reproducible). Ignored when dropout_p == 0.
    Returns:
      (B, Lq, H, D) contiguous tensor in q's dtype. Fully masked query rows are zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"lxmert_kernels.flash_attention: {name} must be a 4-d tensor (B, L, H, D)")
        check_dtype(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"lxmert_kernels.flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, LQ, H, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, D) or v.shape != k.shape:
        raise ValueError(
            f"lxmert_kernels.flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "do not match (B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D)"
        )
    _check_head_dim(D)
    check_device(core._attn_fwd_kernel, q, k, v, key_padding_mask)
    _check_mask(key_padding_mask, B, k.shape[1], q.device)
    dropout_p = check_dropout(dropout_p)
    seed = resolve_seed(seed, dropout_p)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    return FlashAttentionFunction.apply(q, k, v, key_padding_mask, dropout_p, float(softmax_scale), seed)


def attention_dropout_mask(seed: int, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device="cpu"):
    """The (B, H, Lq, Lk) bool keep mask that :func:`flash_attention` applies for ``seed``.

    For tests and debugging: ``out == softmax(scores) * keep / (1 - p) @ v``.
    """
    check_device(core._attn_dropout_mask_kernel, torch.empty(0, device=device))
    return core.dropout_keep_mask(seed, dropout_p, B, H, Lq, Lk, device)
