"""The Llama RMSNorm with a frozen weight, as two functions of (x, weight, eps): forward, and backward from y's
gradient. The torch reference here; on CUDA its Triton twin (kernels/rmsnorm_triton.py), one launch a direction.

Why functions, not autograd: the training path keeps only the norm's 16-bit input for backward
(kernels/slim_activations.py ``_FrozenRMSNorm``) and calls these from its forward and backward.

The reference applies, op by op, what autograd applies to transformers' forward (``x32 = x.float();
weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)``): the product's gradient, the casts', ``rsqrt``'s
``-0.5·g·r³``, ``mean``'s expand-and-divide, ``pow``'s ``g·2x``, in the same dtypes, so its values and gradients are
autograd's bit for bit (tests/unit/test_slim_activations.py). Written as torch ops that is 8 ops forward and 18
backward, each a kernel launch on a GPU, 61 norms a SmolLM2 step; the twin does each direction in one pass over
the row and rounds where the reference rounds, but its sum of squares runs in another order: within one rounding
of the reference, not its bits (tests/unit/test_rmsnorm_triton.py).
"""

from __future__ import annotations

import torch

TRITON_MAX_COLS = 16384
"""Widest row the Triton twin takes (a program holds whole rows in registers; 16,384 is Llama 3.1 405B's hidden
size); wider ones take the reference."""


def rmsnorm_forward_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)``, x32 = x in fp32."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rmsnorm_backward_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """x's gradient from y's (`grad`), the weight frozen: autograd's formulas for the forward's ops, in x's dtype."""
    x32 = x.to(torch.float32)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    grad32 = (grad * weight).to(x.dtype).to(torch.float32)
    grad_r = (grad32 * x32).sum(-1, keepdim=True)
    grad_sq = (-0.5 * grad_r * r.pow(3)).expand(x32.shape) / x32.shape[-1]
    grad_x = grad32 * r + grad_sq * (2.0 * x32.pow(1.0))
    return grad_x.to(x.dtype)


def _takes_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    wide = (torch.float32, torch.bfloat16)
    return x.is_cuda and x.dtype in wide and weight.dtype in wide and 0 < x.shape[-1] <= TRITON_MAX_COLS


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton twin on CUDA (fp32 or bf16), the reference elsewhere."""
    if _takes_triton(x, weight):  # imported here: a CPU process never loads Triton
        from qlora_pipeline.kernels.rmsnorm_triton import rmsnorm_forward_triton

        return rmsnorm_forward_triton(x, weight, eps)
    return rmsnorm_forward_reference(x, weight, eps)


def rmsnorm_backward(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor) -> torch.Tensor:
    """The Triton twin on CUDA (fp32 or bf16), the reference elsewhere."""
    if _takes_triton(x, weight):
        from qlora_pipeline.kernels.rmsnorm_triton import rmsnorm_backward_triton

        return rmsnorm_backward_triton(x, weight, eps, grad)
    return rmsnorm_backward_reference(x, weight, eps, grad)
