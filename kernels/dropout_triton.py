"""Triton twin of the seeded dropout mask (kernels/dropout.py): the same bits as the CPU's, on a GPU, in one launch.

Why: a mask from the device generator is about six launches (draw, lane view, clamp, shift, widen, multiply) and,
kept for backward, 2 bytes an input element per LoRA projection; this kernel hashes each element's splitmix64 lane
from the mask's seed where it applies it, as kernels/dropout_native.c does on a CPU, so the LoRA branch keeps the
seed, never writes or reads a mask, and a GPU run draws the masks a CPU run draws. The lane of element k is the
k % 4-th little-endian signed 16-bit piece of word k // 4 (``splitmix64(seed)``), kept where it is at or above
``threshold - 32768``; tensors travel as their integer bits, so dropping an element writes +0.0 and a kept one is
copied bit for bit (tests/unit/test_dropout_triton.py checks all three entry points against the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_MASK, _MASKED, _PAIR = 0, 1, 2
_BLOCK_GPU = 1024
_BLOCK_INTERPRETER = 65536  # the interpreter pays per program


@triton.jit
def _kept(seed, offs, lo):
    """Whether each element index in `offs` (int64) is kept under the mask of `seed` (the uint64 seed's bits as a
    signed integer: Triton passes a small one as int32, which widens to the same int64); `lo` = threshold - 32768."""
    z = seed.to(tl.int64).to(tl.uint64, bitcast=True) + (offs // 4).to(tl.uint64) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    lane = ((z >> ((offs % 4) * 16).to(tl.uint64)) & 0xFFFF).to(tl.int32)
    lane = tl.where(lane >= 32768, lane - 65536, lane)  # the signed 16-bit piece
    return lane >= lo


@triton.jit(do_not_specialize=["seed", "lo"])  # 1 or 16-divisible seeds are not constants
def _seeded_mask_kernel(seed, lo, x_ptr, out_ptr, g_ptr, n, one, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0: out = the 0/1 mask (`one` is 1.0's bits); 1: out = x kept, +0.0 where dropped; 2: that, and g zeroed
    where dropped, in place."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    keep = _kept(seed, offs, lo)
    if MODE == 0:
        tl.store(out_ptr + offs, tl.where(keep, one, 0).to(out_ptr.dtype.element_ty), mask=valid)
    else:
        x = tl.load(x_ptr + offs, mask=valid, other=0)
        tl.store(out_ptr + offs, tl.where(keep, x, 0).to(x.dtype), mask=valid)
        if MODE == 2:
            g = tl.load(g_ptr + offs, mask=valid, other=0)
            tl.store(g_ptr + offs, tl.where(keep, g, 0).to(g.dtype), mask=valid)


def _launch(mode: int, seed: int, threshold: int, out: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> None:
    n = out.numel()
    if n == 0:
        return
    block = _BLOCK_GPU if out.is_cuda else _BLOCK_INTERPRETER
    seed64 = (seed + 2**63) % 2**64 - 2**63  # the seed's 64 bits as a signed int64
    one = {torch.float32: 0x3F800000, torch.bfloat16: 0x3F80, torch.float16: 0x3C00}[out.dtype]
    bits = [t.view(_BITS[t.dtype]) for t in (x, out, g)]
    _seeded_mask_kernel[(triton.cdiv(n, block),)](seed64, threshold - 32768, *bits, n, one, MODE=mode, BLOCK=block)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _BITS or not t.is_contiguous():
            raise ValueError(f"the Triton dropout mask takes contiguous fp32, bf16 or fp16, got {t.dtype}")


def keep_mask_triton(seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    """kernels/dropout.py ``reference_keep_mask`` on `device`: 1 where kept, 0 where dropped, `dtype`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    _check(out)
    _launch(_MASK, seed, threshold, out, out, out)
    return out


def masked_triton(seed: int, threshold: int, x: torch.Tensor) -> torch.Tensor:
    """`x` with the mask's dropped elements +0.0 (a new tensor)."""
    x = x.contiguous()
    _check(x)
    out = torch.empty_like(x)
    _launch(_MASKED, seed, threshold, out, x, x)
    return out


def masked_pair_triton(seed: int, threshold: int, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`x` masked (a new tensor) and `grad` (x's shape and dtype, contiguous) masked in place, one pass."""
    x = x.contiguous()
    _check(x, grad)
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad {tuple(grad.shape)} {grad.dtype} is not x's {tuple(x.shape)} {x.dtype}")
    out = torch.empty_like(x)
    _launch(_PAIR, seed, threshold, out, x, grad)
    return out
