"""Fused dropout + residual add + LayerNorm (LXMERT's post-LN sublayer output), fwd and bwd.

Public entry point: :func:`layer_norm`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_device, check_dropout, check_dtype, is_interpreted, num_programs_hint,
                      resolve_seed)

MAX_HIDDEN = 8192  # a tile of whole rows is held in registers: N <= MAX_HIDDEN


@triton.jit
def _ln_dropout_keep(seed, rows, cols, N, dropout_p):
    """keep(row, col) = rand(seed, row * N + col) >= p (int32 offsets, wrapping past 2**31)."""
    return tl.rand(seed, rows[:, None] * N + cols[None, :]) >= dropout_p


@triton.jit
def _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, seed,
                   HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """h = dropout(x) + residual on a (BLOCK_M, BLOCK_N) tile of rows, fp32, and the keep mask."""
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    keep = ok
    if HAS_DROPOUT:
        keep = _ln_dropout_keep(seed, rows, cols, N, dropout_p) & ok
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
    if HAS_RES:
        h += tl.load(RES + rows64 * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return h, keep


@triton.jit(do_not_specialize=["seed", "dropout_p", "eps"])
def _ln_fwd_kernel(
    X, RES, W, B, Y, MEAN, RSTD,
    stride_x, stride_r, stride_y,
    M, N, eps, dropout_p, seed,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    h, keep = _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, seed, HAS_RES, HAS_DROPOUT)
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


@triton.jit(do_not_specialize=["seed", "dropout_p"])
def _ln_bwd_kernel(
    DY, X, RES, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART,
    stride_dy, stride_x, stride_r, stride_dx, stride_dr,
    M, N, rows_per_program, dropout_p, seed,
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
        h, keep = _ln_load_input(X, RES, rows, cols, ok, stride_x, stride_r, N, dropout_p, seed,
                                 HAS_RES, HAS_DROPOUT)
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


@triton.jit(do_not_specialize=["seed", "dropout_p"])
def _ln_dropout_mask_kernel(OUT, M, N, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    keep = _ln_dropout_keep(seed, rows, cols, N, dropout_p)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.uint8), mask=ok)


def _launch_params(N: int, interpreted: bool):
    """(BLOCK_M, BLOCK_N, launch kwargs): whole rows per tile, ~4K elements per tile on GPU."""
    block_n = triton.next_power_of_2(N)
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


class LayerNormFunction(torch.autograd.Function):
    """Kernel contract.

    y = LayerNorm(dropout(x) + residual) * weight + bias over the last dim N (N <= 8192).
    Inputs
      x (..., N) float16 / bfloat16 / float32, rows must be unit-stride in the last dim (other
        layouts are made contiguous); residual: None or same shape (any float dtype);
      weight, bias (N,) any float dtype (fp32 master weights with bf16 activations are fine).
      dropout_p on x only (not on the residual), Philox keep mask rand(seed, row * N + col) >= p.
    Output
      y, shape and dtype of x.
    Saved for backward
      x, residual, weight (no copies), mean and rstd (M,) float32; the backward recomputes
      h = dropout(x) + residual and regenerates the mask from the seed (nothing of size M x N
      is stored besides the inputs).
    Backward
      dx (dtype of x), dresidual (dtype of residual), dweight / dbias (dtypes of weight / bias):
      each program sums dW, dB over its run of rows into an fp32 partial buffer, the host
      reduces the partials: deterministic, no atomics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual, dropout_p, seed):
        N = x.shape[-1]
        x_mn = _rows(x, N)
        r_mn = _rows(residual, N) if residual is not None else None
        M = x_mn.shape[0]
        y_mn = torch.empty((M, N), dtype=x.dtype, device=x.device)
        mean_m = torch.empty((M,), dtype=torch.float32, device=x.device)
        rstd_m = torch.empty((M,), dtype=torch.float32, device=x.device)
        interp = is_interpreted(_ln_fwd_kernel)
        block_m, block_n, launch = _launch_params(N, interp)
        if M > 0:
            _ln_fwd_kernel[(triton.cdiv(M, block_m),)](
                x_mn, r_mn if r_mn is not None else x_mn, weight, bias, y_mn, mean_m, rstd_m,
                x_mn.stride(0), r_mn.stride(0) if r_mn is not None else 0, y_mn.stride(0),
                M, N, float(eps), float(dropout_p), int(seed),
                HAS_RES=r_mn is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
                **launch,
            )
        ctx.save_for_backward(x_mn, r_mn, weight, bias, mean_m, rstd_m)
        ctx.has_res = residual is not None
        ctx.res_shape = None if residual is None else residual.shape
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        return y_mn.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_mn, r_mn, weight, bias, mean_m, rstd_m = ctx.saved_tensors
        M, N = x_mn.shape
        dy_mn = _rows(dy, N)
        dx_mn = torch.empty((M, N), dtype=x_mn.dtype, device=x_mn.device)
        dr_mn = torch.empty((M, N), dtype=r_mn.dtype, device=r_mn.device) if ctx.has_res else None
        interp = is_interpreted(_ln_bwd_kernel)
        block_m, block_n, launch = _launch_params(N, interp)
        programs = max(1, min(triton.cdiv(M, block_m), num_programs_hint(x_mn.device, interp)))
        rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m if M > 0 else 1
        programs = triton.cdiv(M, rows_per_program) if M > 0 else 1
        dw_part = torch.zeros((programs, N), dtype=torch.float32, device=x_mn.device)
        db_part = torch.zeros((programs, N), dtype=torch.float32, device=x_mn.device)
        if M > 0:
            _ln_bwd_kernel[(programs,)](
                dy_mn, x_mn, r_mn if r_mn is not None else x_mn, weight, mean_m, rstd_m,
                dx_mn, dr_mn if dr_mn is not None else dx_mn, dw_part, db_part,
                dy_mn.stride(0), x_mn.stride(0), r_mn.stride(0) if r_mn is not None else 0,
                dx_mn.stride(0), dr_mn.stride(0) if dr_mn is not None else 0,
                M, N, rows_per_program, float(ctx.dropout_p), int(ctx.seed),
                HAS_RES=ctx.has_res, HAS_DROPOUT=ctx.dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
                **launch,
            )
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype)
        x_shape = dy.shape
        dres = dr_mn.view(ctx.res_shape) if ctx.has_res else None
        return dx_mn.view(x_shape), dw, db, None, dres, None, None


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0, seed=None):
    """LayerNorm(dropout(x) + residual) over the last dim, fp32 statistics.

    Args:
      x: (..., N) float16 / bfloat16 / float32, N <= 8192.
      weight, bias: (N,).
      eps: LayerNorm epsilon (LXMERT: 1e-12).
      residual: optional tensor of x's shape, added after dropout.
      dropout_p: dropout on x in [0, 1); seed: Philox seed (None: drawn from torch's generator).
    Returns:
      Tensor of x's shape and dtype. Gradients flow to x, residual, weight and bias.
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
    check_device(_ln_fwd_kernel, x, weight, bias, residual)
    dropout_p = check_dropout(dropout_p)
    seed = resolve_seed(seed, dropout_p)
    return LayerNormFunction.apply(x, weight, bias, float(eps), residual, dropout_p, seed)


def layer_norm_dropout_mask(seed: int, dropout_p: float, shape, device="cpu") -> torch.Tensor:
    """The bool keep mask (of ``shape``, last dim N) that :func:`layer_norm` applies to x."""
    shape = tuple(shape)
    N = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    out = torch.empty((M, N), dtype=torch.uint8, device=device)
    check_device(_ln_dropout_mask_kernel, out)
    if out.numel():
        block_m, block_n, _ = _launch_params(N, is_interpreted(_ln_dropout_mask_kernel))
        _ln_dropout_mask_kernel[(triton.cdiv(M, block_m),)](out, M, N, float(dropout_p), int(seed),
                                                            BLOCK_M=block_m, BLOCK_N=block_n)
    return out.bool().view(shape)
