"""Triton twin of kernels/rmsnorm.py: the frozen-weight RMSNorm's forward and backward, one program a row.

Each program reads its row once (x, and y's gradient in backward), sums the squares in fp32 registers and writes
the row once; the reference's 8 and 14 torch ops a direction are one launch each.

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
    """``1 / sqrt(mean(x²) + eps)`` of a row (padding lanes are 0), each op IEEE-rounded."""
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    return tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def _rmsnorm_forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    n_cols,
    eps,
    X_KIND: tl.constexpr,
    W_KIND: tl.constexpr,
    Y_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = load_f32(x_ptr, row * n_cols + cols, valid, X_KIND)
    w = load_f32(w_ptr, cols, valid, W_KIND)
    normed = x * _inv_rms(x, n_cols, eps)
    if X_KIND == 1:  # .to(x.dtype) before the weight
        normed = round_bf16(normed)
    store_f32(y_ptr, row * n_cols + cols, w * normed, valid, Y_KIND)


@triton.jit
def _rmsnorm_backward_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    dx_ptr,
    n_cols,
    eps,
    X_KIND: tl.constexpr,
    W_KIND: tl.constexpr,
    Y_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = load_f32(x_ptr, row * n_cols + cols, valid, X_KIND)
    w = load_f32(w_ptr, cols, valid, W_KIND)
    g = load_f32(g_ptr, row * n_cols + cols, valid, Y_KIND)
    r = _inv_rms(x, n_cols, eps)
    gw = g * w
    if Y_KIND == 1:  # grad * weight in y's dtype
        gw = round_bf16(gw)
    if X_KIND == 1:  # then .to(x.dtype)
        gw = round_bf16(gw)
    grad_r = tl.sum(gw * x, axis=0)
    grad_sq = (-0.5 * grad_r * (r * r * r)) / n_cols
    store_f32(dx_ptr, row * n_cols + cols, gw * r + grad_sq * (2.0 * x), valid, X_KIND)


def _launch_shape(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of n_cols: the row in one program, 4 warps up to 1,024 columns."""
    block = triton.next_power_of_2(n_cols)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


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
    block, warps = _launch_shape(n_cols)
    _rmsnorm_forward_kernel[(x2.shape[0],)](
        bits_view(x2), bits_view(w), bits_view(y), n_cols, eps,
        X_KIND=KIND[x.dtype], W_KIND=KIND[w.dtype], Y_KIND=KIND[y.dtype], BLOCK=block,
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
    block, warps = _launch_shape(n_cols)
    _rmsnorm_backward_kernel[(x2.shape[0],)](
        bits_view(x2), bits_view(w), bits_view(g2), bits_view(dx), n_cols, eps,
        X_KIND=KIND[x.dtype], W_KIND=KIND[w.dtype], Y_KIND=KIND[y_dtype], BLOCK=block,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return dx.view(x.shape)
