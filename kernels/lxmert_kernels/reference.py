"""Plain-PyTorch references for every op of this package (tests and benchmarks use them).

Each takes ``compute_dtype``: the references upcast to it (float64 on CPU for the oracle,
float32 on GPU) or, with ``compute_dtype=None``, compute in the inputs' dtype, which measures
the error PyTorch itself makes in low precision. Dropout is given as an explicit keep mask so a
reference can reproduce exactly what a kernel did.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _cast(t, dtype):
    return t if (t is None or dtype is None) else t.to(dtype)


def attention_ref(q_blhd, k_blhd, v_blhd, key_padding_mask_bl=None, dropout_p=0.0, dropout_keep_bhqk=None,
                  softmax_scale=None, compute_dtype=torch.float64):
    """softmax(q k^T * scale, keys masked) [* keep / (1 - p)] v, layout (B, L, H, D).

    Fully masked query rows give zeros and zero gradients. Returns (B, Lq, H, D) in
    ``compute_dtype`` (or the input dtype when it is None).
    """
    q, k, v = (_cast(t, compute_dtype) for t in (q_blhd, k_blhd, v_blhd))
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    s_bhqk = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_padding_mask_bl is not None:
        keep_b11k = key_padding_mask_bl[:, None, None, :]
        s_bhqk = s_bhqk.masked_fill(~keep_b11k, torch.finfo(s_bhqk.dtype).min)
    p_bhqk = torch.softmax(s_bhqk, dim=-1)
    if key_padding_mask_bl is not None:
        # rows without any kept key: zero (softmax above gave a uniform row over masked keys)
        any_b111 = key_padding_mask_bl.any(dim=-1)[:, None, None, None]
        p_bhqk = p_bhqk * any_b111.to(p_bhqk.dtype)
    if dropout_keep_bhqk is not None and dropout_p > 0.0:
        p_bhqk = p_bhqk * dropout_keep_bhqk.to(p_bhqk.dtype) / (1.0 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p_bhqk, v)


def cross_attention_ref(qkv_bl3hd, n_lang, key_padding_mask_bl=None, dropout_p=0.0, dropout_keep_bhll=None,
                        softmax_scale=None, compute_dtype=torch.float64):
    """Both directions of LXMERT's cross-attention from one packed projection.

    qkv (B, L, 3, H, D) over [lang; vision]; out[:, :n_lang] = lang queries -> vision keys,
    out[:, n_lang:] = vision queries -> lang keys. ``dropout_keep_bhll`` is indexed by global
    (query, key) positions, as the kernel's mask is.
    """
    q, k, v = qkv_bl3hd.unbind(dim=2)
    n = n_lang
    m = key_padding_mask_bl
    keep = dropout_keep_bhll
    out_lang = attention_ref(
        q[:, :n], k[:, n:], v[:, n:], None if m is None else m[:, n:], dropout_p,
        None if keep is None else keep[:, :, :n, n:], softmax_scale, compute_dtype,
    )
    out_vis = attention_ref(
        q[:, n:], k[:, :n], v[:, :n], None if m is None else m[:, :n], dropout_p,
        None if keep is None else keep[:, :, n:, :n], softmax_scale, compute_dtype,
    )
    return torch.cat([out_lang, out_vis], dim=1)


def layer_norm_ref(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, dropout_keep=None,
                   compute_dtype=torch.float64):
    """LayerNorm(dropout(x) + residual) over the last dim; dropout given by its keep mask."""
    h = _cast(x, compute_dtype)
    if dropout_keep is not None and dropout_p > 0.0:
        h = h * dropout_keep.to(h.dtype) / (1.0 - dropout_p)
    if residual is not None:
        h = h + _cast(residual, compute_dtype)
    w = _cast(weight, compute_dtype if compute_dtype is not None else x.dtype)
    b = _cast(bias, compute_dtype if compute_dtype is not None else x.dtype)
    return F.layer_norm(h, (h.shape[-1],), w, b, eps)


def bias_gelu_ref(x, bias, compute_dtype=torch.float64):
    """Exact (erf) GELU of x + bias, bias broadcast over the last dim."""
    return F.gelu(_cast(x, compute_dtype) + _cast(bias, compute_dtype), approximate="none")
