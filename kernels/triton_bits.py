"""How 16-bit floats travel through a Triton kernel so that it rounds as torch does, on CUDA and in the interpreter.

Why: under ``TRITON_INTERPRET=1`` a cast fp32 -> bf16 truncates instead of rounding to nearest-even
(docs/formats.md, Triton interpreter), so a kernel that casts would give other bits on the CPU than on a GPU. Here
bf16 tensors travel as int16 bit patterns (:func:`bits_view`), are widened exactly, and are rounded to
nearest-even by integer arithmetic on the fp32 bits: the same bits on both, and torch's (``c10::BFloat16``: NaN
becomes 0x7FC0). Shared by every kernel that reads or writes 16-bit values it must round exactly (the 8-bit AdamW
step, the RMSNorm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The ``*_KIND`` constexpr a kernel gets for a tensor's dtype."""


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """A bf16 tensor as its int16 bits (what :func:`load_f32` / :func:`store_f32` read and write), others as is."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def load_f32(ptr, offs, mask, KIND: tl.constexpr):
    """Elements of a KIND tensor widened to fp32 (exactly)."""
    if KIND == 1:  # bf16 bits in an int16 view: widen to the top half of an fp32
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16).to(tl.uint32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32; NaN -> 0x7FC0 as ``c10::BFloat16``."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    rounded = tl.where(x != x, 0x7FC00000, rounded)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def store_f32(ptr, offs, x, mask, KIND: tl.constexpr):
    """fp32 values stored into a KIND tensor, rounded to nearest-even."""
    if KIND == 1:  # the rounded value's top half is the bf16
        bits = round_bf16(x).to(tl.uint32, bitcast=True) >> 16
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif KIND == 2:
        tl.store(ptr + offs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)
