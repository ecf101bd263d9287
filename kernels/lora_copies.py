"""The compute-dtype copies of every LoRA A and B that a training step's forward and backward read, made in one
batched copy at the start of the step instead of a cast a projection.

Why: A and B stay fp32 (master weights, as under autocast), and the training node (kernels/lora_fused.py) computes
in bf16, so each projection cast both in every forward: 420 casts a SmolLM2 step, each a kernel launch on a GPU
step bound by launches (docs/speed.md). The values of a step's A and B do not change between its forward, its
recomputed forwards and its backward, so one ``torch._foreach_copy_`` over all of them at the step's start gives the
same bits every cast gave, and the same training.

Safe by scope: the copies are handed to the modules only inside :meth:`ComputeCopies.fresh` (one step's forward
and backward passes, every micro-batch), refreshed on entering it, and withdrawn on leaving it, so an optimizer
step, a resume or an evaluation between steps can never meet a stale copy; outside the scope the modules cast as
before. A refresh while an earlier graph still holds the copies for its backward bumps their version, and autograd
refuses that backward loudly. FSDP2's sharded parameters (DTensors) keep the per-call cast: what their forward
sees is gathered there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlora_pipeline.kernels.lora import LoraLinear


def _takes_copies(module: LoraLinear) -> bool:
    cd = module.compute_dtype
    a, b = module.lora_A, module.lora_B
    sharded = hasattr(a, "to_local") or hasattr(b, "to_local")
    return cd is not None and a.dtype != cd and b.dtype != cd and not sharded


class ComputeCopies:
    """One model's copies (kept between steps: the bytes the casts held for backward anyway, r × (in + out) 16-bit
    values a projection, 9.8 MB for SmolLM2 at r = 16)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, LoraLinear) and _takes_copies(m)]
        self.masters = [p for m in self.modules for p in (m.lora_A, m.lora_B)]
        self.copies = [torch.empty_like(p, dtype=m.compute_dtype) for m in self.modules for p in (m.lora_A, m.lora_B)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.copies)

    @contextmanager
    def fresh(self) -> Iterator[None]:
        """Copies of the current A and B, used by every module's forward and backward inside the scope."""
        if self.copies:
            with torch.no_grad():
                torch._foreach_copy_(self.copies, self.masters)
        for i, module in enumerate(self.modules):
            module.compute_copies = (self.copies[2 * i], self.copies[2 * i + 1])
        try:
            yield
        finally:
            for module in self.modules:
                module.compute_copies = None
