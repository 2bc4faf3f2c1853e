"""LXMERT's bidirectional cross-attention, both directions in one kernel launch.

LXMERT shares the cross-attention weights between the two directions, so one QKV projection of
the concatenated ``[lang; vision]`` tokens feeds both: language queries attend to vision
keys/values and vision queries attend to language keys/values. The kernels are those of
``flash_attention`` (``_attention_core``) with ``TWO_SEGMENTS=True``: the program id selects the
direction, so one forward launch (and one launch per backward phase) covers both.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from . import _attention_core as core
from ._common import as_seed_tensor, check_device
from .flash_attention import _check_packed, _checked_settings


# ----------------------------------------------------------------------------------------------
# custom ops: lxmert_kernels::cross_attention_fwd / cross_attention_bwd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lxmert_kernels::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    qkv_bl3hd: torch.Tensor, n_lang: int, key_padding_mask_bl: Optional[torch.Tensor], seed: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract.

    Inputs
      qkv_bl3hd (B, L, 3, H, D), L = Lt + Lv: the output of one projection of the
        concatenated [lang; vision] tokens, float16 / bfloat16 / float32, any strides (q, k, v
        are read in place through the views qkv[:, :, i]); D a power of two in [16, 128].
      n_lang: Lt, number of language rows (0 <= n_lang <= L).
      key_padding_mask_bl (B, L) bool over [lang; vision], True = keep, or None.
      seed (1-element int64 tensor, read by the kernels) and dropout_p: attention dropout as in
        flash_attention, with the keep mask indexed by global (query, key) positions in [0, L)
        (see ``cross_attention_dropout_mask``).
    Outputs
      o_blhd (B, L, H, D) contiguous: rows [:n_lang] = lang queries -> vision keys,
      rows [n_lang:] = vision queries -> lang keys. Query rows of a direction whose keys are
      all masked are zeros with zero gradients.
      lse_bhl (B, H, L) float32 (+inf on fully masked rows).
    One kernel launch serves both directions (the program id picks the direction).
    """
    q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)  # views
    return core.attention_forward(
        q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed,
        two_segments=True, n_split=n_lang,
    )


@cross_attention_fwd.register_fake
def _(qkv_bl3hd, n_lang, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    B, L, _, H, D = qkv_bl3hd.shape
    return qkv_bl3hd.new_empty((B, L, H, D)), qkv_bl3hd.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("lxmert_kernels::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    do_blhd: torch.Tensor, qkv_bl3hd: torch.Tensor, o_blhd: torch.Tensor, lse_bhl: torch.Tensor, n_lang: int,
    key_padding_mask_bl: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float,
    softmax_scale: float,
) -> torch.Tensor:
    """Kernel contract: dqkv (B, L, 3, H, D) contiguous, dtype of qkv: the preprocess, dK/dV and
    dQ kernels are each launched once for both directions and write dq, dk, dv straight into
    one tensor, so the gradient flows into the single projection. Deterministic (no atomics);
    the dropout mask is regenerated from the seed tensor.
    """
    q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)
    dqkv_bl3hd = torch.empty(qkv_bl3hd.shape, dtype=qkv_bl3hd.dtype, device=qkv_bl3hd.device)
    dq_blhd, dk_blhd, dv_blhd = dqkv_bl3hd.unbind(dim=2)
    core.attention_backward(
        do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl,
        softmax_scale, dropout_p, seed, dq_blhd, dk_blhd, dv_blhd,
        two_segments=True, n_split=n_lang,
    )
    return dqkv_bl3hd


@cross_attention_bwd.register_fake
def _(do_blhd, qkv_bl3hd, o_blhd, lse_bhl, n_lang, key_padding_mask_bl, seed, dropout_p, softmax_scale):
    return qkv_bl3hd.new_empty(qkv_bl3hd.shape)


def _ca_setup_context(ctx, inputs, output):
    qkv_bl3hd, n_lang, mask_bl, seed, dropout_p, softmax_scale = inputs
    o_blhd, lse_bhl = output
    ctx.save_for_backward(qkv_bl3hd, mask_bl, seed, o_blhd, lse_bhl)
    ctx.n_lang = n_lang
    ctx.dropout_p = dropout_p
    ctx.softmax_scale = softmax_scale


def _ca_backward(ctx, do_blhd, _dlse):
    qkv_bl3hd, mask_bl, seed, o_blhd, lse_bhl = ctx.saved_tensors
    dqkv = cross_attention_bwd(do_blhd, qkv_bl3hd, o_blhd, lse_bhl, ctx.n_lang, mask_bl, seed, ctx.dropout_p,
                               ctx.softmax_scale)
    return dqkv, None, None, None, None, None


cross_attention_fwd.register_autograd(_ca_backward, setup_context=_ca_setup_context)


def bidirectional_cross_attention(qkv, n_lang, key_padding_mask=None, dropout_p=0.0, softmax_scale=None,
                                  seed=None):
    """Both directions of LXMERT cross-attention from one packed projection, one launch.

    Args:
      qkv: (B, Lt + Lv, 3, H, D) projection of the concatenated [lang; vision] tokens.
      n_lang: Lt, the number of language tokens (rows [0, n_lang) of qkv).
      key_padding_mask: optional bool (B, Lt + Lv), True = keep.
      dropout_p, softmax_scale, seed: as in :func:`flash_attention`.
    Returns:
      (B, Lt + Lv, H, D): rows [:n_lang] lang -> vision attention, rows [n_lang:] vision -> lang.

    Runs as the custom ops ``lxmert_kernels::cross_attention_fwd`` / ``cross_attention_bwd``.
    """
    _check_packed("bidirectional_cross_attention", qkv)
    B, L = qkv.shape[:2]
    n_lang = operator.index(n_lang)
    if not 0 <= n_lang <= L:
        raise ValueError(f"lxmert_kernels.bidirectional_cross_attention: n_lang must be in [0, {L}], got {n_lang}")
    dropout_p, seed_t, softmax_scale = _checked_settings((qkv,), key_padding_mask, B, L, dropout_p, softmax_scale,
                                                         seed)
    out, _ = cross_attention_fwd(qkv, n_lang, key_padding_mask, seed_t, dropout_p, softmax_scale)
    return out


def cross_attention_dropout_mask(seed, dropout_p: float, B: int, H: int, L: int, device="cpu", *, n_lang: int):
    """The (B, H, L, L) bool keep mask, indexed by global (query, key) positions, that
    :func:`bidirectional_cross_attention` applies for ``seed`` (an int or a 1-element int64
    tensor) and the split ``n_lang``.

    Only the blocks [:n_lang, n_lang:] and [n_lang:, :n_lang] are used by the op (the diagonal
    blocks are True). The kernels count query rows and key columns from the start of their
    segments (so a mask group never straddles the split), hence ``n_lang`` is needed to place them.
    """
    device = torch.device(device)
    check_device(core.INTERPRETED, torch.empty(0, device=device))
    n_lang = operator.index(n_lang)
    if not 0 <= n_lang <= L:
        raise ValueError(f"lxmert_kernels.cross_attention_dropout_mask: n_lang must be in [0, {L}], got {n_lang}")
    seed_t = as_seed_tensor(seed, device)
    n_vis = L - n_lang
    keep = torch.ones((B, H, L, L), dtype=torch.bool, device=device)
    keep[..., :n_lang, n_lang:] = core.dropout_keep_mask(seed_t, float(dropout_p), B, H, n_lang, n_vis, device)
    keep[..., n_lang:, :n_lang] = core.dropout_keep_mask(seed_t, float(dropout_p), B, H, n_vis, n_lang, device,
                                                         q_start=n_lang)
    return keep
