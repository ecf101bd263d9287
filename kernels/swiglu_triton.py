"""Triton twin of kernels/swiglu.py: ``silu(gate) * up`` forward, and both gradients in one pass backward.

Rounding follows the reference's dtypes: ``silu(gate)`` is rounded to the input dtype before it multiplies up, and
``grad * up`` before ``silu_backward`` takes it. Every op is one IEEE-rounded fp32 op (``div_rn``, no contracted
multiply-add) but the exponential, which is Triton's (on a GPU an ``ex2`` of ``x·log2 e``, under the interpreter
numpy's): so the twin is within one rounding of the reference, not its bits (tests/unit/test_swiglu.py). bf16
travels as int16 bits rounded by integer arithmetic (kernels/triton_bits.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_pipeline.kernels.triton_bits import KIND, bits_view, load_f32, round_bf16, store_f32

BLOCK = 1024
"""Elements a program: the op is elementwise, and 1,024 (8 a thread over 4 warps) keeps a SmolLM2 MLP's 754 × 1,536
elements over about 1,100 programs."""


@triton.jit
def _silu(g):
    """``g / (1 + exp(-g))``, as torch's silu divides (not ``g · sigmoid(g)``, one rounding more)."""
    return tl.div_rn(g, 1.0 + tl.exp(-g))


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, y_ptr, n, KIND_X: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = load_f32(gate_ptr, offs, valid, KIND_X)
    u = load_f32(up_ptr, offs, valid, KIND_X)
    act = _silu(g)
    if KIND_X == 1:  # silu(gate) in the input dtype
        act = round_bf16(act)
    store_f32(y_ptr, offs, act * u, valid, KIND_X)


@triton.jit
def _swiglu_backward_kernel(
    gate_ptr, up_ptr, grad_ptr, grad_gate_ptr, grad_up_ptr, n, KIND_X: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = load_f32(gate_ptr, offs, valid, KIND_X)
    u = load_f32(up_ptr, offs, valid, KIND_X)
    dy = load_f32(grad_ptr, offs, valid, KIND_X)
    sig = tl.div_rn(1.0, 1.0 + tl.exp(-g))
    act = _silu(g)
    dy_u = dy * u
    if KIND_X == 1:  # silu(gate) and grad * up each in the input dtype
        act = round_bf16(act)
        dy_u = round_bf16(dy_u)
    store_f32(grad_up_ptr, offs, dy * act, valid, KIND_X)
    store_f32(grad_gate_ptr, offs, dy_u * sig * (1.0 + g * (1.0 - sig)), valid, KIND_X)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dtype not in (torch.float32, torch.bfloat16) or up.dtype != gate.dtype or up.shape != gate.shape:
        raise ValueError(f"the Triton SwiGLU takes fp32 or bf16 gate and up alike, got {gate.dtype} {up.dtype}")


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """kernels/swiglu.py ``swiglu_forward_reference`` in one launch."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](
        bits_view(gate), bits_view(up), bits_view(y), n, KIND_X=KIND[gate.dtype], BLOCK=BLOCK, num_warps=4,
        enable_fp_fusion=False,
    )  # fmt: skip
    return y


def swiglu_backward_triton(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/swiglu.py ``swiglu_backward_reference`` (both gradients) in one launch."""
    _check(gate, up)
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.to(gate.dtype).contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](
        bits_view(gate), bits_view(up), bits_view(grad), bits_view(grad_gate), bits_view(grad_up), n,
        KIND_X=KIND[gate.dtype], BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return grad_gate, grad_up
