"""Fused dropout + residual add + LayerNorm (LXMERT's post-LN sublayer output), fwd and bwd.

Public entry point: :func:`layer_norm`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dropout import layer_norm_keep
from ._common import (as_seed_tensor, check_device, check_dropout, check_dtype, is_interpreted,
                      num_programs_hint, seed_tensor)

MAX_HIDDEN = 8192  # a tile of whole rows is held in registers: N <= MAX_HIDDEN


@triton.jit
def _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, SEED,
                   HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """h = dropout(x) + residual on a (BLOCK_M, BLOCK_N) tile of rows, fp32, and the keep mask.
    SEED points to the int64 Philox seed (read only with HAS_DROPOUT)."""
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    keep = ok
    if HAS_DROPOUT:
        keep = layer_norm_keep(tl.load(SEED), rows, dropout_p, BLOCK_M, BLOCK_N) & ok
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
    if HAS_RES:
        h += tl.load(RES + rows64 * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return h, keep


@triton.jit(do_not_specialize=["dropout_p", "eps"])
def _ln_fwd_kernel(
    X, RES, W, B, Y, MEAN, RSTD,
    stride_x, stride_r, stride_y,
    M, N, eps, dropout_p, SEED,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    h, keep = _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, SEED, HAS_RES, HAS_DROPOUT,
                             BLOCK_M, BLOCK_N)
    mean = tl.sum(h, 1) / N
    hc = tl.where(ok, h - mean[:, None], 0.0)
    var = tl.sum(hc * hc, 1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = hc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["dropout_p"])
def _ln_bwd_kernel(
    DY, X, RES, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART,
    stride_dy, stride_x, stride_r, stride_dx, stride_dr,
    M, N, rows_per_program, dropout_p, SEED,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each program handles a contiguous run of rows (tiles of BLOCK_M) and writes its dW, dB
    partial sums (fp32) to row ``pid`` of DW_PART / DB_PART; the host reduces them in a fixed
    order, so the result is deterministic."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        h, keep = _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, SEED,
                                 HAS_RES, HAS_DROPOUT, BLOCK_M, BLOCK_N)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        rows64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, 1) / N
        c2 = tl.sum(wdy, 1) / N
        dh = tl.where(ok, (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], 0.0)
        if HAS_RES:
            tl.store(DRES + rows64 * stride_dr + cols[None, :], dh.to(DRES.dtype.element_ty), mask=ok)
        if HAS_DROPOUT:
            dx = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        else:
            dx = dh
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_PART + pid * N + cols, db, mask=col_ok)


@triton.jit(do_not_specialize=["dropout_p"])
def _ln_dropout_mask_kernel(OUT, M, N, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = tl.load(SEED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    keep = layer_norm_keep(seed, rows, dropout_p, BLOCK_M, BLOCK_N)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.uint8), mask=ok)


# True when these kernels run in the Triton interpreter (decided when the decorators above ran).
INTERPRETED = is_interpreted(_ln_fwd_kernel)


def _launch_params(N: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, launch kwargs): whole rows per tile, ~4K elements per tile on GPU."""
    block_n = max(16, triton.next_power_of_2(N))  # dropout groups of 8 columns need >= 8
    if interpreted:
        return max(1, min(16, 4096 // block_n)), block_n, {}
    block_m = max(2, min(16, 4096 // block_n))
    num_warps = min(16, max(4, block_m * block_n // 512))
    return block_m, block_n, {"num_warps": num_warps}


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    t2 = t.reshape(-1, N)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _ln_forward(x, weight, bias, residual, seed, eps: float, dropout_p: float):
    """Launch the forward kernel: (y (x's shape, contiguous), mean (M,), rstd (M,) fp32)."""
    N = x.shape[-1]
    x_mn = _rows(x, N)
    r_mn = _rows(residual, N) if residual is not None else None
    M = x_mn.shape[0]
    y_mn = torch.empty((M, N), dtype=x.dtype, device=x.device)
    mean_m = torch.empty((M,), dtype=torch.float32, device=x.device)
    rstd_m = torch.empty((M,), dtype=torch.float32, device=x.device)
    block_m, block_n, launch = _launch_params(N, INTERPRETED)
    if M > 0:
        _ln_fwd_kernel[(triton.cdiv(M, block_m),)](
            x_mn, r_mn if r_mn is not None else x_mn, weight, bias, y_mn, mean_m, rstd_m,
            x_mn.stride(0), r_mn.stride(0) if r_mn is not None else 0, y_mn.stride(0),
            M, N, float(eps), float(dropout_p), seed if seed is not None else mean_m,
            HAS_RES=r_mn is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
            **launch,
        )
    return y_mn.view(x.shape), mean_m, rstd_m


def _ln_backward(dy, x, weight, bias, residual, mean_m, rstd_m, seed, dropout_p: float):
    """Launch the backward kernel: (dx, dresidual (shape (0,) without residual), dweight, dbias)."""
    N = x.shape[-1]
    x_mn = _rows(x, N)
    r_mn = _rows(residual, N) if residual is not None else None
    M = x_mn.shape[0]
    dy_mn = _rows(dy, N)
    dx_mn = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if r_mn is not None:
        dr_mn = torch.empty((M, N), dtype=residual.dtype, device=x.device)
    else:
        dr_mn = torch.empty((0,), dtype=x.dtype, device=x.device)
    block_m, block_n, launch = _launch_params(N, INTERPRETED)
    programs = max(1, min(triton.cdiv(M, block_m), num_programs_hint(x.device, INTERPRETED)))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m if M > 0 else 1
    programs = triton.cdiv(M, rows_per_program) if M > 0 else 1
    dw_part = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((programs, N), dtype=torch.float32, device=x.device)
    if M > 0:
        _ln_bwd_kernel[(programs,)](
            dy_mn, x_mn, r_mn if r_mn is not None else x_mn, weight, mean_m, rstd_m,
            dx_mn, dr_mn if r_mn is not None else dx_mn, dw_part, db_part,
            dy_mn.stride(0), x_mn.stride(0), r_mn.stride(0) if r_mn is not None else 0,
            dx_mn.stride(0), dr_mn.stride(0) if r_mn is not None else 0,
            M, N, rows_per_program, float(dropout_p), seed if seed is not None else mean_m,
            HAS_RES=r_mn is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
            **launch,
        )
    dres = dr_mn.view(x.shape) if r_mn is not None else dr_mn
    return dx_mn.view(x.shape), dres, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops: lxmert_kernels::layer_norm_fwd / layer_norm_bwd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lxmert_kernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], eps: float, dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract.

    y = LayerNorm(dropout(x) + residual) * weight + bias over the last dim N (N <= 8192).
    Inputs
      x (..., N) float16 / bfloat16 / float32, rows must be unit-stride in the last dim (other
        layouts are copied); residual: None or same shape (any float dtype);
      weight, bias (N,) any float dtype (fp32 master weights with bf16 activations are fine).
      dropout_p on x only (not on the residual); keep mask from lxmert_kernels._dropout (one Philox
        call per 4 columns, counter (col // 4, row low, row high, 1)),
        with the seed read from the 1-element int64 tensor ``seed`` (None without dropout).
    Outputs
      y (shape and dtype of x, contiguous), mean and rstd (M,) float32 with M = x.numel() / N.
    Nothing of size M x N is stored besides the inputs: the backward recomputes
    h = dropout(x) + residual and regenerates the mask from the seed tensor.
    """
    return _ln_forward(x, weight, bias, residual, seed, eps, dropout_p)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, seed, eps, dropout_p):
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("lxmert_kernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel contract: (dx (dtype of x), dresidual (dtype of residual; an empty (0,) tensor
    without residual), dweight, dbias (dtypes of weight, bias)), all contiguous. Each program sums
    dW, dB over its run of rows into an fp32 partial buffer that is reduced in a fixed order:
    deterministic, no atomics. ``bias`` gives only the dtype of dbias.
    """
    return _ln_backward(dy, x, weight, bias, residual, mean, rstd, seed, dropout_p)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, residual, mean, rstd, seed, dropout_p):
    dres = residual.new_empty(residual.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dres, weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, residual, seed, eps, dropout_p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, seed, mean, rstd)
    ctx.dropout_p = dropout_p


def _ln_backward_rule(ctx, dy, _dmean, _drstd):
    x, weight, bias, residual, seed, mean, rstd = ctx.saved_tensors
    dx, dres, dw, db = layer_norm_bwd(dy, x, weight, bias, residual, mean, rstd, seed, ctx.dropout_p)
    return dx, dw, db, (dres if residual is not None else None), None, None, None


layer_norm_fwd.register_autograd(_ln_backward_rule, setup_context=_ln_setup_context)


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None):
    """LayerNorm(dropout(x) + residual) over the last dim, fp32 statistics.

    Args:
      x: (..., N) float16 / bfloat16 / float32, N <= 8192.
      weight, bias: (N,).
      eps: LayerNorm epsilon (LXMERT: 1e-12).
      residual: optional tensor of x's shape, added after dropout.
      dropout_p: dropout on x in [0, 1); seed: as in :func:`lxmert_kernels.flash_attention`
        (None: drawn on x's device with torch's generator; an int or an int64 tensor fixes it).
    Returns:
      Tensor of x's shape and dtype. Gradients flow to x, residual, weight and bias.

    Runs as the custom ops ``lxmert_kernels::layer_norm_fwd`` / ``layer_norm_bwd``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("lxmert_kernels.layer_norm: x must be a tensor with at least 1 dim")
    check_dtype("x", x)
    N = x.shape[-1]
    if not 1 <= N <= MAX_HIDDEN:
        raise ValueError(f"lxmert_kernels.layer_norm: last dim must be in [1, {MAX_HIDDEN}], got {N}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N,):
            raise ValueError(f"lxmert_kernels.layer_norm: {name} must have shape ({N},)")
        check_dtype(name, t)
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(
                f"lxmert_kernels.layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
            )
        check_dtype("residual", residual)
    check_device(INTERPRETED, x, weight, bias, residual)
    dropout_p = check_dropout(dropout_p)
    seed_t = seed_tensor(seed, dropout_p, x.device)
    y, _, _ = layer_norm_fwd(x, weight, bias, residual, seed_t, float(eps), dropout_p)
    return y


def layer_norm_dropout_mask(seed, dropout_p: float, shape, device="cpu") -> torch.Tensor:
    """The bool keep mask (of ``shape``, last dim N) that :func:`layer_norm` applies to x for
    ``seed`` (an int or a 1-element int64 tensor)."""
    shape = tuple(shape)
    N = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    device = torch.device(device)
    out = torch.empty((M, N), dtype=torch.uint8, device=device)
    check_device(INTERPRETED, out)
    if out.numel():
        block_m, block_n, _ = _launch_params(N, INTERPRETED)
        _ln_dropout_mask_kernel[(triton.cdiv(M, block_m),)](out, M, N, float(dropout_p), as_seed_tensor(seed, device),
                                                            BLOCK_M=block_m, BLOCK_N=block_n)
    return out.bool().view(shape)
