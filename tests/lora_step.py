"""One training step of a LoRA projection with dropout: what the dropout masks' twins are compared on."""

from __future__ import annotations

import torch
from torch import nn

from qlora_pipeline.kernels.lora import LoraLinear

STEP_RESULTS = ("y", "x.grad", "A.grad", "B.grad", "next draw")
"""What :func:`lora_dropout_step` returns, in order."""


def lora_dropout_step() -> tuple[torch.Tensor, ...]:
    """A seeded 576 -> 192 projection with LoRA (r 16, dropout 0.05, fp32 compute) in training mode, forward and
    backward on a random batch: its output, x's, A's and B's gradients, and the CPU generator's next draw (masks
    drawn one way or another must leave it where they found it)."""
    torch.manual_seed(0)
    lora = LoraLinear(nn.Linear(576, 192), r=16, alpha=32, dropout=0.05, compute_dtype=torch.float32).train()
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(192, 16))
    x = torch.randn(4, 75, 576, requires_grad=True)
    y = lora(x)
    (y * torch.randn_like(y)).sum().backward()
    return y.detach(), x.grad, lora.lora_A.grad, lora.lora_B.grad, torch.rand(())
