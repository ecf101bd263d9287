"""One-launch Triton dequantization of NF4 with double-quantized absmax.

bitsandbytes needs three launches for a double-quantized weight (8-bit absmax dequant, ``+ offset``, 4-bit
dequant); here each program reads its packed bytes and the uint8 absmax of their blocks, rebuilds the fp32
absmax in registers and writes the output, so the weight's bytes are read once and the output written once.

Bit-exactness with :func:`qlora_pipeline.kernels.nf4.dequantize_nf4`:
- absmax = ``fp32(code2[q] * absmax2) + offset``: two roundings. On CUDA the launch passes
  ``enable_fp_fusion=False`` so the multiply-add is not contracted into an FMA (one rounding, other bits).
- out = ``fp32(table[nibble] * absmax)``, then one round-to-nearest-even cast to the output dtype.
- Under ``TRITON_INTERPRET=1`` (CPU) the interpreter truncates fp32 -> bf16 instead of rounding
  (docs/formats.md, Triton interpreter), so there the kernel always writes fp32 and torch does the final
  cast. On CUDA the kernel casts in registers and writes 16-bit directly (half the store traffic).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import triton
import triton.language as tl

from qlora_pipeline.kernels.nf4 import NF4Weight, shared_table

# Bytes per program. The interpreter pays per program, so it gets a big block (docs/formats.md, Triton interpreter:
# 1M values take 6.1 s with 1024 per program and 0.42 s with 16384); on a GPU 1024 bytes (2048 outputs) per
# program with 4 warps keeps loads coalesced and gives enough programs for a 4096x14336 weight (28672 programs).
_BYTES_PER_PROGRAM_GPU = 1024
_BYTES_PER_PROGRAM_INTERPRETER = 32768
TILE_BLOCKS_GPU = 128
"""Quantization blocks a program of the 2-D tile kernel: 128 blocks of 64 (8,192 outputs) was the fastest of 16-512 on
an H200 in two runs, 4096x14336 -> bf16 in 41.2 / 46.2 us, 84 % / 75 % of the device's copy bandwidth, where the
1-D kernel took 55.9 / 86.2 us (bench/results/gpu-dequant.json, gpu-dequant-tiles.json)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _block_absmax(
    qabsmax_ptr, absmax2_ptr, code2_ptr, block, mask, offset, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr
):
    """fp32 absmax of the quantization blocks `block`: `fp32(code2[q] * absmax2) + offset` (two roundings; the
    launch turns FMA contraction off), or the stored fp32 absmax without double quantization."""
    if DOUBLE_QUANT:
        q = tl.load(qabsmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q, mask=mask, other=0.0) * scale2
        absmax = absmax + offset
    else:
        absmax = tl.load(qabsmax_ptr + block, mask=mask, other=0.0)
    return absmax


@triton.jit
def _nf4_dq_dequant_kernel(
    packed_ptr,
    qabsmax_ptr,
    absmax2_ptr,
    code2_ptr,
    table_ptr,
    out_ptr,
    offset,
    n_out,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,
):
    pid = tl.program_id(0)
    byte_idx = pid.to(tl.int64) * BYTES + tl.arange(0, BYTES)
    in_range = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
    # Both nibbles of a byte share a block: blocksizes are even.
    block = (byte_idx * 2) // BLOCKSIZE
    absmax = _block_absmax(qabsmax_ptr, absmax2_ptr, code2_ptr, block, in_range, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    hi = tl.load(table_ptr + (byte >> 4)) * absmax
    lo = tl.load(table_ptr + (byte & 0xF)) * absmax
    vals = tl.interleave(hi, lo)
    out_idx = pid.to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_idx < n_out)


@triton.jit
def _nf4_dq_dequant_tile_kernel(
    packed_ptr,
    qabsmax_ptr,
    absmax2_ptr,
    code2_ptr,
    table_ptr,
    out_ptr,
    offset,
    n_out,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKS: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """2-D tile: BLOCKS quantization blocks per program, one row each. Each block's absmax is loaded and rebuilt
    once (a vector of BLOCKS) and broadcast along its row, instead of once per byte as in the 1-D kernel; each row's
    BLOCKSIZE/2 bytes are contiguous, so the byte loads vectorize.

    PAIRS: `table_ptr` is the 256 x 2 byte-pair table (kernels/nf4.py ``shared_table("pairs")``), and each byte is
    one 8-byte gather of both its nibbles' values, already in output order, where the 16-entry table takes two
    4-byte gathers and an interleave. The products are the same fp32 multiplies either way."""
    pid = tl.program_id(0)
    block = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    n_blocks = (n_bytes * 2 + BLOCKSIZE - 1) // BLOCKSIZE
    block_ok = block < n_blocks
    absmax = _block_absmax(qabsmax_ptr, absmax2_ptr, code2_ptr, block, block_ok, offset, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    HALF: tl.constexpr = BLOCKSIZE // 2
    byte_idx = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0).to(tl.int32)
    if PAIRS:  # both nibbles' fp32 values in one 8-byte word: the high nibble's in its low half (little-endian)
        pair = tl.load(table_ptr.to(tl.pointer_type(tl.int64)) + byte)
        hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
        lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
    else:
        hi = tl.load(table_ptr + (byte >> 4)) * absmax[:, None]
        lo = tl.load(table_ptr + (byte & 0xF)) * absmax[:, None]
    vals = tl.interleave(hi, lo)
    out_idx = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_idx < n_out)


def dequantize_nf4_triton(
    nf4: NF4Weight,
    dtype: torch.dtype | None = None,
    tile_blocks: int | Literal["auto"] | None = "auto",
    pairs: bool = False,
) -> torch.Tensor:
    """Dequantize ``nf4`` in one kernel launch; bit-identical to ``qlora_pipeline.kernels.nf4.dequantize_nf4``.

    ``tile_blocks``: None runs the 1-D kernel (1,024 bytes a program); a power of two runs the 2-D tile kernel
    with that many quantization blocks a program; "auto" is the tile kernel with ``TILE_BLOCKS_GPU`` on a GPU and
    the 1-D kernel under the interpreter (whose cost is per program). ``pairs``: the tile kernel decodes a byte by
    one gather from the byte-pair table (a candidate that bench/bench_dequant.py times on a GPU beside the 16-entry
    table; not the default until a GPU run shows it faster)."""
    dtype = dtype or nf4.dtype
    interp = _interpreting()
    if not interp and not nf4.packed.is_cuda:
        raise RuntimeError("dequantize_nf4_triton needs a CUDA tensor or TRITON_INTERPRET=1 set before import")
    device = nf4.device
    n_out = nf4.numel
    packed = nf4.packed.reshape(-1).contiguous()
    n_bytes = packed.numel()
    kernel_dtype = torch.float32 if interp else dtype
    out = torch.empty(n_out, dtype=kernel_dtype, device=device)
    if tile_blocks == "auto":
        tile_blocks = None if interp else TILE_BLOCKS_GPU
    if pairs and tile_blocks is None:
        raise ValueError("the byte-pair table is a variant of the tile kernel: give tile_blocks")
    table = shared_table("pairs" if pairs else "nf4", device)
    if nf4.double_quant:
        assert nf4.nested_absmax is not None and nf4.nested_code is not None and nf4.offset is not None
        absmax2, code2, offset = nf4.nested_absmax.float(), nf4.nested_code.float(), float(nf4.offset)
    else:  # unused pointers; any fp32 tensor will do
        absmax2, code2, offset = table, table, 0.0
    args = (packed, nf4.absmax.contiguous(), absmax2, code2, table, out, offset, n_out, n_bytes)
    consts = {"BLOCKSIZE": nf4.blocksize, "NESTED_BLOCKSIZE": nf4.nested_blocksize, "DOUBLE_QUANT": nf4.double_quant}
    extra = {} if interp else {"enable_fp_fusion": False, "num_warps": 4}
    if tile_blocks is None:
        bytes_per_program = _BYTES_PER_PROGRAM_INTERPRETER if interp else _BYTES_PER_PROGRAM_GPU
        grid = (triton.cdiv(n_bytes, bytes_per_program),)
        _nf4_dq_dequant_kernel[grid](*args, **consts, BYTES=bytes_per_program, **extra)
    else:
        n_blocks = triton.cdiv(n_out, nf4.blocksize)
        grid = (triton.cdiv(n_blocks, tile_blocks),)
        _nf4_dq_dequant_tile_kernel[grid](*args, **consts, BLOCKS=tile_blocks, PAIRS=pairs, **extra)
    return out.to(dtype).reshape(nf4.shape)
