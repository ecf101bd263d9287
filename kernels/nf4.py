"""NF4 4-bit weights with double-quantized absmax: the torch reference, byte-compatible with bitsandbytes.

Format (see docs/formats.md, NF4 layout): one fp32 absmax per ``blocksize`` consecutive elements of
the flattened weight; each element becomes the index of a 16-entry table (the literal NF4 values below),
two per byte with the even element in the high nibble, stored as uint8 ``[(n + 1) // 2, 1]``. With double
quantization the absmax vector is centred on its mean (``offset``) and quantized to 8 bits with the signed
dynamic map in blocks of ``nested_blocksize`` (256).

The quantizer follows bitsandbytes' CPU (torch "default") backend step for step, because that is the
backend we can run as an oracle and because its bytes are what a CPU user of transformers gets:
reciprocal multiply for full blocks, a true division for the trailing partial block, ``clamp(-1, 1)``,
``bucketize`` against fp32 midpoints of the table (ties go to the lower code, like CUDA's strict ``>``).

All-zero blocks: we match the CPU backend, which clamps absmax to 1e-38 before the reciprocal, so a zero
block gets code 7 (0.0; byte 0x77) and dequantizes to exactly 0 whatever the (double-quantized) absmax
becomes. bnb's CUDA kernel instead computes ``0 * (1/0) = NaN``, fails every threshold and writes code 0
(-1.0; byte 0x00), which dequantizes to ``-absmax'`` - not zero once absmax is double-quantized. The stored
absmax of a zero block is 0, except for a trailing partial block where the CPU backend stores the clamped
1e-38; we copy that too so the bytes match.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qlora_pipeline.kernels.dynamic_map import create_dynamic_map, dequantize_blockwise, quantize_blockwise

# Literal values from bitsandbytes (functional.get_4bit_type("nf4"), CUDA nf4_dequantization_lut). Recomputing
# them from normal quantiles changes the last bit of some entries, so they are written out, never derived.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_ABSMAX_FLOOR = 1e-38  # the CPU backend's clamp before the reciprocal (see module docstring)


def nf4_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 code values as fp32 (a fresh tensor, so callers may not corrupt a shared one)."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


_SHARED: dict[tuple[str, torch.device], torch.Tensor] = {}


def shared_table(kind: str, device: torch.device) -> torch.Tensor:
    """A read-only lookup table kept per device for the dequant hot path: building one with ``torch.tensor`` on an
    accelerator is a blocking host-to-device copy, once per projection and pass otherwise. ``kind``: 'nf4' (16
    values) or 'pairs' (the 256x2 byte table)."""
    key = (kind, torch.device(device))
    table = _SHARED.get(key)
    if table is None:
        table = nf4_table() if kind == "nf4" else _byte_pair_table(torch.device("cpu"))
        table = _SHARED[key] = table.to(key[1])
    return table


def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    """Decision thresholds: fp32 means of neighbouring codes (the same fp32 values bnb uses)."""
    code = nf4_table(device)
    return (code[:-1] + code[1:]) / 2


@dataclass(frozen=True)
class NF4Weight:
    """A frozen NF4 weight and its quantization state.

    ``absmax`` is uint8 when double-quantized (then ``nested_absmax``, ``nested_code`` and ``offset`` are
    set), else fp32. ``dtype`` and ``shape`` describe the original weight.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: float | None
    blocksize: int
    nested_blocksize: int
    dtype: torch.dtype
    shape: torch.Size

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> NF4Weight:
        """Same weight on another device (tensors moved, nothing re-quantized)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bnb CPU's exact fp32 operations."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_ABSMAX_FLOOR).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().max().clamp(min=_ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256
) -> NF4Weight:
    """Quantize a bf16/fp16/fp32 tensor to NF4, bytes identical to bnb's ``quantize_4bit`` on CPU.

    Quantize from the dtype the model is loaded in: the same weight in bf16 and fp32 gives different bytes.
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantization needs a bf16/fp16/fp32 tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot NF4-quantize an empty tensor")
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # odd count: the last low nibble is code(0)
    codes = torch.bucketize(scaled, _nf4_midpoints(flat.device), out_int32=True).to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)

    if not double_quant:
        return NF4Weight(packed, absmax, None, None, None, blocksize, nested_blocksize, w.dtype, w.shape)
    offset = absmax.mean()  # torch's fp32 reduction, as bnb; a different summation order changes the last bit
    code2 = create_dynamic_map(signed=True).to(flat.device)
    qabsmax, absmax2 = quantize_blockwise(absmax - offset, code2, nested_blocksize)
    return NF4Weight(packed, qabsmax, absmax2, code2, offset.item(), blocksize, nested_blocksize, w.dtype, w.shape)


def dequantize_absmax(nf4: NF4Weight) -> torch.Tensor:
    """fp32 absmax per block: ``fp32(code2[q] * absmax2) + offset``, two separate roundings like bnb."""
    if not nf4.double_quant:
        return nf4.absmax.float()
    assert nf4.nested_absmax is not None and nf4.nested_code is not None and nf4.offset is not None
    scale = dequantize_blockwise(nf4.absmax, nf4.nested_absmax, nf4.nested_code, nf4.nested_blocksize)
    return scale + nf4.offset  # the float scalar is rounded to fp32 first: the same add as with an fp32 tensor


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes (int64), high nibble first."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def _byte_pair_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: byte b -> (table[b >> 4], table[b & 15]), so one gather decodes both nibbles."""
    code = nf4_table(device)
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_nf4(nf4: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequant: ``fp32(table[code] * absmax[block])`` then one cast to ``dtype`` (default: original).

    Decodes a byte at a time through a 256-entry pair table and scales whole blocks in place (about 1.5x
    faster on CPU than unpacking nibbles); the arithmetic is the same single fp32 multiply per element.
    """
    n, bs = nf4.numel, nf4.blocksize
    absmax = dequantize_absmax(nf4)
    pairs = shared_table("pairs", nf4.device)
    vals = torch.index_select(pairs, 0, nf4.packed.reshape(-1).to(torch.int32)).view(-1)[:n]
    full = n - n % bs
    vals[:full].view(-1, bs).mul_(absmax[: full // bs].unsqueeze(1))
    if full < n:
        vals[full:].mul_(absmax[-1])
    return vals.to(dtype or nf4.dtype).reshape(nf4.shape)


def nf4_bytes(nf4: NF4Weight) -> int:
    """Bytes the weight occupies in a checkpoint: packed codes, absmax, nested state, 16-entry table, offset.

    The JSON quant-state blob (~170 bytes) is left out: it is metadata, not a tensor of the weight.
    """
    total = nf4.packed.numel() * nf4.packed.element_size()
    total += nf4.absmax.numel() * nf4.absmax.element_size()
    total += len(NF4_VALUES) * 4
    if nf4.double_quant:
        assert nf4.nested_absmax is not None and nf4.nested_code is not None
        total += nf4.nested_absmax.numel() * 4 + nf4.nested_code.numel() * 4 + 4
    return total


def nf4_error_stats(w: torch.Tensor, nf4: NF4Weight) -> dict[str, float]:
    """Relative Frobenius error of the round trip and storage bytes before/after, for reports."""
    w32 = w.detach().float()
    err = (dequantize_nf4(nf4, torch.float32) - w32).norm() / w32.norm().clamp_min(1e-30)
    return {
        "rel_error": float(err),
        "bytes_before": w.numel() * w.element_size(),
        "bytes_after": nf4_bytes(nf4),
        "numel": w.numel(),
    }
