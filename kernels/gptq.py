"""GPTQ (Frantar et al., ICLR 2023, arXiv:2210.17323) and round-to-nearest, written from the paper and the spec.

GPTQ quantizes a linear layer's weight ``W [out, in]`` one input column at a time and pushes each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer-wise objective
``||W X - Q X||²`` (``H = mean over tokens of 2·x·xᵀ``). Compared with round-to-nearest (RTN) on the same groups and
the same quantizer it gives the same storage format but a smaller output error, which is why a GPTQ checkpoint is
what serving stacks (vLLM, transformers + gptqmodel) expect.

Choices made here, and why:

* **Symmetric 4-bit, zero = 2^(bits-1)** (8 for 4-bit): the v1 checkpoint stores ``zero - 1``, and an asymmetric zero
  of 0 underflows (docs/formats.md, GPTQ v1 checkpoint); vLLM's Marlin path only takes symmetric weights.
* **Scales are rounded to fp16 when fitted**, before any column is quantized: the checkpoint stores fp16 scales, so
  the error that GPTQ feeds back, the ``dequantized`` weight we return, and what a reader rebuilds from the packed
  file are then bit-identical (no silent fp32→fp16 drift between "what we optimised" and "what we ship").
* **No act-order** (``desc_act=False``): ``g_idx`` stays ``i // group_size``, the layout every kernel accepts.
* **Group parameters are refit at each group start on the already error-updated weights**; the lazy block size is
  rounded to a whole number of groups so that every group lies inside one block and its fit sees all the updates
  made so far (none are still pending in a lazy batch).
* **Dampening is retried**: a Hessian that is not numerically positive-definite (too few calibration tokens, or
  collinear features) gets its damping doubled until the Cholesky succeeds; the damp used is recorded.

Everything is pure torch in fp32 on whatever device ``W`` is on; no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_FP16_TINY = float(torch.finfo(torch.float16).tiny)  # smallest normal fp16: scales below it lose precision
_MAX_DAMP = 1.0  # damping beyond mean(diag H) would mostly ignore the data; give up there


class Hessian:
    """Running mean of ``2·x·xᵀ`` over calibration tokens for one linear layer's input, in fp32.

    A running mean (rescale the old sum by ``n/(n+t)``) instead of a running sum keeps the magnitude independent of
    the number of tokens, so the relative damping ``damp_percent·mean(diag H)`` means the same thing for 1k or 1M
    tokens and fp32 does not overflow on long calibration runs. ``trace((W-Q) H (W-Q)ᵀ)/2`` is then the mean over
    tokens of ``||(W-Q)x||²`` (see :func:`output_error`).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: Tensor) -> None:
        """Fold in a batch of layer inputs ``x [..., in]`` (any leading dims are tokens)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian was built for {self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.matrix.device, dtype=torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        total = self.n_tokens + t
        self.matrix.mul_(self.n_tokens / total)
        # 2/total · Σ x xᵀ for the new tokens, added as one GEMM
        self.matrix.addmm_(x.T, x, alpha=2.0 / total)
        self.n_tokens = total


@dataclass
class GPTQResult:
    """A quantized weight, ready for packing (see :mod:`qlora_pipeline.kernels.formats.gptq_folder`).

    ``qweight_int`` [out, in] uint8 codes in ``[0, 2^bits)``; ``scales`` [n_groups, out] fp16 (the exact values the
    checkpoint stores); ``zeros`` [n_groups, out] int32 true zero points (not yet the v1 ``zero-1``); ``g_idx`` [in]
    int32 group of each input column; ``dequantized`` [out, in] fp32 ``scale·(code - zero)``, bit-identical to what a
    reader rebuilds from the packed tensors.
    """

    qweight_int: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    dequantized: Tensor
    bits: int
    group_size: int
    sym: bool = True
    damp_percent: float = 0.0  # the damping actually used (after retries); 0 for RTN
    dead_columns: int = 0  # input columns whose calibration inputs were all zero

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])


def valid_group_sizes(in_features: int) -> list[int]:
    """Group sizes we suggest for ``in_features`` columns: divisors that are multiples of 16 (what kernels take)."""
    return [g for g in range(16, in_features + 1, 16) if in_features % g == 0]


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    """Return the effective group size (``-1`` means one group per row) or raise a message that says what to use.

    vLLM rejects ``in % group_size != 0`` and a ragged last group would need a second scale layout, so we refuse it
    up front instead of writing a checkpoint no reader takes.
    """
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        options = ", ".join(str(g) for g in valid_group_sizes(in_features))
        options = f"{options} or -1 (one group per row)" if options else "-1 (one group per row)"
        raise ValueError(
            f"group size {group_size} does not divide the {in_features} input columns of {name}; use one of: {options}"
        )
    return group_size


def _check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return (1 << bits) - 1


def _fit(w: Tensor, maxq: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row scale (fp16-representable, as fp32) and zero point (fp32 integer) for the columns in ``w [out, g]``.

    The range always includes 0 so that a zero weight is representable; all-zero rows get the range [-1, 1] so the
    scale is never 0.
    """
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = 2 * xmax / maxq
    else:
        both_zero = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
        xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
        scale = (xmax - xmin) / maxq
    # Round to what the checkpoint stores (fp16), then keep it a normal fp16 so 1/scale stays finite and precise.
    scale = scale.clamp(min=_FP16_TINY, max=float(torch.finfo(torch.float16).max)).half().float()
    zero = torch.full_like(scale, float((maxq + 1) // 2)) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _quant(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Codes and dequantized values for ``w`` (a column [out] or a block [out, k]) with per-row scale/zero."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def rtn_quantize(W: Tensor, bits: int = 4, group_size: int = 64, sym: bool = True, name: str = "weight") -> GPTQResult:
    """Round-to-nearest on the same groups with the same quantizer as :func:`gptq_quantize` (the baseline)."""
    maxq = _check_bits(bits)
    out_f, in_f = W.shape
    g = check_group_size(in_f, group_size, name)
    W = W.detach().to(torch.float32)
    n_groups = in_f // g
    codes = torch.empty(out_f, in_f, dtype=torch.float32, device=W.device)
    deq = torch.empty_like(codes)
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    for k in range(n_groups):
        cols = slice(k * g, (k + 1) * g)
        scale, zero = _fit(W[:, cols], maxq, sym)
        codes[:, cols], deq[:, cols] = _quant(W[:, cols], scale, zero, maxq)
        scales[k], zeros[k] = scale, zero
    return _result(codes, scales, zeros, deq, bits, g, group_size, sym, 0.0, 0)


def _result(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    deq: Tensor,
    bits: int,
    g: int,
    group_size: int,
    sym: bool,
    damp: float,
    dead: int,
) -> GPTQResult:
    in_f = codes.shape[1]
    return GPTQResult(
        qweight_int=codes.to(torch.uint8),
        scales=scales.half(),
        zeros=zeros.to(torch.int32),
        g_idx=(torch.arange(in_f, device=codes.device) // g).to(torch.int32),
        dequantized=deq,
        bits=bits,
        group_size=group_size,
        sym=sym,
        damp_percent=damp,
        dead_columns=dead,
    )


def _upper_cholesky_of_inverse(H: Tensor, damp_percent: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp·mean(diag H); damp doubles until H + λI is PD.

    GPTQ's column-by-column updates read rows of U: ``U[i, i:]`` is exactly the row of the inverse Hessian restricted
    to the not-yet-quantized columns, after the previous columns were eliminated, so no per-column inverse update is
    needed (the paper's "Cholesky reformulation", which is also the numerically stable one).
    """
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    damp = damp_percent
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if damp >= _MAX_DAMP:
            raise ValueError(
                f"the Hessian is not positive-definite even with damp_percent={damp:g}; "
                "use more (or more varied) calibration tokens, or a larger damp_percent"
            )
        damp = min(damp * 2 if damp > 0 else 0.01, _MAX_DAMP)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int = 4,
    group_size: int = 64,
    damp_percent: float = 0.01,
    block_size: int = 128,
    sym: bool = True,
    name: str = "weight",
) -> GPTQResult:
    """GPTQ-quantize ``W [out, in]`` against the Hessian ``H [in, in]`` (mean of 2·x·xᵀ, e.g. :class:`Hessian`).

    ``group_size=-1`` means one group per output row. ``block_size`` is the lazy-batch width (rounded to whole
    groups); it changes speed, not the result beyond float rounding. ``name`` only labels error messages.
    """
    maxq = _check_bits(bits)
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"expected W [out, in] and H [in, in], got {tuple(W.shape)} and {tuple(H.shape)}")
    if not 0 <= damp_percent < _MAX_DAMP:
        raise ValueError(f"damp_percent must be in [0, {_MAX_DAMP}), got {damp_percent}")
    out_f, in_f = W.shape
    g = check_group_size(in_f, group_size, name)
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"the Hessian of {name} has NaN/Inf entries: the calibration activations overflowed")

    # Dead inputs (never non-zero in calibration) carry no information: their weight cannot matter on that data, so
    # pin it to 0 and give H a unit diagonal there to keep it invertible.
    dead = torch.diagonal(H) == 0
    n_dead = int(dead.sum())
    if n_dead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

    U, damp_used = _upper_cholesky_of_inverse(H, damp_percent)
    del H

    n_groups = in_f // g
    codes = torch.zeros(out_f, in_f, dtype=torch.float32, device=W.device)
    deq = torch.zeros_like(codes)
    scales = torch.empty(n_groups, out_f, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    block = max(1, block_size // g) * g  # whole groups per block, at least one
    scale = zero = None

    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1 = W[:, b0:b1].clone()  # holds every update made so far to this block's columns
        Err1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:
                scale, zero = _fit(W1[:, i : i + g], maxq, sym)
                scales[col // g], zeros[col // g] = scale, zero
            w = W1[:, i]
            q, dq = _quant(w, scale, zero, maxq)
            codes[:, col], deq[:, col] = q, dq
            err = (w - dq) / U1[i, i]
            # Compensate within the block now; columns after the block get it in one GEMM below (lazy batch).
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]

    return _result(codes, scales, zeros, deq, bits, g, group_size, sym, damp_used, n_dead)


def output_error(W: Tensor, Q: Tensor, H: Tensor) -> float:
    """Mean over calibration tokens of ``||(W - Q) x||²`` (summed over outputs): ``trace(D H Dᵀ) / 2``.

    This is GPTQ's layer-wise objective measured exactly from the Hessian, so the GPTQ/RTN comparison needs no second
    pass over the activations. Use the undamped H.
    """
    D = (W.detach().float() - Q.detach().float()).to(H.device)
    return float(((D @ H.float()) * D).sum() / 2)


__all__ = [
    "GPTQResult",
    "Hessian",
    "check_group_size",
    "gptq_quantize",
    "output_error",
    "rtn_quantize",
    "valid_group_sizes",
]
