"""Triton twin of kernels/rmsnorm.py: the frozen-weight RMSNorm's forward and backward, a tile of whole rows a
program.

Each program reads its rows once (x, and y's gradient in backward), sums each row's squares in fp32 registers and
writes the rows once; the reference's 8 and 18 torch ops a direction are one launch each.

Rounding follows the reference's dtypes: ``x * r`` is rounded to x's dtype before the weight multiplies it, y is
rounded to ``promote(weight, x)``, ``grad * weight`` to that dtype and then to x's, the input gradient to x's
dtype. Every op is one IEEE-rounded fp32 op (``enable_fp_fusion=False``, ``div_rn``/``sqrt_rn`` for the rsqrt), and
bf16 travels as int16 bits rounded by integer arithmetic (kernels/triton_bits.py), so CUDA and the interpreter give
the same bits. What differs from the reference is the order of the row's sums (a tree here, torch's own reduction
there): the result is within one rounding of it, not its bits (tests/unit/test_rmsnorm_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_pipeline.kernels.triton_bits import KIND, bits_view, load_f32, round_bf16, store_f32


@triton.jit
def _inv_rms(x, n_cols, eps):
    """``1 / sqrt(mean(x²) + eps)`` of each row of a [ROWS, BLOCK] tile (padding lanes are 0), IEEE-rounded ops."""
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    return tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))[:, None]


@triton.jit
def _load_rows(
    x_ptr, w_ptr, n_rows, n_cols, X_KIND: tl.constexpr, W_KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    """This program's [ROWS, BLOCK] tile of x and the weight over its columns, both in fp32, with the tile's element
    offsets and what of it is in bounds."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)[None, :]
    valid = (rows[:, None] < n_rows) & (cols < n_cols)
    offs = rows[:, None] * n_cols + cols
    return offs, valid, load_f32(x_ptr, offs, valid, X_KIND), load_f32(w_ptr, cols, cols < n_cols, W_KIND)


@triton.jit
def _rmsnorm_forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    n_rows,
    n_cols,
    eps,
    X_KIND: tl.constexpr,
    W_KIND: tl.constexpr,
    Y_KIND: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, valid, x, w = _load_rows(x_ptr, w_ptr, n_rows, n_cols, X_KIND, W_KIND, ROWS, BLOCK)
    normed = x * _inv_rms(x, n_cols, eps)
    if X_KIND == 1:  # .to(x.dtype) before the weight
        normed = round_bf16(normed)
    store_f32(y_ptr, offs, w * normed, valid, Y_KIND)


@triton.jit
def _rmsnorm_backward_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    eps,
    X_KIND: tl.constexpr,
    W_KIND: tl.constexpr,
    Y_KIND: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, valid, x, w = _load_rows(x_ptr, w_ptr, n_rows, n_cols, X_KIND, W_KIND, ROWS, BLOCK)
    g = load_f32(g_ptr, offs, valid, Y_KIND)
    r = _inv_rms(x, n_cols, eps)
    gw = g * w
    if Y_KIND == 1:  # grad * weight in y's dtype
        gw = round_bf16(gw)
    if X_KIND == 1:  # then .to(x.dtype)
        gw = round_bf16(gw)
    grad_r = tl.sum(gw * x, axis=1)[:, None]
    grad_sq = (-0.5 * grad_r * (r * r * r)) / n_cols
    store_f32(dx_ptr, offs, gw * r + grad_sq * (2.0 * x), valid, X_KIND)


def _launch_shape(n_rows: int, n_cols: int, on_gpu: bool) -> tuple[tuple[int], int, int, int]:
    """(grid, ROWS, BLOCK, num_warps): a row's columns in one program's registers, and rows stacked into a tile of
    about 4,096 elements on a GPU (a 128-wide head norm gets 32 rows a program, a 4,096-wide hidden norm one); the
    interpreter, which pays per program, gets 64 rows a program."""
    block = triton.next_power_of_2(n_cols)
    rows = max(1, 4096 // block) if on_gpu else 64
    rows = min(rows, triton.next_power_of_2(n_rows))
    warps = 4 if rows * block <= 4096 else 8 if rows * block <= 8192 else 16
    return (triton.cdiv(n_rows, rows),), rows, block, warps


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the Triton RMSNorm takes fp32 or bf16, got x {x.dtype}, weight {weight.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match rows of {x.shape[-1]}")


def rmsnorm_forward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels/rmsnorm.py ``rmsnorm_forward_reference`` in one launch; y in ``promote(weight, x)``."""
    _check(x, weight)
    n_cols = x.shape[-1]
    x2, w = x.reshape(-1, n_cols).contiguous(), weight.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    grid, rows, block, warps = _launch_shape(x2.shape[0], n_cols, x.is_cuda)
    _rmsnorm_forward_kernel[grid](
        bits_view(x2), bits_view(w), bits_view(y), x2.shape[0], n_cols, eps,
        X_KIND=KIND[x.dtype], W_KIND=KIND[w.dtype], Y_KIND=KIND[y.dtype], ROWS=rows, BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n_cols)


def rmsnorm_backward_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """kernels/rmsnorm.py ``rmsnorm_backward_reference`` in one launch; `grad` is y's gradient (y's dtype)."""
    _check(x, weight)
    n_cols = x.shape[-1]
    y_dtype = torch.promote_types(weight.dtype, x.dtype)
    x2, w = x.reshape(-1, n_cols).contiguous(), weight.contiguous()
    g2 = grad.reshape(-1, n_cols).to(y_dtype).contiguous()
    dx = torch.empty_like(x2)
    grid, rows, block, warps = _launch_shape(x2.shape[0], n_cols, x.is_cuda)
    _rmsnorm_backward_kernel[grid](
        bits_view(x2), bits_view(w), bits_view(g2), bits_view(dx), x2.shape[0], n_cols, eps,
        X_KIND=KIND[x.dtype], W_KIND=KIND[w.dtype], Y_KIND=KIND[y_dtype], ROWS=rows, BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return dx.view(x.shape)
