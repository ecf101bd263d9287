"""The per-step scalars of the 8-bit AdamW update, shared by the torch reference and the Triton kernel.

Kept apart from both so that the reference (``qlora_pipeline.kernels.optim.adamw_math``) never has to import Triton.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class AdamScalars(NamedTuple):
    """Per-step scalars of the 8-bit AdamW update, in float64; both implementations round them to fp32."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    bias_correction2_sqrt: float
    eps: float
    decay: float  # 1 - lr * weight_decay
    apply_decay: bool
    neg_step_size: float  # -lr / (1 - beta1**step)

    @classmethod
    def make(cls, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> AdamScalars:
        """Bias corrections as bnb's CPU backend computes them (``math.sqrt``; torch's ``** 0.5`` is the same
        value for all steps we checked, but bnb is the oracle for the 8-bit path)."""
        b1, b2 = float(betas[0]), float(betas[1])
        c1 = 1.0 - b1**step
        c2 = math.sqrt(1.0 - b2**step)
        return cls(b1, 1.0 - b1, b2, 1.0 - b2, c2, float(eps), 1.0 - lr * weight_decay, weight_decay != 0, -lr / c1)
