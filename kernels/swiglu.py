"""The gated MLP's ``silu(gate) * up`` with both gradients, as two functions of (gate, up): the torch reference
here, on CUDA its Triton twin (kernels/swiglu_triton.py), one launch a direction.

Why functions: the training path keeps only gate and up for backward (kernels/slim_activations.py
``_SiluGateTimesUp``) and calls these from its forward and backward.

The reference is what autograd computes over the two ops, in the same dtypes and order: ``silu(gate)`` rounded to
the input dtype, times up; backward, up's gradient ``grad * silu(gate)`` and gate's ``silu_backward(grad * up,
gate)``. As torch's ops, that is 2 launches forward and 4 backward on a GPU, 30 MLPs a SmolLM2 step; the twin
rounds where the reference rounds, but its exponential and division are Triton's: within one rounding of the
reference, not its bits (tests/unit/test_swiglu.py).
"""

from __future__ import annotations

import torch


def swiglu_forward_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return torch.nn.functional.silu(gate) * up


def swiglu_backward_reference(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, need_gate: bool = True, need_up: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gate's gradient, up's gradient) from the output's, each None when not needed: autograd's formulas."""
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    grad_up = grad * torch.nn.functional.silu(gate) if need_up else None
    return grad_gate, grad_up


def _takes_triton(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return gate.is_cuda and gate.dtype in (torch.float32, torch.bfloat16) and gate.dtype == up.dtype


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton twin on CUDA (fp32 or bf16), the reference elsewhere."""
    if _takes_triton(gate, up):  # imported here: a CPU process never loads Triton
        from qlora_pipeline.kernels.swiglu_triton import swiglu_forward_triton

        return swiglu_forward_triton(gate, up)
    return swiglu_forward_reference(gate, up)


def swiglu_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, need_gate: bool = True, need_up: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The Triton twin on CUDA (fp32 or bf16; both gradients in one pass), the reference elsewhere."""
    if _takes_triton(gate, up) and grad.dtype == gate.dtype and need_gate and need_up:
        from qlora_pipeline.kernels.swiglu_triton import swiglu_backward_triton

        return swiglu_backward_triton(gate, up, grad)
    return swiglu_backward_reference(gate, up, grad, need_gate, need_up)
