"""Triton kernels shared by ``flash_attention``, ``flash_attention_qkv`` and
``bidirectional_cross_attention``.

Two paths serve every op (``uses_one_tile`` picks one per call):

* **one tile** (``_attn_fwd_one_tile_kernel``, ``_attn_bwd_one_tile_kernel``): every query and
  key of a direction fit one (BLOCK_Q, BLOCK_K) tile. One program per (batch * head, direction)
  computes the softmax without online rescaling, and the backward computes delta, dQ, dK and dV
  in the same program: one launch per pass. For the cross pair the tiles are sized to the
  segments (direction 0 = language queries in BLOCK_Q x vision keys in BLOCK_K, direction 1 the
  same tiles swapped; a runtime branch on the direction picks the specialisation).
* **multi-launch** for longer sequences: a program owns a block of rows of one *segment* and
  loops over the rows of the *other* segment (forward with an online softmax; backward = delta
  pre-pass, dK/dV over key blocks, dQ over query blocks).

Segments: plain attention (``TWO_SEGMENTS=False``) has queries ``[0, LQ)`` and keys ``[0, LK)``.
Bidirectional cross-attention (``TWO_SEGMENTS=True``): q, k, v are views of one packed
``(B, L, 3, H, D)`` tensor with ``LQ == LK == L``; rows ``[0, n_split)`` are the language
tokens, rows ``[n_split, L)`` the vision tokens, and each segment's queries attend to the other
segment's keys, both directions in one launch (the program id picks the segment).

Layouts (all strided; the host passes every stride, nothing is copied):
  q_blhd, k_blhd, v_blhd, o_blhd, do_blhd: (B, L, H, D)
  lse_bhl, delta_bhl: (B, H, LQ) float32, contiguous
  mask_bl: (B, LK) uint8 (a bool tensor viewed as bytes), nonzero = keep

Numerics: scores and softmax statistics in fp32, exp2 with ``log2(e)`` folded into the scale,
``-inf`` for masked keys. A query row with no kept key gets ``l == 0``: its output is 0 and its
logsumexp is stored as ``+inf`` so that the backward recomputes ``p = 0`` for it (zero grads).

Dropout: ``_dropout.attention_keep``: one Philox call per 2 x 2 block of (query, key), counter
(key // 2, 8 * (query // 16) + query % 8, b * H + h, stream), queries and keys counted from the
start of their segment, stream 2 for the second segment's queries (``_stream``), so both paths
and the mask helper regenerate the same mask whatever their tiles; 1 / (1 - p) is applied once
per output element in the forward. The seed is read from a device tensor (``SEED``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import dtype_key, is_interpreted
from .tuning import length_bucket
from ._dropout import attention_keep

# Literal constants in the kernels: log2(e) = 1.4426950408889634, ln(2) = 0.6931471805599453.


# ----------------------------------------------------------------------------------------------
# jit building blocks
# ----------------------------------------------------------------------------------------------
@triton.jit
def _segment(pid, n_split, L_OWN, L_OTHER, TWO_SEGMENTS: tl.constexpr, BLOCK: tl.constexpr):
    """(own_start, own_len, other_start, other_len, block_in_segment) for program ``pid``.

    For TWO_SEGMENTS the segments are [0, n_split) and [n_split, L_OWN) (L_OWN == L_OTHER);
    the first cdiv(n_split, BLOCK) programs own blocks of the first segment.
    """
    if TWO_SEGMENTS:
        nblk_a = tl.cdiv(n_split, BLOCK)
        in_b = (pid >= nblk_a).to(tl.int32)
        own_start = in_b * n_split
        own_len = n_split + in_b * (L_OWN - 2 * n_split)
        other_start = (1 - in_b) * n_split
        other_len = L_OWN - own_len
        blk = pid - in_b * nblk_a
    else:
        own_start = pid * 0
        own_len = L_OWN + pid * 0
        other_start = pid * 0
        other_len = L_OTHER + pid * 0
        blk = pid
    return own_start, own_len, other_start, other_len, blk


@triton.jit
def _stream(q_start):
    """Dropout stream of a query segment (``_dropout.attention_keep``): 0 for queries starting at
    row 0 (plain attention, cross direction 0), 2 for the second segment's queries."""
    return (q_start > 0) * 2


@triton.jit
def _load_rows(base, rows, row_ok, stride_row, offs_d, stride_d, COMPUTE_F32: tl.constexpr):
    """Load a (len(rows), D) tile; rows that are out of range read as 0."""
    t = tl.load(base + rows[:, None] * stride_row + offs_d[None, :] * stride_d, mask=row_ok[:, None], other=0.0)
    if COMPUTE_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE selects exact fp32 products (no tf32) for fp32 inputs."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _key_ok(mask_base, keys_local, k_start, k_len, stride_mn, HAS_MASK: tl.constexpr):
    """Boolean (BLOCK_N,) vector: key in range and not padding."""
    ok = keys_local < k_len
    if HAS_MASK:
        km = tl.load(mask_base + (k_start + keys_local) * stride_mn, mask=ok, other=0)
        ok = ok & (km != 0)
    return ok


@triton.jit
def _scores_log2(q, k, qk_scale, key_ok, IEEE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores q k^T * scale * log2(e) in fp32, -inf on dropped keys."""
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _key_block(q, k_base, v_base, mask_base, start_n, k_start, k_len, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_mn, offs_d, qk_scale, HAS_MASK: tl.constexpr, COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The keys [start_n, start_n + BLOCK_N) of the key segment, for the loops over key blocks:
    (k, v, the scores of ``q`` against them from ``_scores_log2``)."""
    cols_local = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols_local < k_len
    cols = k_start + cols_local
    key_ok = _key_ok(mask_base, cols_local, k_start, k_len, stride_mn, HAS_MASK)
    k = _load_rows(k_base, cols, col_ok, stride_kn, offs_d, stride_kd, COMPUTE_F32)
    v = _load_rows(v_base, cols, col_ok, stride_vn, offs_d, stride_vd, COMPUTE_F32)
    return k, v, _scores_log2(q, k, qk_scale, key_ok, IEEE)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["dropout_p", "softmax_scale"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MASK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    H, LQ, LK, n_split,
    softmax_scale, dropout_p, SEED,
    LQ_KEY, LK_KEY,  # bucketed lengths: autotune key only
    D: tl.constexpr, TWO_SEGMENTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch * head on axis 0: no 65535 grid limit
    pid_m = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_start, q_len, k_start, k_len, blk = _segment(pid_m, n_split, LQ, LK, TWO_SEGMENTS, BLOCK_M)

    rows_local = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows_local < q_len
    rows = q_start + rows_local
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, stride_qm, offs_d, stride_qd,
                   COMPUTE_F32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    mask_base = MASK + off_b * stride_mb

    qk_scale = softmax_scale * 1.4426950408889634
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        k, v, s = _key_block(q, k_base, v_base, mask_base, start_n, k_start, k_len, stride_kn, stride_kd, stride_vn,
                             stride_vd, stride_mn, offs_d, qk_scale, HAS_MASK, COMPUTE_F32, IEEE, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = attention_keep(seed, pid_bh, blk * BLOCK_M, start_n, _stream(q_start), dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)  # 1 / (1 - p) is applied to the output
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    l_ok = l_i > 0.0
    l_safe = tl.where(l_ok, l_i, 1.0)
    if HAS_DROPOUT:
        out = acc * (inv_keep / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + pid_bh * LQ + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    H, L,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_bhl[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (fp32)."""
    pid_bh = tl.program_id(0)  # batch * head on axis 0: no 65535 grid limit
    pid_m = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_d = tl.arange(0, D)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, rows, row_ok, stride_om, offs_d, stride_od, True)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, rows, row_ok, stride_dom, offs_d, stride_dod,
                    True)
    tl.store(DELTA + pid_bh * L + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit(do_not_specialize=["dropout_p", "softmax_scale"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, DK, DV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_mb, stride_mn,
    H, LQ, LK, n_split,
    softmax_scale, dropout_p, SEED,
    LQ_KEY, LK_KEY,
    D: tl.constexpr, TWO_SEGMENTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per key block: dK, dV accumulated over all query blocks (no atomics)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_start, k_len, q_start, q_len, blk = _segment(pid_n, n_split, LK, LQ, TWO_SEGMENTS, BLOCK_N)

    cols_local = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols_local < k_len
    cols = k_start + cols_local
    offs_d = tl.arange(0, D)
    key_ok = _key_ok(MASK + off_b * stride_mb, cols_local, k_start, k_len, stride_mn, HAS_MASK)
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, stride_kn, offs_d, stride_kd,
                   COMPUTE_F32)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, stride_vn, offs_d, stride_vd,
                   COMPUTE_F32)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh

    qk_scale = softmax_scale * 1.4426950408889634
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start_m in range(0, q_len, BLOCK_M):
        rows_local = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows_local < q_len
        rows = q_start + rows_local
        q = _load_rows(q_base, rows, row_ok, stride_qm, offs_d, stride_qd, COMPUTE_F32)
        do = _load_rows(do_base, rows, row_ok, stride_dom, offs_d, stride_dod, COMPUTE_F32)
        lse2 = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh * LQ + rows, mask=row_ok, other=0.0)
        s = _scores_log2(q, k, qk_scale, key_ok, IEEE)
        p = tl.exp2(s - lse2[:, None])  # softmax probabilities, before dropout
        dp = _dot(do, tl.trans(v), IEEE)  # dL/d(dropped probabilities)
        if HAS_DROPOUT:
            keep = attention_keep(seed, pid_bh, start_m, blk * BLOCK_N, _stream(q_start), dropout_p, BLOCK_M, BLOCK_N)
            p_drop = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            p_drop = p
        dv += _dot(tl.trans(p_drop.to(do.dtype)), do, IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * softmax_scale

    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["dropout_p", "softmax_scale"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, MASK, DQ,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_mb, stride_mn,
    H, LQ, LK, n_split,
    softmax_scale, dropout_p, SEED,
    LQ_KEY, LK_KEY,
    D: tl.constexpr, TWO_SEGMENTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per query block: dQ accumulated over all key blocks (no atomics)."""
    pid_bh = tl.program_id(0)  # batch * head on axis 0: no 65535 grid limit
    pid_m = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_start, q_len, k_start, k_len, blk = _segment(pid_m, n_split, LQ, LK, TWO_SEGMENTS, BLOCK_M)

    rows_local = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows_local < q_len
    rows = q_start + rows_local
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, stride_qm, offs_d, stride_qd,
                   COMPUTE_F32)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, rows, row_ok, stride_dom, offs_d, stride_dod,
                    COMPUTE_F32)
    lse2 = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * LQ + rows, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    mask_base = MASK + off_b * stride_mb

    qk_scale = softmax_scale * 1.4426950408889634
    inv_keep = 1.0 / (1.0 - dropout_p)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        k, v, s = _key_block(q, k_base, v_base, mask_base, start_n, k_start, k_len, stride_kn, stride_kd, stride_vn,
                             stride_vd, stride_mn, offs_d, qk_scale, HAS_MASK, COMPUTE_F32, IEEE, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), IEEE)
        if HAS_DROPOUT:
            keep = attention_keep(seed, pid_bh, blk * BLOCK_M, start_n, _stream(q_start), dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    dq = dq * softmax_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["dropout_p"])
def _attn_dropout_mask_kernel(OUT, LQ, LK, dropout_p, SEED, stream, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the keep mask (B*H, LQ, LK) uint8 that the attention kernels use."""
    seed = tl.load(SEED)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = attention_keep(seed, pid_bh, pid_m * BLOCK_M, pid_n * BLOCK_N, stream, dropout_p, BLOCK_M, BLOCK_N)
    ok = (rows[:, None] < LQ) & (cols[None, :] < LK)
    ptrs = OUT + (pid_bh.to(tl.int64) * LQ + rows[:, None]) * LK + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=ok)


# ----------------------------------------------------------------------------------------------
# one-tile kernels: every query and key of a direction in one tile (LXMERT's 20 and 36)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_one_tile(
    Q, K, V, O, LSE, MASK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    pid_bh, off_b, off_h, LQ, q_start, q_len, k_start, k_len, q_block_start,
    softmax_scale, dropout_p, seed,
    D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Softmax attention of the queries [q_start + q_block_start, + BLOCK_Q) (of the segment
    [q_start, q_start + q_len)) over the keys [k_start, k_start + k_len), all in one
    (BLOCK_Q, BLOCK_K) tile: no online rescaling."""
    rows_local = q_block_start + tl.arange(0, BLOCK_Q)
    row_ok = rows_local < q_len
    rows = q_start + rows_local
    cols_local = tl.arange(0, BLOCK_K)
    col_ok = cols_local < k_len
    cols = k_start + cols_local
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, stride_qm, offs_d, stride_qd,
                   COMPUTE_F32)
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, stride_kn, offs_d, stride_kd,
                   COMPUTE_F32)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, stride_vn, offs_d, stride_vd,
                   COMPUTE_F32)
    key_ok = _key_ok(MASK + off_b * stride_mb, cols_local, k_start, k_len, stride_mn, HAS_MASK)
    s = _scores_log2(q, k, softmax_scale * 1.4426950408889634, key_ok, IEEE)
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m_safe[:, None])
    l = tl.sum(p, 1)
    row_scale = 1.0
    if HAS_DROPOUT:
        keep = attention_keep(seed, pid_bh, q_block_start, 0, _stream(q_start), dropout_p, BLOCK_Q, BLOCK_K)
        p = tl.where(keep, p, 0.0)
        row_scale = 1.0 / (1.0 - dropout_p)  # applied once per output element, not per score
    acc = _dot(p.to(v.dtype), v, IEEE)
    l_ok = l > 0.0
    l_safe = tl.where(l_ok, l, 1.0)
    out = acc * (row_scale / l_safe)[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(l_ok, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + pid_bh * LQ + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["dropout_p", "softmax_scale"])
def _attn_fwd_one_tile_kernel(
    Q, K, V, O, LSE, MASK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mb, stride_mn,
    H, LQ, LK, n_split,
    softmax_scale, dropout_p, SEED,
    D: tl.constexpr, TWO_SEGMENTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Plain attention: one program per (batch * head, query block): queries
    [BLOCK_Q * block, + BLOCK_Q) of [0, LQ) over every key [0, LK) in a BLOCK_K tile (one block
    when BLOCK_Q holds LQ). Two segments: one program per (batch * head, direction): direction 0
    = language queries [0, n_split) (BLOCK_Q) over vision keys [n_split, L) (BLOCK_K), direction
    1 the other way round with the tiles swapped, so each tile is sized to its segment."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    if TWO_SEGMENTS:  # direction 0: language queries [0, n_split) over vision keys [n_split, LK)
        direction = tl.program_id(1)
        q_len, k_start, k_len = n_split, n_split, LK - n_split
        q_block_start = 0
    else:
        direction = 0
        q_len, k_start, k_len = LQ, 0, LK
        q_block_start = tl.program_id(1) * BLOCK_Q
    if direction == 0:
        _fwd_one_tile(Q, K, V, O, LSE, MASK,
                      stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                      stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                      stride_mb, stride_mn, pid_bh, off_b, off_h, LQ, 0, q_len, k_start, k_len, q_block_start,
                      softmax_scale, dropout_p, seed,
                      D, HAS_MASK, HAS_DROPOUT, COMPUTE_F32, IEEE, BLOCK_Q, BLOCK_K)
    else:  # direction 1: vision queries over language keys, the tiles swapped
        _fwd_one_tile(Q, K, V, O, LSE, MASK,
                      stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                      stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                      stride_mb, stride_mn, pid_bh, off_b, off_h, LQ, n_split, LQ - n_split, 0, n_split, 0,
                      softmax_scale, dropout_p, seed,
                      D, HAS_MASK, HAS_DROPOUT, COMPUTE_F32, IEEE, BLOCK_K, BLOCK_Q)


@triton.jit
def _bwd_one_tile(
    Q, K, V, O, DO, LSE, MASK, DQ, DK, DV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_mb, stride_mn,
    pid_bh, off_b, off_h, LQ, q_start, q_len, k_start, k_len,
    softmax_scale, dropout_p, seed,
    D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_F32: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ of the direction's queries and dK, dV of its keys, delta = rowsum(dO * O) inside;
    every row is written by exactly one program (no atomics)."""
    rows_local = tl.arange(0, BLOCK_Q)
    row_ok = rows_local < q_len
    rows = q_start + rows_local
    cols_local = tl.arange(0, BLOCK_K)
    col_ok = cols_local < k_len
    cols = k_start + cols_local
    offs_d = tl.arange(0, D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, rows, row_ok, stride_qm, offs_d, stride_qd,
                   COMPUTE_F32)
    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh, cols, col_ok, stride_kn, offs_d, stride_kd,
                   COMPUTE_F32)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh, cols, col_ok, stride_vn, offs_d, stride_vd,
                   COMPUTE_F32)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh, rows, row_ok, stride_dom, offs_d, stride_dod,
                    COMPUTE_F32)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh, rows, row_ok, stride_om, offs_d, stride_od, True)
    delta = tl.sum(o * do.to(tl.float32), 1)
    lse2 = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    key_ok = _key_ok(MASK + off_b * stride_mb, cols_local, k_start, k_len, stride_mn, HAS_MASK)
    s = _scores_log2(q, k, softmax_scale * 1.4426950408889634, key_ok, IEEE)
    p = tl.exp2(s - lse2[:, None])  # softmax probabilities, before dropout
    dp = _dot(do, tl.trans(v), IEEE)  # dL/d(dropped probabilities)
    if HAS_DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
        keep = attention_keep(seed, pid_bh, 0, 0, _stream(q_start), dropout_p, BLOCK_Q, BLOCK_K)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        p_drop = p
    dv = _dot(tl.trans(p_drop.to(do.dtype)), do, IEEE)
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    ds = p * (dp - delta[:, None])
    dq = _dot(ds.to(k.dtype), k, IEEE) * softmax_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * softmax_scale
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["dropout_p", "softmax_scale"])
def _attn_bwd_one_tile_kernel(
    Q, K, V, O, DO, LSE, MASK, DQ, DK, DV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_mb, stride_mn,
    H, LQ, LK, n_split,
    softmax_scale, dropout_p, SEED,
    D: tl.constexpr, TWO_SEGMENTS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_F32: tl.constexpr, IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole backward in one launch: one program per (batch * head, direction), tiles as in
    ``_attn_fwd_one_tile_kernel``. Deterministic: no atomics, each dq/dk/dv row has one writer."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    if TWO_SEGMENTS:  # direction 0: language queries [0, n_split) over vision keys [n_split, LK)
        direction = tl.program_id(1)
        q_len, k_start, k_len = n_split, n_split, LK - n_split
    else:
        direction = 0
        q_len, k_start, k_len = LQ, 0, LK
    if direction == 0:
        _bwd_one_tile(Q, K, V, O, DO, LSE, MASK, DQ, DK, DV,
                      stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                      stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                      stride_dob, stride_dom, stride_doh, stride_dod,
                      stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                      stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                      stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                      stride_mb, stride_mn, pid_bh, off_b, off_h, LQ, 0, q_len, k_start, k_len,
                      softmax_scale, dropout_p, seed,
                      D, HAS_MASK, HAS_DROPOUT, COMPUTE_F32, IEEE, BLOCK_Q, BLOCK_K)
    else:  # direction 1: vision queries over language keys, the tiles swapped
        _bwd_one_tile(Q, K, V, O, DO, LSE, MASK, DQ, DK, DV,
                      stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                      stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                      stride_dob, stride_dom, stride_doh, stride_dod,
                      stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                      stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                      stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                      stride_mb, stride_mn, pid_bh, off_b, off_h, LQ, n_split, LQ - n_split, 0, n_split,
                      softmax_scale, dropout_p, seed,
                      D, HAS_MASK, HAS_DROPOUT, COMPUTE_F32, IEEE, BLOCK_K, BLOCK_Q)


# True when these kernels run in the Triton interpreter (decided when the decorators above ran).
INTERPRETED = is_interpreted(_attn_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
ONE_TILE_MAX = 128  # a direction runs in one tile when its bucketed Lq and Lk are at most this ...
ONE_TILE_MAX_ELEMS = 128 * 64 * 64  # ... and BLOCK_Q * BLOCK_K * D is at most this (registers)


def one_tile_fits(lq: int, lk: int, D: int) -> bool:
    """True when every query and key of a direction fit one tile: the one-launch path."""
    bq, bk = length_bucket(lq), length_bucket(lk)
    return bq <= ONE_TILE_MAX and bk <= ONE_TILE_MAX and bq * bk * D <= ONE_TILE_MAX_ELEMS


def _arch(device) -> int:
    if INTERPRETED or device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _config(kernel_name, device, lq, lk, D, dtype, has_dropout, flags, launch):
    """Launch kwargs: heuristics table by default, autotuned when tuning.settings.autotune."""
    if INTERPRETED:
        if tuning.settings.autotune:
            raise ValueError("lxmert_kernels.tuning: autotuning needs a GPU (the Triton interpreter cannot time kernels)")
        return {} if kernel_name.endswith("one_tile") else dict(tuning.INTERPRETER_BLOCKS)
    return tuning.config_for(kernel_name, _arch(device), lq, lk, D, dtype_key(dtype), has_dropout, flags, launch)


def autotune_candidates(kernel):
    """Autotuning candidates of a kernel at the LXMERT base shapes (compile_check --report --space)."""
    names = {_attn_fwd_one_tile_kernel: "fwd_one_tile", _attn_bwd_one_tile_kernel: "bwd_one_tile",
             _attn_fwd_kernel: "fwd", _attn_bwd_dkdv_kernel: "dkdv", _attn_bwd_dq_kernel: "dq"}
    name = names.get(kernel)
    return [] if name is None else tuning.candidates(name, 36, 36, 64)


def _effective_lengths(LQ, LK, two_segments, n_split):
    """((Lq, Lk) of direction 0, (Lq, Lk) of direction 1 or None)."""
    if two_segments:
        return (n_split, LQ - n_split), (LQ - n_split, n_split)
    return (LQ, LK), None


def _seed_arg(seed_t, placeholder):
    """The SEED pointer argument: the seed tensor, or any tensor when the kernel has no dropout
    (HAS_DROPOUT=False never reads it)."""
    return placeholder if seed_t is None else seed_t


def _strides4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _flags(q, key_padding_mask, dropout_p, two_segments, D):
    return dict(
        D=D,
        TWO_SEGMENTS=two_segments,
        HAS_MASK=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        # The interpreter mis-handles low-precision arithmetic: compute everything in fp32 there.
        COMPUTE_F32=INTERPRETED or q.dtype == torch.float32,
        IEEE=q.dtype == torch.float32,
    )


def _flag_key(flags) -> str:
    return "".join(k[0] + str(int(v)) for k, v in sorted(flags.items()) if k != "D")


def _mask_args(key_padding_mask, fallback):
    if key_padding_mask is None:
        return fallback, 0, 0
    m = key_padding_mask.view(torch.uint8)  # bool -> bytes, no copy
    return m, m.stride(0), m.stride(1)


def _one_tile_blocks(LQ, LK, two_segments, n_split):
    """(BLOCK_Q, BLOCK_K) of direction 0 (direction 1 uses them swapped), or None when a
    direction does not fit one tile."""
    (lq0, lk0), _ = _effective_lengths(LQ, LK, two_segments, n_split)
    return length_bucket(lq0), length_bucket(lk0)


def uses_one_tile(LQ, LK, D, two_segments=False, n_split=0) -> bool:
    """Whether the one-launch kernels serve this call (else the multi-launch path)."""
    d0, d1 = _effective_lengths(LQ, LK, two_segments, n_split)
    return one_tile_fits(*d0, D) and (d1 is None or one_tile_fits(*d1, D))


def attention_forward(q_blhd, k_blhd, v_blhd, key_padding_mask_bl, softmax_scale, dropout_p, seed_t,
                      two_segments=False, n_split=0):
    """Launch the forward kernel. Returns (o_blhd contiguous, lse_bhl float32).

    ``seed_t``: 1-element int64 tensor on the inputs' device (read by the kernel), or None
    without dropout. Short directions take the one-tile kernel (one program per batch, head and
    direction); longer ones the multi-block kernel with an online softmax.
    """
    B, LQ, H, D = q_blhd.shape
    LK = k_blhd.shape[1]
    o_blhd = torch.empty((B, LQ, H, D), dtype=q_blhd.dtype, device=q_blhd.device)
    lse_bhl = torch.empty((B, H, LQ), dtype=torch.float32, device=q_blhd.device)
    if B * H * LQ == 0:
        return o_blhd, lse_bhl
    mask, smb, smn = _mask_args(key_padding_mask_bl, q_blhd)
    flags = _flags(q_blhd, key_padding_mask_bl, dropout_p, two_segments, D)
    args = (q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, mask,
            *_strides4(q_blhd), *_strides4(k_blhd), *_strides4(v_blhd), *_strides4(o_blhd), smb, smn,
            H, LQ, LK, n_split, float(softmax_scale), float(dropout_p), _seed_arg(seed_t, lse_bhl))
    if uses_one_tile(LQ, LK, D, two_segments, n_split):
        bq, bk = _one_tile_blocks(LQ, LK, two_segments, n_split)
        if not two_segments:  # plain attention: the forward may split the queries (tuning.forward_query_block)
            bq = tuning.forward_query_block(bq, bk)
        grid = (B * H, 2 if two_segments else triton.cdiv(LQ, bq))

        def launch(cfg):
            _attn_fwd_one_tile_kernel[grid](*args, **flags, BLOCK_Q=bq, BLOCK_K=bk, **cfg)

        launch(_config("fwd_one_tile", q_blhd.device, bq, bk, D, q_blhd.dtype, dropout_p > 0, _flag_key(flags),
                       launch))
        return o_blhd, lse_bhl

    lq_seg, lk_seg = (max(n_split, LQ - n_split),) * 2 if two_segments else (LQ, LK)

    def launch(cfg):
        bm = cfg["BLOCK_M"]
        nblk = triton.cdiv(n_split, bm) + triton.cdiv(LQ - n_split, bm) if two_segments else triton.cdiv(LQ, bm)
        _attn_fwd_kernel[(B * H, nblk)](*args, length_bucket(lq_seg), length_bucket(lk_seg), **flags, **cfg)

    launch(_config("fwd", q_blhd.device, lq_seg, lk_seg, D, q_blhd.dtype, dropout_p > 0, _flag_key(flags), launch))
    return o_blhd, lse_bhl


def attention_backward(do_blhd, q_blhd, k_blhd, v_blhd, o_blhd, lse_bhl, key_padding_mask_bl,
                       softmax_scale, dropout_p, seed_t, dq_blhd, dk_blhd, dv_blhd,
                       two_segments=False, n_split=0):
    """Launch the backward, writing into the (possibly strided) dq, dk, dv.

    Short directions: one launch of the one-tile kernel (dQ, dK, dV and delta in one program
    per batch, head and direction). Longer ones: 1. preprocess delta = rowsum(dO * O),
    2. dK, dV: one program per key block over the query blocks, 3. dQ: one program per query
    block over the key blocks. No atomics anywhere: the result is bitwise deterministic.
    """
    B, LQ, H, D = q_blhd.shape
    LK = k_blhd.shape[1]
    if B * H == 0:
        return
    if LQ == 0 or LK == 0:
        dq_blhd.zero_()
        dk_blhd.zero_()
        dv_blhd.zero_()
        return
    mask, smb, smn = _mask_args(key_padding_mask_bl, q_blhd)
    flags = _flags(q_blhd, key_padding_mask_bl, dropout_p, two_segments, D)
    seed_arg = _seed_arg(seed_t, lse_bhl)
    if uses_one_tile(LQ, LK, D, two_segments, n_split):
        bq, bk = _one_tile_blocks(LQ, LK, two_segments, n_split)
        grid = (B * H, 2 if two_segments else 1)

        def launch(cfg):
            _attn_bwd_one_tile_kernel[grid](
                q_blhd, k_blhd, v_blhd, o_blhd, do_blhd, lse_bhl, mask, dq_blhd, dk_blhd, dv_blhd,
                *_strides4(q_blhd), *_strides4(k_blhd), *_strides4(v_blhd), *_strides4(o_blhd),
                *_strides4(do_blhd), *_strides4(dq_blhd), *_strides4(dk_blhd), *_strides4(dv_blhd), smb, smn,
                H, LQ, LK, n_split, float(softmax_scale), float(dropout_p), seed_arg,
                **flags, BLOCK_Q=bq, BLOCK_K=bk, **cfg,
            )

        launch(_config("bwd_one_tile", q_blhd.device, bq, bk, D, q_blhd.dtype, dropout_p > 0, _flag_key(flags),
                       launch))
        return

    delta_bhl = torch.empty((B, H, LQ), dtype=torch.float32, device=q_blhd.device)
    pre_block = 32 if INTERPRETED else 64
    _attn_bwd_preprocess_kernel[(B * H, triton.cdiv(LQ, pre_block))](
        o_blhd, do_blhd, delta_bhl, *_strides4(o_blhd), *_strides4(do_blhd), H, LQ, D=D, BLOCK_M=pre_block,
    )
    lq_seg, lk_seg = (max(n_split, LQ - n_split),) * 2 if two_segments else (LQ, LK)
    common = (H, LQ, LK, n_split, float(softmax_scale), float(dropout_p), seed_arg,
              length_bucket(lq_seg), length_bucket(lk_seg))

    def launch_dkdv(cfg):
        bn = cfg["BLOCK_N"]
        nblk = triton.cdiv(n_split, bn) + triton.cdiv(LK - n_split, bn) if two_segments else triton.cdiv(LK, bn)
        _attn_bwd_dkdv_kernel[(B * H, nblk)](
            q_blhd, k_blhd, v_blhd, do_blhd, lse_bhl, delta_bhl, mask, dk_blhd, dv_blhd,
            *_strides4(q_blhd), *_strides4(k_blhd), *_strides4(v_blhd), *_strides4(do_blhd),
            *_strides4(dk_blhd), *_strides4(dv_blhd), smb, smn,
            *common, **flags, **cfg,
        )

    def launch_dq(cfg):
        bm = cfg["BLOCK_M"]
        nblk = triton.cdiv(n_split, bm) + triton.cdiv(LQ - n_split, bm) if two_segments else triton.cdiv(LQ, bm)
        _attn_bwd_dq_kernel[(B * H, nblk)](
            q_blhd, k_blhd, v_blhd, do_blhd, lse_bhl, delta_bhl, mask, dq_blhd,
            *_strides4(q_blhd), *_strides4(k_blhd), *_strides4(v_blhd), *_strides4(do_blhd),
            *_strides4(dq_blhd), smb, smn,
            *common, **flags, **cfg,
        )

    key = _flag_key(flags)
    launch_dkdv(_config("dkdv", q_blhd.device, lq_seg, lk_seg, D, q_blhd.dtype, dropout_p > 0, key, launch_dkdv))
    launch_dq(_config("dq", q_blhd.device, lq_seg, lk_seg, D, q_blhd.dtype, dropout_p > 0, key, launch_dq))


def dropout_keep_mask(seed_t, dropout_p: float, B: int, H: int, LQ: int, LK: int, device, q_start: int = 0) -> torch.Tensor:
    """The (B, H, LQ, LK) bool keep mask the attention kernels use for this seed (int64 tensor)
    and p, for queries of a segment starting at global row ``q_start`` (0 for plain attention;
    it picks the dropout stream), query rows and key columns counted from their segment's start."""
    out = torch.empty((B, H, LQ, LK), dtype=torch.uint8, device=device)
    if out.numel() == 0:
        return out.bool()
    bm = bn = 32
    _attn_dropout_mask_kernel[(B * H, triton.cdiv(LQ, bm), triton.cdiv(LK, bn))](
        out, LQ, LK, float(dropout_p), seed_t, 2 if q_start > 0 else 0, BLOCK_M=bm, BLOCK_N=bn,
    )
    return out.bool()
