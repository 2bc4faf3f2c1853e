"""Flash attention (non-causal, key-padding mask, attention dropout) for LXMERT's short sequences.

Public entry point: :func:`flash_attention`. Kernels live in ``_attention_core`` and are shared
with :mod:`lxmert_kernels.cross_attention`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _attention_core as core
from ._common import check_device, check_dropout, check_dtype, as_seed_tensor, seed_tensor


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


def _check_packed(fn_name: str, qkv) -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"lxmert_kernels.{fn_name}: qkv must have shape (B, L, 3, H, D)")
    check_dtype("qkv", qkv)
    _check_head_dim(qkv.shape[4])


def _checked_settings(tensors, key_padding_mask, B: int, LK: int, dropout_p, softmax_scale, seed):
    """What every attention entry point checks and defaults after its shapes: the device of
    ``tensors`` and the mask, the mask's (B, LK) shape, dropout_p. Returns (dropout_p, the seed
    tensor or None, softmax_scale: 1/sqrt(D) by default, D the head dim of ``tensors[0]``)."""
    device = tensors[0].device
    check_device(core.INTERPRETED, *tensors, key_padding_mask)
    _check_mask(key_padding_mask, B, LK, device)
    dropout_p = check_dropout(dropout_p)
    seed_t = seed_tensor(seed, dropout_p, device)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(tensors[0].shape[-1])
    return dropout_p, seed_t, float(softmax_scale)


def _check_qkv(q, k, v) -> None:
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


# ----------------------------------------------------------------------------------------------
# custom ops: lxmert_kernels::flash_attention_fwd / flash_attention_bwd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lxmert_kernels::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q_blhd: torch.Tensor, k_blhd: torch.Tensor, v_blhd: torch.Tensor, key_padding_mask_bl: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract.

    Inputs
      q_blhd (B, Lq, H, D), k_blhd (B, Lk, H, D), v_blhd (B, Lk, H, D): one dtype among
        float16 / bfloat16 / float32; any strides (views of a packed qkv tensor are read in
        place); D a power of two in [16, 128]; Lq and Lk independent.
      key_padding_mask_bl (B, Lk) bool, True = keep, or None. Non-causal.
      seed: 1-element int64 tensor on the inputs' device that the kernels read (never the
        host), or None when dropout_p == 0. dropout_p in [0, 1) on the attention
        probabilities, Philox (``tl.rand``) with offsets from (batch, head, query, key).
    Outputs
      o_blhd (B, Lq, H, D) contiguous, dtype of q. A query row whose keys are all masked
      gives 0 (never NaN) and receives zero gradient.
      lse_bhl (B, H, Lq) float32 contiguous: logsumexp of the scaled scores, +inf on fully
      masked rows (so that the backward recomputes p = 0 there).
    Numerics
      fp32 accumulation and softmax statistics; on GPU the matmul operands stay in the input
      dtype (fp32 inputs use IEEE fp32 dots, no tf32). In the Triton interpreter everything is
      computed in fp32.
    """
    return core.attention_forward(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed)


@flash_attention_fwd.register_fake
def _(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    B, LQ, H, D = q_blhd.shape
    return (q_blhd.new_empty((B, LQ, H, D)), q_blhd.new_empty((B, H, LQ), dtype=torch.float32))


@torch.library.custom_op("lxmert_kernels::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    do_blhd: torch.Tensor, q_blhd: torch.Tensor, k_blhd: torch.Tensor, v_blhd: torch.Tensor, o_blhd: torch.Tensor,
    lse_bhl: torch.Tensor, key_padding_mask_bl: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract: (dq, dk, dv), contiguous, dtypes of q, k, v, from the forward's inputs, its
    o and lse and the same seed tensor (the dropout mask is regenerated, not stored).

    A preprocess kernel (delta = rowsum(dO * O)), a dK/dV kernel over key blocks and a dQ kernel
    over query blocks: no atomics, so two backward passes give bitwise identical gradients.
    """
    dq_blhd = torch.empty(q_blhd.shape, dtype=q_blhd.dtype, device=q_blhd.device)
    dk_blhd = torch.empty(k_blhd.shape, dtype=k_blhd.dtype, device=k_blhd.device)
    dv_blhd = torch.empty(v_blhd.shape, dtype=v_blhd.dtype, device=v_blhd.device)
    core.attention_backward(
        do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl,
        softmax_scale, dropout_p, seed, dq_blhd, dk_blhd, dv_blhd,
    )
    return dq_blhd, dk_blhd, dv_blhd


@flash_attention_bwd.register_fake
def _(do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    return q_blhd.new_empty(q_blhd.shape), k_blhd.new_empty(k_blhd.shape), v_blhd.new_empty(v_blhd.shape)


def _fa_setup_context(ctx, inputs, output):
    q_blhd, k_blhd, v_blhd, mask_bl, seed, dropout_p, softmax_scale = inputs
    o_blhd, lse_bhl = output
    ctx.save_for_backward(q_blhd, k_blhd, v_blhd, mask_bl, seed, o_blhd, lse_bhl)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _fa_backward(ctx, do_blhd, _dlse):
    q_blhd, k_blhd, v_blhd, mask_bl, seed, o_blhd, lse_bhl = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, mask_bl, seed,
                                     ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


flash_attention_fwd.register_autograd(_fa_backward, setup_context=_fa_setup_context)


def flash_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None):
    """Attention softmax(q k^T * scale) v per batch and head, flash-attn layout.

    Args:
      q: (B, Lq, H, D); k, v: (B, Lk, H, D). float16, bfloat16 or float32 (all the same);
        D a power of two between 16 and 128. Arbitrary strides are read without copies.
      key_padding_mask: optional bool (B, Lk), True = keep this key.
      dropout_p: attention-probability dropout in [0, 1).
      softmax_scale: default 1/sqrt(D).
      seed: dropout seed: None draws one on q's device with torch's generator (so
        ``torch.manual_seed`` makes it reproducible, and compiled graphs / CUDA graphs capture
        the draw); an int, or a 1-element int64 tensor on q's device, fixes it. Ignored when
        dropout_p == 0.
    Returns:
      (B, Lq, H, D) contiguous tensor in q's dtype. Fully masked query rows are zeros.

    Runs as the custom ops ``lxmert_kernels::flash_attention_fwd`` / ``flash_attention_bwd``;
    the checks here read shapes and dtypes only, so ``torch.compile(fullgraph=True)`` traces it.
    """
    _check_qkv(q, k, v)
    dropout_p, seed_t, softmax_scale = _checked_settings((q, k, v), key_padding_mask, q.shape[0], k.shape[1],
                                                         dropout_p, softmax_scale, seed)
    out, _ = flash_attention_fwd(q, k, v, key_padding_mask, seed_t, dropout_p, softmax_scale)
    return out


# ----------------------------------------------------------------------------------------------
# custom ops: lxmert_kernels::flash_attention_qkv_fwd / flash_attention_qkv_bwd (packed input)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lxmert_kernels::flash_attention_qkv_fwd", mutates_args=())
def flash_attention_qkv_fwd(
    qkv_bl3hd: torch.Tensor, key_padding_mask_bl: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract: self-attention of one packed projection qkv_bl3hd (B, L, 3, H, D) (any
    strides; q, k, v are read in place through qkv[:, :, i]); mask, seed, dropout and outputs
    (o (B, L, H, D), lse (B, H, L)) as in ``flash_attention_fwd``."""
    q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)
    return core.attention_forward(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed)


@flash_attention_qkv_fwd.register_fake
def _(qkv_bl3hd, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    B, L, _, H, D = qkv_bl3hd.shape
    return qkv_bl3hd.new_empty((B, L, H, D)), qkv_bl3hd.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("lxmert_kernels::flash_attention_qkv_bwd", mutates_args=())
def flash_attention_qkv_bwd(
    do_blhd: torch.Tensor, qkv_bl3hd: torch.Tensor, o_blhd: torch.Tensor, lse_bhl: torch.Tensor,
    key_padding_mask_bl: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float,
    softmax_scale: float,
) -> torch.Tensor:
    """Kernel contract: dqkv (B, L, 3, H, D) contiguous, dtype of qkv: dq, dk, dv are written
    straight into one tensor (no stack copy in the projection's backward). Deterministic."""
    q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)
    dqkv_bl3hd = torch.empty(qkv_bl3hd.shape, dtype=qkv_bl3hd.dtype, device=qkv_bl3hd.device)
    dq_blhd, dk_blhd, dv_blhd = dqkv_bl3hd.unbind(dim=2)
    core.attention_backward(do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl,
                            softmax_scale, dropout_p, seed, dq_blhd, dk_blhd, dv_blhd)
    return dqkv_bl3hd


@flash_attention_qkv_bwd.register_fake
def _(do_blhd, qkv_bl3hd, o_blhd, lse_bhl, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    return qkv_bl3hd.new_empty(qkv_bl3hd.shape)


def _qkv_setup_context(ctx, inputs, output):
    qkv_bl3hd, mask_bl, seed, dropout_p, softmax_scale = inputs
    o_blhd, lse_bhl = output
    ctx.save_for_backward(qkv_bl3hd, mask_bl, seed, o_blhd, lse_bhl)
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _qkv_backward(ctx, do_blhd, _dlse):
    qkv_bl3hd, mask_bl, seed, o_blhd, lse_bhl = ctx.saved_tensors
    dqkv = flash_attention_qkv_bwd(do_blhd, qkv_bl3hd, o_blhd, lse_bhl, mask_bl, seed, ctx.dropout_p,
                                   ctx.softmax_scale)
    return dqkv, None, None, None, None


flash_attention_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


def flash_attention_qkv(qkv, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None):
    """Self-attention of one packed projection: ``flash_attention(*qkv.unbind(2), ...)`` with one
    gradient tensor.

    Args:
      qkv: (B, L, 3, H, D), e.g. ``linear(x).view(B, L, 3, H, D)``; any strides.
      key_padding_mask, dropout_p, softmax_scale, seed: as in :func:`flash_attention`.
    Returns:
      (B, L, H, D) contiguous. The gradient of qkv is one (B, L, 3, H, D) tensor written by the
      kernels (no ``torch.stack`` of dq, dk, dv in backward). Same dropout mask as
      :func:`flash_attention` for the same seed.

    Runs as the custom ops ``lxmert_kernels::flash_attention_qkv_fwd`` / ``flash_attention_qkv_bwd``.
    """
    _check_packed("flash_attention_qkv", qkv)
    B, L = qkv.shape[:2]
    dropout_p, seed_t, softmax_scale = _checked_settings((qkv,), key_padding_mask, B, L, dropout_p, softmax_scale,
                                                         seed)
    out, _ = flash_attention_qkv_fwd(qkv, key_padding_mask, seed_t, dropout_p, softmax_scale)
    return out


def attention_dropout_mask(seed, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device="cpu"):
    """The (B, H, Lq, Lk) bool keep mask that :func:`flash_attention` applies for ``seed``
    (an int or a 1-element int64 tensor).

    For tests and debugging: ``out == softmax(scores) * keep / (1 - p) @ v``.
    """
    device = torch.device(device)
    check_device(core.INTERPRETED, torch.empty(0, device=device))
    return core.dropout_keep_mask(as_seed_tensor(seed, device), float(dropout_p), B, H, Lq, Lk, device)
