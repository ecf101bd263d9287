"""LoftQ initialisation: choose the NF4 base and the LoRA factors together, so that ``Q + s·B·A ≈ W`` at step 0.

Plain QLoRA starts from ``Q = NF4(W)`` and ``B = 0``: the model it trains starts with the whole quantization error
``W − Q``. LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models")
alternates two steps, starting from ``L = 0``:

1. ``Q_t = NF4(W − L_{t−1})``: quantize what the low-rank part does not already carry;
2. ``L_t = best rank-r approximation of W − Q_t`` (truncated SVD), split as ``s·B·A``.

The first iteration already beats plain NF4 whenever the residual is not zero (a rank-r SVD of ``W − NF4(W)``
removes part of it); later iterations usually lower the error further but are not guaranteed to, so the best
iterate is kept (``errors`` records every one). ``Q`` is an ordinary NF4 + double-quant weight (the same bnb
layout as any other), and ``A``/``B`` are ordinary LoRA factors: ``A`` (r, in) and ``B`` (out, r), each carrying
the square root of the singular values and of ``1/s``, so that ``s·B·A`` is the truncated SVD itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_pipeline.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4


@dataclass(frozen=True)
class LoftQInit:
    """The LoftQ pair for one weight, and how close it gets (relative Frobenius errors)."""

    nf4: NF4Weight
    lora_A: torch.Tensor  # (r, in_features), fp32
    lora_B: torch.Tensor  # (out_features, r), fp32
    errors: tuple[float, ...]  # ‖W − (Q_t + s·B_t·A_t)‖ / ‖W‖ after each iteration
    plain_nf4_error: float  # ‖W − NF4(W)‖ / ‖W‖: plain QLoRA's step-0 error

    @property
    def error(self) -> float:
        """The kept iterate's step-0 error (the smallest of ``errors``)."""
        return min(self.errors)


def rank_r_factors(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``scaling·B·A`` = the best rank-``rank`` approximation of ``residual`` (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None, :]).float()


def low_rank(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling·B·A`` in fp32."""
    return scaling * (lora_B.float() @ lora_A.float())


def loftq_init(
    w: torch.Tensor,
    rank: int,
    scaling: float,
    iters: int = 5,
    blocksize: int = 64,
    double_quant: bool = True,
) -> LoftQInit:
    """Alternate NF4 quantization of ``W − s·B·A`` with a rank-``rank`` SVD of ``W − Q`` for ``iters`` rounds.

    ``w`` is quantized in its own dtype (what the plain path quantizes, so iteration 1's ``Q`` is byte-identical
    to plain NF4); the low-rank factors are computed in float64 and stored in fp32."""
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"LoRA rank {rank} does not fit a {tuple(w.shape)} weight")
    w32 = w.float()
    norm = float(torch.linalg.vector_norm(w32)) or 1.0
    a = b = None
    best: tuple[float, NF4Weight, torch.Tensor, torch.Tensor] | None = None
    errors: list[float] = []
    plain = float("nan")
    for t in range(iters):
        target = w if a is None else (w32 - low_rank(a, b, scaling)).to(w.dtype)
        nf4 = quantize_nf4(target, blocksize=blocksize, double_quant=double_quant)
        residual = w32 - dequantize_nf4(nf4, torch.float32)
        if t == 0:
            plain = float(torch.linalg.vector_norm(residual)) / norm
        a, b = rank_r_factors(residual, rank, scaling)
        err = float(torch.linalg.vector_norm(residual - low_rank(a, b, scaling))) / norm
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, nf4, a, b)
    assert best is not None
    return LoftQInit(best[1], best[2], best[3], tuple(errors), plain)
