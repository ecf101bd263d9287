"""Triton kernel for one AdamW step on 8-bit blockwise state (the CUDA path of
``qlora_pipeline.kernels.optim.adamw_math``).

Each program owns ``ROWS`` state blocks of ``BLOCK`` elements (``ROWS=1`` on CUDA: one program per block, as in
bnb's ``kOptimizerStatic8bit2StateBlockwise``): dequantize m and v, AdamW update in fp32, write the parameter,
take the new per-block absmax, requantize m and v.

Numerics are pinned down so the kernel is bit-identical to the torch reference
(``qlora_pipeline.kernels.optim.adamw_math.adamw8bit_update_reference``) on CPU under ``TRITON_INTERPRET=1`` and on
CUDA:

* every arithmetic op is one IEEE-rounded fp32 op: the launch passes ``enable_fp_fusion=False`` (no FMA
  contraction) and uses ``div_rn`` / ``sqrt_rn`` (the default fp32 division and sqrt are approximate on NVIDIA);
* scalars are computed once in float64 by
  :class:`~qlora_pipeline.kernels.optim.adam_scalars.AdamScalars` and rounded to fp32 at the launch, exactly like
  torch rounds Python scalars for fp32 tensor ops;
* requantization follows bitsandbytes' CPU rule (not nearest-code search): ``y = x * fp32(1/absmax)``, bin
  ``trunc(fp32((clamp(y,-1,1)+1)*0.5*65535 + 0.5))`` (the multiply-add is exact in float64, rounded once), code
  index ``lut[bin]`` where ``lut`` maps each of the 65536 bins to the code entry whose midpoint range holds it.
  NaN normalized values get code 0 and a block whose absmax is 0 stores codes 0, as bnb's CPU kernel does;
  absmax ignores NaN (C ``std::max``) but not Inf;
* bf16 parameters and gradients travel as int16 bit patterns and are rounded to nearest-even by integer
  arithmetic (kernels/triton_bits.py), because the interpreter truncates fp32->bf16 (docs/formats.md, Triton
  interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars
from qlora_pipeline.kernels.triton_bits import KIND, bits_view, load_f32, store_f32


@triton.jit
def _requantize(x, valid, code_lut_ptr):
    """Block-wise bnb-CPU quantization of a [ROWS, BLOCK] fp32 tile -> (uint8 codes, fp32 absmax per row)."""
    x = tl.where(valid, x, 0.0)
    absmax = tl.max(tl.where(x != x, 0.0, tl.abs(x)), axis=1)
    # an all-zero block stores codes 0 below; dividing by 1 instead of 0 just keeps the arithmetic finite
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax == 0.0, 1.0, absmax))
    y = x * inv[:, None]
    bad = y != y
    y = tl.minimum(tl.maximum(tl.where(bad, 0.0, y), -1.0), 1.0)
    half = (y + 1.0) * 0.5
    bins = (half.to(tl.float64) * 65535.0 + 0.5).to(tl.float32).to(tl.int32)
    bins = tl.minimum(tl.maximum(bins, 0), 65535)
    q = tl.load(code_lut_ptr + bins)
    q = tl.where(bad | (absmax == 0.0)[:, None], 0, q)
    return q.to(tl.uint8), absmax


@triton.jit
def _adamw8bit_blockwise_kernel(
    p_ptr,
    g_ptr,
    q1_ptr,
    q2_ptr,
    absmax1_ptr,
    absmax2_ptr,
    code1_ptr,
    code2_ptr,
    lut1_ptr,
    lut2_ptr,
    n_elements,
    n_blocks,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    bias_correction2_sqrt,
    eps,
    decay,
    neg_step_size,
    P_KIND: tl.constexpr,
    G_KIND: tl.constexpr,
    APPLY_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_blocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    valid = offs < n_elements

    g = load_f32(g_ptr, offs, valid, G_KIND)
    c1 = tl.load(q1_ptr + offs, mask=valid, other=0).to(tl.int32)
    c2 = tl.load(q2_ptr + offs, mask=valid, other=0).to(tl.int32)
    a1 = tl.load(absmax1_ptr + rows, mask=row_ok, other=0.0)
    a2 = tl.load(absmax2_ptr + rows, mask=row_ok, other=0.0)
    m = tl.load(code1_ptr + c1) * a1[:, None]
    v = tl.load(code2_ptr + c2) * a2[:, None]

    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps

    p = load_f32(p_ptr, offs, valid, P_KIND)
    if APPLY_DECAY:
        p = p * decay
    p = p + tl.div_rn(m * neg_step_size, denom)
    store_f32(p_ptr, offs, p, valid, P_KIND)

    q1, new_a1 = _requantize(m, valid, lut1_ptr)
    q2, new_a2 = _requantize(v, valid, lut2_ptr)
    tl.store(q1_ptr + offs, q1, mask=valid)
    tl.store(q2_ptr + offs, q2, mask=valid)
    tl.store(absmax1_ptr + rows, new_a1, mask=row_ok)
    tl.store(absmax2_ptr + rows, new_a2, mask=row_ok)


def adamw8bit_update_triton(
    p: torch.Tensor,
    g: torch.Tensor,
    q1: torch.Tensor,
    q2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    lut1: torch.Tensor,
    lut2: torch.Tensor,
    s: AdamScalars,
    blocksize: int,
    rows: int | None = None,
) -> None:
    """One fused 8-bit AdamW step, in place on flat contiguous ``p`` (fp32/bf16/fp16), ``q1``/``q2`` (uint8) and
    ``absmax1``/``absmax2`` (fp32, one per ``blocksize`` elements). ``lut1``/``lut2`` are the 65536-entry
    bin->code tables of ``code1`` (signed map, m) and ``code2`` (unsigned map, v)."""
    n = p.numel()
    n_blocks = absmax1.numel()
    if n == 0:
        return
    if n >= 2**31 - blocksize:
        raise ValueError(f"adamw8bit_update_triton handles < 2**31 elements per call, got {n}")
    if blocksize & (blocksize - 1) or blocksize < 16:
        raise ValueError(f"blocksize must be a power of two >= 16, got {blocksize}")
    if p.dtype not in KIND or g.dtype not in KIND:
        raise ValueError(f"param/grad dtype must be fp32, bf16 or fp16, got {p.dtype}/{g.dtype}")
    for t in (p, g, q1, q2, absmax1, absmax2):
        if not t.is_contiguous():
            raise ValueError("adamw8bit_update_triton needs contiguous tensors")
    if rows is None:
        # CUDA: one program per state block. Interpreter: cost grows with the program count, so batch blocks.
        rows = 1 if p.is_cuda else min(64, triton.next_power_of_2(n_blocks))
    grid = (triton.cdiv(n_blocks, rows),)
    _adamw8bit_blockwise_kernel[grid](
        bits_view(p),
        bits_view(g),
        q1,
        q2,
        absmax1,
        absmax2,
        code1,
        code2,
        lut1,
        lut2,
        n,
        n_blocks,
        s.beta1,
        s.one_minus_beta1,
        s.beta2,
        s.one_minus_beta2,
        s.bias_correction2_sqrt,
        s.eps,
        s.decay,
        s.neg_step_size,
        P_KIND=KIND[p.dtype],
        G_KIND=KIND[g.dtype],
        APPLY_DECAY=s.apply_decay,
        BLOCK=blocksize,
        ROWS=rows,
        num_warps=2 if blocksize <= 256 else 4,
        enable_fp_fusion=False,
    )
