"""qlora_pipeline.kernels.dynamic_map against bitsandbytes (test oracle only) on its CPU backend."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels.dynamic_map import create_dynamic_map, dequantize_blockwise, quantize_blockwise

bnbF = pytest.importorskip("bitsandbytes.functional")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("signed", [True, False])
def test_map_is_bit_identical_to_bnb(signed: bool) -> None:
    ours = create_dynamic_map(signed)
    ref = bnbF.create_dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(_bits(ours), _bits(ref))


def test_map_shape_facts() -> None:
    signed = create_dynamic_map(True)
    assert signed.max().item() == 1.0 and signed.min().item() > -1.0  # has 1.0, not -1.0
    assert torch.unique(signed).numel() == 256
    unsigned = create_dynamic_map(False)
    assert unsigned.min().item() == 0.0 and unsigned.max().item() == 1.0
    assert torch.all(unsigned[1:] >= unsigned[:-1])


def test_map_other_parameters_match_bnb() -> None:
    for kw in ({"max_exponent_bits": 5}, {"max_exponent_bits": 4, "total_bits": 8}):
        assert torch.equal(_bits(create_dynamic_map(True, **kw)), _bits(bnbF.create_dynamic_map(True, **kw)))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256, 2048])
@pytest.mark.parametrize("n", [1, 255, 4096 + 17])
def test_quantize_blockwise_bytes_equal_bnb(signed: bool, blocksize: int, n: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + blocksize)
    x = torch.randn(n, generator=g) * 3
    if not signed:
        x = x.abs()
    code = create_dynamic_map(signed)
    q, absmax = quantize_blockwise(x, code, blocksize)
    q_ref, st = bnbF.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert torch.equal(q, q_ref)
    assert torch.equal(_bits(absmax), _bits(st.absmax))
    out = dequantize_blockwise(q, absmax, code, blocksize)
    assert torch.equal(_bits(out), _bits(bnbF.dequantize_blockwise(q_ref, st)))


def test_bin_table_not_nearest_neighbour() -> None:
    """bnb's CPU quantizer uses a 65536-bin table; exact nearest-neighbour differs near midpoints."""
    code = create_dynamic_map(True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g).clamp(-1, 1)
    x[::256] = 1.0  # absmax 1 per block: the normalized value is x itself
    q, _ = quantize_blockwise(x, code, 256)
    q_ref, _ = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    nearest = torch.searchsorted(0.5 * (code[:-1] + code[1:]), x).to(torch.uint8)
    assert torch.equal(q, q_ref)
    assert (nearest != q_ref).sum().item() > 10  # a naive quantizer would fail the equality above


def test_zero_block_and_shapes() -> None:
    code = create_dynamic_map(True)
    x = torch.randn(3, 300)
    x[1] = 0.0
    x[0, 256:] = 0.0
    q, absmax = quantize_blockwise(x, code, 100)
    q_ref, st = bnbF.quantize_blockwise(x, code=code, blocksize=100)
    assert torch.equal(q, q_ref) and torch.equal(absmax, st.absmax)
    assert absmax[3:6].eq(0).all() and q[1].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_outputs(dtype: torch.dtype) -> None:
    code = create_dynamic_map(True)
    x = (torch.randn(5000) * 10).to(dtype)
    q, absmax = quantize_blockwise(x, code, 256)
    q_ref, st = bnbF.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, st.absmax)
    out = dequantize_blockwise(q, absmax, code, 256, dtype)
    ref = torch.ops.bitsandbytes.dequantize_blockwise.default(q_ref, st.absmax, code, 256, dtype)
    assert out.dtype == dtype == ref.dtype
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_bad_arguments() -> None:
    code = create_dynamic_map(True)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.ones(4), code, 0)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(2), code, 4)
