"""8-bit "dynamic" code and blockwise 8-bit (de)quantization, byte-compatible with bitsandbytes.

Used for two things: the double quantization of NF4 absmax (signed map, blocksize 256) and the 8-bit
optimizer state (signed map for the first moment, unsigned map for the second). This module is the one home of
the quantizer: :func:`quantize_blockwise` for NF4, :func:`requantize_blockwise` (the same bins and table, plus bnb's
CPU handling of NaN/Inf) for the optimizer and its Triton kernel, :func:`bin_to_code_table` for both.

Why the odd arithmetic in :func:`quantize_blockwise`: bitsandbytes' CPU kernel does not search the code
for the nearest entry. It scales each value to [-1, 1], maps it onto one of 65536 evenly spaced bins
(``uint16((v + 1) * 0.5 * 65535 + 0.5)``) and looks the bin up in a table built from the code's midpoints.
That differs from true nearest-neighbour for values close to a midpoint (about 650 of 1M normal samples),
so to reproduce its bytes (the NF4 ``absmax`` bytes that transformers loads) we follow the same steps in
torch. Everything is a pure function of its inputs; no bitsandbytes import.
"""

from __future__ import annotations

import functools

import torch

_LUT_BINS = 65536  # bins of the [-1, 1] range in bnb's CPU quantizer


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Return the sorted dynamic-exponent code (2**total_bits fp32 values in [-1, 1]).

    Each exponent level ``10**(e - max_exponent_bits + 1)`` holds the midpoints of an fp32
    ``linspace(0.1, 1)`` whose length doubles per level; the fp32 rounding of those midpoints is part of the
    format, so they are computed with fp32 torch ops as the reference does (float64 would differ in the
    last bit).
    """
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def level(n_points: int, scale: float) -> None:
        edges = torch.linspace(0.1, 1, n_points, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values.extend((scale * mids).tolist())
        if signed:
            values.extend((-scale * mids).tolist())

    for e in range(max_exponent_bits):
        bits = e + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        level(int(2**bits + 1), 10 ** (-(max_exponent_bits - 1) + e))
    if extra > 0:
        # Extra items reuse the last exponent level (the format's definition, not a typo here).
        level(extra + 1, 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"dynamic map with max_exponent_bits={max_exponent_bits}, total_bits={total_bits} has "
            f"{len(values)} entries, expected {2**total_bits}"
        )
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def bin_to_code_table(code: torch.Tensor) -> torch.Tensor:
    """Map each of the 65536 bins of [-1, 1] to the index of the code entry whose midpoint range holds it.

    Bin i stands for ``-1 + fp32(2i / 65535)``; its code index is the number of midpoints strictly below it.
    The code must be sorted ascending (both dynamic maps are). Returns a uint8 CPU tensor that is cached per
    code content and shared: read it, copy it (``.to(device, copy=True)``) before writing to it.
    """
    return _table_for(code.detach().float().cpu().contiguous().numpy().tobytes())


@functools.lru_cache(maxsize=8)
def _table_for(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    centres = -1.0 + (2.0 * i) / float(_LUT_BINS - 1)
    return torch.searchsorted(mids, centres, right=False).to(torch.uint8)


def _bin_index(v: torch.Tensor) -> torch.Tensor:
    """Bin of each normalized fp32 value: ``trunc(fp32(fp32((clamp(v) + 1) * 0.5) * 65535) + 0.5)``.

    Whether the last multiply-add is rounded twice (as here), fused into an FMA, or computed exactly in float64 and
    rounded once (as the 8-bit AdamW Triton kernel does; the same value as the FMA) does not matter: the forms give
    the same bin for every fp32 value of ``(clamp(v) + 1) * 0.5``, i.e. every fp32 in [0, 1] (checked exhaustively).
    """
    half = (v.clamp(-1.0, 1.0) + 1.0) * 0.5
    return (half * float(_LUT_BINS - 1) + 0.5).to(torch.int32)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to 8-bit code indices per block of ``blocksize`` flattened elements.

    Returns ``(q, absmax)``: uint8 of ``x``'s shape and fp32 ``[ceil(n / blocksize)]``. Values are scaled by
    ``fp32(1 / absmax)`` (reciprocal multiply, like the reference); an all-zero block stores absmax 0 and
    codes 0, as bitsandbytes' CPU kernel does.
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_blockwise supports fp32/fp16/bf16 input, got {x.dtype}")
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    padded, n = _blocks(x.detach(), blocksize)
    absmax = padded.abs().amax(dim=1) if n else torch.zeros(0)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # zero blocks: no 0 * inf = NaN
    bins = _bin_index(padded * inv.unsqueeze(1))
    table = bin_to_code_table(code).to(x.device)
    q = table[bins]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def requantize_blockwise(x: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit optimizer's requantization: :func:`quantize_blockwise` with bnb's CPU handling of non-finite values.

    ``table`` is :func:`bin_to_code_table` of the code, already on ``x``'s device (the optimizer keeps one per
    device and hands the same table to its Triton kernel). Same bytes as :func:`quantize_blockwise` on finite
    input; absmax ignores NaN but not Inf, a NaN normalized value gets code 0, an all-zero block codes 0.
    Returns flat ``(q uint8 [n], absmax fp32 [ceil(n / blocksize)])``.
    """
    padded, n = _blocks(x, blocksize)
    absmax = torch.where(torch.isnan(padded), 0.0, padded.abs()).amax(dim=1)
    y = padded * (1.0 / torch.where(absmax == 0, 1.0, absmax)).unsqueeze(1)  # zero blocks get codes 0 below
    bad = torch.isnan(y)
    q = table[_bin_index(torch.where(bad, 0.0, y))]
    q = torch.where(bad | (absmax == 0).unsqueeze(1), 0, q).to(torch.uint8)
    return q.reshape(-1)[:n], absmax


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """``x`` flattened to fp32 and zero-padded to ``[ceil(n / blocksize), blocksize]``, and ``n``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize), n


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``fp32(code[q] * absmax[block])`` then one cast to ``dtype``."""
    if q.dtype != torch.uint8:
        raise ValueError(f"q must be uint8, got {q.dtype}")
    n = q.numel()
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {blocks} for {n} values / {blocksize}")
    vals = code.float().to(q.device)[q.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (vals * scale).to(dtype).reshape(q.shape)
