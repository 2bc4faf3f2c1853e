"""Fused bias add + exact (erf) GELU, LXMERT's FFN intermediate activation, fwd and bwd.

Public entry point: :func:`bias_gelu`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import check_device, check_dtype, is_interpreted, num_programs_hint


@triton.jit
def _gelu_and_grad(z, NEED_GRAD: tl.constexpr):
    """gelu(z) = z * Phi(z) and, if NEED_GRAD, gelu'(z) = Phi(z) + z * phi(z); fp32."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if NEED_GRAD:
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = cdf + z * pdf
    else:
        out = z * cdf
    return out


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = gelu(X + BIAS[None, :]) on one (BLOCK_M, BLOCK_N) tile of a contiguous (M, N) tensor."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = _gelu_and_grad(x + b[None, :], False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, BIAS, DX, DB_PART, M, N, rows_per_program,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DX = DY * gelu'(X + BIAS); program (i, j) covers rows [i*rows_per_program, ...) of the
    column block j and writes its fp32 column sums of DX to DB_PART[i, cols]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        dx = tl.where(ok, dy * _gelu_and_grad(x + b[None, :], True), 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        db += tl.sum(dx, 0)
    tl.store(DB_PART + pid_m * N + cols, db, mask=col_ok)


# True when these kernels run in the Triton interpreter (decided when the decorators above ran).
INTERPRETED = is_interpreted(_bias_gelu_fwd_kernel)


def _gelu_forward(x, bias):
    N = x.shape[-1]
    x_c = x.contiguous()
    y = torch.empty(x_c.shape, dtype=x_c.dtype, device=x_c.device)
    M = x_c.numel() // N if N else 0
    block_m, block_n = (32, 128) if INTERPRETED else (8, 256)
    if M and N:
        _bias_gelu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            x_c, bias, y, M, N, BLOCK_M=block_m, BLOCK_N=block_n, **({} if INTERPRETED else {"num_warps": 4})
        )
    return y


def _gelu_backward(dy, x, bias):
    N = x.shape[-1]
    x_c = x.contiguous()
    M = x_c.numel() // N if N else 0
    dy_c = dy.contiguous()
    dx = torch.empty(x_c.shape, dtype=x_c.dtype, device=x_c.device)
    block_n = min(triton.next_power_of_2(max(N, 1)), 128 if INTERPRETED else 256)
    block_m = 32
    col_blocks = triton.cdiv(N, block_n) if N else 1
    # enough programs to fill the GPU: ~4 per SM in total
    row_programs = max(1, min(triton.cdiv(max(M, 1), block_m),
                              triton.cdiv(num_programs_hint(x_c.device, INTERPRETED), col_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(max(M, 1), row_programs), block_m) * block_m
    row_programs = triton.cdiv(max(M, 1), rows_per_program)
    db_part = torch.zeros((row_programs, N), dtype=torch.float32, device=x_c.device)
    if M and N:
        _bias_gelu_bwd_kernel[(row_programs, col_blocks)](
            dy_c, x_c, bias, dx, db_part, M, N, rows_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, **({} if INTERPRETED else {"num_warps": 8}),
        )
    return dx, db_part.sum(0).to(bias.dtype)


# ----------------------------------------------------------------------------------------------
# custom ops: lxmert_kernels::bias_gelu_fwd / bias_gelu_bwd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lxmert_kernels::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Kernel contract.

    y = gelu(x + bias) with the exact erf GELU (not the tanh approximation).
    Inputs
      x (..., N) float16 / bfloat16 / float32 (copied if it is not contiguous); bias (N,) any
      of those dtypes. Computation in fp32.
    Output
      y, shape and dtype of x, contiguous. The backward recomputes gelu' from x and bias.
    """
    return _gelu_forward(x, bias)


@bias_gelu_fwd.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("lxmert_kernels::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel contract: (dx (dtype of x, contiguous), dbias (dtype of bias)); dbias from fp32
    per-program column partial sums reduced in a fixed order: deterministic, no atomics."""
    return _gelu_backward(dy, x, bias)


@bias_gelu_bwd.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _gelu_setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _gelu_backward_rule(ctx, dy):
    x, bias = ctx.saved_tensors
    return bias_gelu_bwd(dy, x, bias)


bias_gelu_fwd.register_autograd(_gelu_backward_rule, setup_context=_gelu_setup_context)


def bias_gelu(x, bias):
    """Exact (erf) GELU of ``x + bias``, bias broadcast over the last dim.

    Args:
      x: (..., N) float16 / bfloat16 / float32.
      bias: (N,).
    Returns:
      Tensor of x's shape and dtype; gradients flow to x and bias.

    Runs as the custom ops ``lxmert_kernels::bias_gelu_fwd`` / ``bias_gelu_bwd``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("lxmert_kernels.bias_gelu: x must be a tensor with at least 1 dim")
    check_dtype("x", x)
    N = x.shape[-1]
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
        raise ValueError(f"lxmert_kernels.bias_gelu: bias must have shape ({N},)")
    check_dtype("bias", bias)
    check_device(INTERPRETED, x, bias)
    return bias_gelu_fwd(x, bias)
