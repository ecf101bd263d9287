"""The torch NF4 reference on its own: format facts (docs/formats.md, NF4 layout), no oracle needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_pipeline.kernels.dynamic_map import create_dynamic_map
from qlora_pipeline.kernels.nf4 import (
    NF4_VALUES,
    dequantize_absmax,
    dequantize_nf4,
    nf4_bytes,
    nf4_error_stats,
    nf4_table,
    quantize_nf4,
    unpack_codes,
)
from qlora_pipeline.kernels.nf4_dispatch import dequantize


def test_table_is_the_literal_bnb_table() -> None:
    t = nf4_table()
    assert t.dtype == torch.float32 and t.numel() == 16
    assert t[7].item() == 0.0 and t[0].item() == -1.0 and t[15].item() == 1.0
    # entries a normal-quantile recomputation gets wrong in the last bit (docs/formats.md, NF4 layout)
    assert t[4].item() == pytest.approx(-0.28444138169288635, abs=0) and t[4].item() != -0.2844412922859192
    assert torch.all(t[1:] > t[:-1])
    assert NF4_VALUES[8] == 0.07958029955625534


def test_exact_codes_pack_high_nibble_first() -> None:
    # A block whose absmax is 1 holds the table values themselves: code i must come back as i.
    w = nf4_table().repeat(4)  # 64 values = one block
    nf4 = quantize_nf4(w, blocksize=64, double_quant=False)
    assert nf4.packed.shape == (32, 1) and nf4.packed.dtype == torch.uint8
    assert nf4.packed[0, 0].item() == 0x01 and nf4.packed[7, 0].item() == 0xEF
    assert torch.equal(unpack_codes(nf4.packed, 64), torch.arange(16).repeat(4))
    assert torch.equal(dequantize_nf4(nf4), w)


def test_ties_go_to_lower_code() -> None:
    code = nf4_table()
    mids = (code[:-1] + code[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids, mids + 1e-7]).float()  # 1 + 15 + 15 = 31 values
    nf4 = quantize_nf4(w, blocksize=32, double_quant=False)
    codes = unpack_codes(nf4.packed, 31)
    assert torch.equal(codes[1:16], torch.arange(15))  # exactly on a midpoint -> lower code
    assert torch.equal(codes[16:], torch.arange(1, 16))


def test_blocks_run_over_flattened_rows() -> None:
    w = torch.zeros(3, 48)
    w[0, 0] = 2.0  # block 0 = w[0, :] + w[1, :16]
    w[1, 30] = -5.0  # block 1 = w[1, 16:] + w[2, :32]
    w[2, 40] = 3.0  # block 2 = w[2, 32:]  (partial: 16 of 64)
    nf4 = quantize_nf4(w, blocksize=64, double_quant=False)
    assert nf4.absmax.tolist() == [2.0, 5.0, 3.0]
    assert torch.equal(dequantize_nf4(nf4), w)


def test_zero_blocks_follow_cpu_backend() -> None:
    w = torch.randn(4, 64)
    w[1] = 0.0
    tail = torch.zeros(8)
    nf4 = quantize_nf4(torch.cat([w.reshape(-1), tail]), blocksize=64, double_quant=False)
    assert torch.all(nf4.packed[32:64] == 0x77)  # code 7 = 0.0, not CUDA's 0x00 (-1.0)
    assert nf4.absmax[1].item() == 0.0
    assert nf4.absmax[-1].item() == torch.tensor(1e-38).item()  # partial block keeps the clamped floor
    out = dequantize_nf4(nf4)
    assert torch.equal(out[64:128], torch.zeros(64)) and torch.equal(out[-8:], torch.zeros(8))
    # with double quant the zero block's absmax is no longer 0, but code 7 still gives exact zeros
    dq = quantize_nf4(w, blocksize=64)
    assert dequantize_absmax(dq)[1].item() != 0.0
    assert torch.equal(dequantize_nf4(dq)[1], torch.zeros(64))


def test_odd_count_pads_low_nibble_with_zero_code() -> None:
    nf4 = quantize_nf4(torch.tensor([0.5, -1.0, 1.0]), double_quant=False)
    assert nf4.packed.shape == (2, 1)
    assert nf4.packed[1, 0].item() & 0xF == 7


def test_double_quant_state() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g)
    nf4 = quantize_nf4(w)
    plain = quantize_nf4(w, double_quant=False)
    blocks = 300 * 256 // 64
    assert nf4.absmax.dtype == torch.uint8 and nf4.absmax.shape == (blocks,)
    assert nf4.nested_absmax is not None and nf4.nested_absmax.shape == (-(-blocks // 256),)
    assert nf4.offset == plain.absmax.mean().item()
    assert torch.equal(nf4.nested_code, create_dynamic_map(True))
    assert torch.equal(nf4.packed, plain.packed)  # double quant changes only the stored absmax
    # two roundings: fp32(code2[q] * absmax2), then + offset
    scale = (nf4.nested_code[nf4.absmax.long()] * nf4.nested_absmax.repeat_interleave(256)[:blocks]).float()
    assert torch.equal(dequantize_absmax(nf4), scale + torch.tensor(nf4.offset))
    err = (dequantize_absmax(nf4) - plain.absmax).abs().max().item()
    assert 0 < err < 0.02 * plain.absmax.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_and_dtypes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 192, generator=g).to(dtype)
    nf4 = quantize_nf4(w)
    assert nf4.dtype == dtype and nf4.shape == w.shape
    out = dequantize_nf4(nf4)
    assert out.dtype == dtype and out.shape == w.shape
    rel = nf4_error_stats(w, nf4)["rel_error"]
    assert 0.085 < rel < 0.10  # NF4 on Gaussian weights: ~0.092 (docs/formats.md, NF4 round-trip error: 0.0936)
    assert torch.equal(dequantize_nf4(nf4, torch.float32).to(dtype), out)
    assert torch.equal(dequantize(nf4), out)  # CPU dispatcher = reference


def test_blocksizes_and_storage_bytes() -> None:
    w = torch.randn(64, 512)
    for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        nf4 = quantize_nf4(w, blocksize=bs)
        blocks = w.numel() // bs
        nested = -(-blocks // 256)
        assert nf4.absmax.numel() == blocks
        assert nf4_bytes(nf4) == w.numel() // 2 + blocks + 64 + nested * 4 + 1024 + 4
    plain = quantize_nf4(w, double_quant=False)
    assert nf4_bytes(plain) == w.numel() // 2 + 4 * w.numel() // 64 + 64


def test_bad_input_and_frozen() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        quantize_nf4(torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.ones(0))
    nf4 = quantize_nf4(torch.randn(64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        nf4.blocksize = 128  # type: ignore[misc]
    moved = nf4.to("cpu")
    assert torch.equal(moved.packed, nf4.packed) and moved.offset == nf4.offset
