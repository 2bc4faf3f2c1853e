"""LXMERT's bidirectional cross-attention, both directions in one kernel launch.

LXMERT shares the cross-attention weights between the two directions, so one QKV projection of
the concatenated ``[lang; vision]`` tokens feeds both: language queries attend to vision
keys/values and vision queries attend to language keys/values. The kernels are those of
``flash_attention`` (``_attention_core``) with ``TWO_SEGMENTS=True``: the program id selects the
direction, so one forward launch (and one launch per backward phase) covers both.
"""
from __future__ import annotations

import math

import torch

from . import _attention_core as core
from ._common import check_device, check_dropout, check_dtype, resolve_seed
from .flash_attention import _check_head_dim, _check_mask


class BidirectionalCrossAttentionFunction(torch.autograd.Function):
    """Kernel contract.

    Inputs
      qkv_bl3hd (B, L, 3, H, D), L = Lt + Lv: the output of one projection of the
        concatenated [lang; vision] tokens, float16 / bfloat16 / float32, any strides (q, k, v
        are read in place through the views qkv[:, :, i]); D a power of two in [16, 128].
      n_lang: Lt, number of language rows (0 <= n_lang <= L).
      key_padding_mask_bl (B, L) bool over [lang; vision], True = keep, or None.
      dropout_p, seed: attention dropout as in flash_attention, with the keep mask indexed by
        global (query, key) positions in [0, L) (see ``cross_attention_dropout_mask``).
    Output
      o_blhd (B, L, H, D) contiguous: rows [:n_lang] = lang queries -> vision keys,
      rows [n_lang:] = vision queries -> lang keys. Query rows of a direction whose keys are
      all masked are zeros with zero gradients.
    Saved for backward
      qkv (no copy), o, lse_bhl (B, H, L) float32, the mask and the seed.
    Backward
      preprocess + dK/dV + dQ kernels, each launched once for both directions, writing dq, dk,
      dv straight into one (B, L, 3, H, D) tensor so the gradient flows into the single
      projection. Deterministic (no atomics).
    """

    @staticmethod
    def forward(ctx, qkv_bl3hd, n_lang, key_padding_mask_bl, dropout_p, softmax_scale, seed):
        q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)  # views
        o_blhd, lse_bhl = core.attention_forward(
            q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed,
            two_segments=True, n_split=n_lang,
        )
        ctx.save_for_backward(qkv_bl3hd, o_blhd, lse_bhl, key_padding_mask_bl)
        ctx.n_lang = n_lang
        ctx.softmax_scale = softmax_scale
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        return o_blhd

    @staticmethod
    def backward(ctx, do_blhd):
        qkv_bl3hd, o_blhd, lse_bhl, mask_bl = ctx.saved_tensors
        q_blhd, k_blhd, v_blhd = qkv_bl3hd.unbind(dim=2)
        dqkv_bl3hd = torch.empty(qkv_bl3hd.shape, dtype=qkv_bl3hd.dtype, device=qkv_bl3hd.device)
        dq_blhd, dk_blhd, dv_blhd = dqkv_bl3hd.unbind(dim=2)
        core.attention_backward(
            do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, mask_bl,
            ctx.softmax_scale, ctx.dropout_p, ctx.seed, dq_blhd, dk_blhd, dv_blhd,
            two_segments=True, n_split=ctx.n_lang,
        )
        return dqkv_bl3hd, None, None, None, None, None


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
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("lxmert_kernels.bidirectional_cross_attention: qkv must have shape (B, L, 3, H, D)")
    check_dtype("qkv", qkv)
    B, L, _, H, D = qkv.shape
    _check_head_dim(D)
    n_lang = int(n_lang)
    if not 0 <= n_lang <= L:
        raise ValueError(f"lxmert_kernels.bidirectional_cross_attention: n_lang must be in [0, {L}], got {n_lang}")
    check_device(core._attn_fwd_kernel, qkv, key_padding_mask)
    _check_mask(key_padding_mask, B, L, qkv.device)
    dropout_p = check_dropout(dropout_p)
    seed = resolve_seed(seed, dropout_p)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    return BidirectionalCrossAttentionFunction.apply(qkv, n_lang, key_padding_mask, dropout_p, float(softmax_scale),
                                                     seed)


def cross_attention_dropout_mask(seed: int, dropout_p: float, B: int, H: int, L: int, device="cpu"):
    """The (B, H, L, L) bool keep mask (global query, key positions) used for ``seed``.

    Only the blocks [:n_lang, n_lang:] and [n_lang:, :n_lang] are used by the op.
    """
    check_device(core._attn_dropout_mask_kernel, torch.empty(0, device=device))
    return core.dropout_keep_mask(seed, dropout_p, B, H, L, L, device)
