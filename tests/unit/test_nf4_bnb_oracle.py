"""Our NF4 quantizer/dequantizer against bitsandbytes' CPU backend: byte equality, both directions.

Known bnb 0.50.2 CPU bug met here: its AVX512 4-bit dequant indexes absmax per row
(``row * (cols // blocksize) + col // blocksize``), which is wrong when ``cols % 16 == 0`` but
``cols % blocksize != 0`` (blocks then cross rows). For those shapes the reference dequant is bnb's own
torch "default" backend, which indexes the flattened tensor like we do.
"""

from __future__ import annotations

import math

import pytest
import torch

from qlora_pipeline.kernels.formats.bnb_folder import nf4_from_state_dict, nf4_to_state_dict
from qlora_pipeline.kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")  # the oracle itself absent: skip
# A private path of the pinned oracle: if a bnb release moves it, these cases must fail, not skip quietly.
import bitsandbytes.backends.default.ops as _default_ops  # noqa: E402

bnbF = bnb.functional

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 9), (129, 65), (3, 1000), (3, 1008), (64, 128), (256, 320), (1, 1)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _bnb_quantize(w: torch.Tensor, blocksize: int = 64, dq: bool = True):
    return bnbF.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=dq)


def _bnb_dequant_ref(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bnb's dequant, sidestepping its CPU kernel's row-indexing bug (module docstring)."""
    cols = state.shape[-1]
    if cols % 16 == 0 and cols % state.blocksize != 0:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        code = bnbF.get_4bit_type("nf4", device="cpu")
        return _default_ops._dequantize_4bit_compute(
            packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, dtype
        )
    state.dtype = dtype
    return bnbF.dequantize_4bit(packed, state)


def _assert_same_state(ours: NF4Weight, packed: torch.Tensor, state) -> None:
    assert torch.equal(ours.packed, packed)
    assert ours.absmax.dtype == state.absmax.dtype and torch.equal(_bits_any(ours.absmax), _bits_any(state.absmax))
    if state.nested:
        assert torch.equal(_bits(ours.nested_absmax), _bits(state.state2.absmax))
        assert torch.equal(_bits(ours.nested_code), _bits(state.state2.code))
        assert ours.offset == state.offset.item()  # the same fp32 value, bit for bit
    assert ours.shape == state.shape and ours.dtype == state.dtype


def _bits_any(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else _bits(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_and_dequant_equal_bnb(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(math.prod(shape))
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    ours = quantize_nf4(w)
    packed, state = _bnb_quantize(w)
    _assert_same_state(ours, packed, state)
    for out_dtype in DTYPES:
        assert torch.equal(_bits(dequantize_nf4(ours, out_dtype)), _bits(_bnb_dequant_ref(packed, state, out_dtype)))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
def test_other_blocksizes(blocksize: int) -> None:
    w = torch.randn(40, 300).bfloat16()  # 12000 values: partial last block for every blocksize
    ours = quantize_nf4(w, blocksize=blocksize)
    packed, state = _bnb_quantize(w, blocksize)
    _assert_same_state(ours, packed, state)
    assert torch.equal(_bits(dequantize_nf4(ours)), _bits(_bnb_dequant_ref(packed, state, torch.bfloat16)))


def test_without_double_quant() -> None:
    w = torch.randn(33, 130)
    ours = quantize_nf4(w, double_quant=False)
    packed, state = _bnb_quantize(w, dq=False)
    assert not state.nested and ours.nested_absmax is None
    _assert_same_state(ours, packed, state)
    assert torch.equal(_bits(dequantize_nf4(ours)), _bits(_bnb_dequant_ref(packed, state, torch.float32)))


def _log_uniform(shape: tuple[int, int], lo: float, hi: float, seed: int) -> torch.Tensor:
    """Gaussian rows with magnitudes spread log-uniformly over [lo, hi], one scale per 64-block."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    scale = 10 ** (torch.rand(-(-n // 64), generator=g) * (math.log10(hi) - math.log10(lo)) + math.log10(lo))
    w = torch.randn(n, generator=g) * scale.repeat_interleave(64)[:n]
    return w.reshape(shape)


@pytest.mark.parametrize(
    ("dtype", "lo", "hi"),
    [
        (torch.float32, 1e-30, 1e-6),
        (torch.float32, 1e4, 1e30),
        (torch.bfloat16, 1e-30, 1e-6),
        (torch.bfloat16, 1e4, 1e30),
        (torch.float16, 1e-4, 1e-2),  # fp16 cannot hold 1e-30 or 1e30; its own extremes
        (torch.float16, 1e2, 6e3),
    ],
)
def test_extreme_magnitudes(dtype: torch.dtype, lo: float, hi: float) -> None:
    w = _log_uniform((48, 200), lo, hi, seed=int(math.log10(hi) * 10)).to(dtype)
    assert torch.isfinite(w).all() and (w != 0).float().mean() > 0.9
    ours = quantize_nf4(w)
    packed, state = _bnb_quantize(w)
    _assert_same_state(ours, packed, state)
    for out_dtype in (torch.float32, dtype):
        assert torch.equal(_bits(dequantize_nf4(ours, out_dtype)), _bits(_bnb_dequant_ref(packed, state, out_dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_blocks(dtype: torch.dtype) -> None:
    w = torch.randn(10, 100).to(dtype)
    w[2] = 0  # crosses blocks 3-4
    w.view(-1)[128:192] = 0  # block 2 exactly
    w.view(-1)[-40:] = 0  # the partial last block (1000 = 15 * 64 + 40)
    ours = quantize_nf4(w)
    packed, state = _bnb_quantize(w)
    _assert_same_state(ours, packed, state)
    assert torch.all(packed.view(-1)[64:96] == 0x77)
    out = dequantize_nf4(ours, torch.float32)
    assert torch.equal(_bits(out), _bits(_bnb_dequant_ref(packed, state, torch.float32)))
    assert torch.all(out.view(-1)[128:192] == 0) and torch.all(out.view(-1)[-40:] == 0)


def test_all_zero_tensor() -> None:
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    ours = quantize_nf4(w)
    packed, state = _bnb_quantize(w)
    _assert_same_state(ours, packed, state)
    assert torch.equal(dequantize_nf4(ours), w)


def _bnb_state_from_ours(nf4: NF4Weight):
    tensors = nf4_to_state_dict("", nf4)
    packed = tensors.pop("weight")
    qs = {k.removeprefix("weight."): v for k, v in tensors.items()}
    return packed, bnbF.QuantState.from_dict(qs, device=torch.device("cpu"))


def test_round_trip_ours_to_bnb_dequant() -> None:
    w = torch.randn(96, 320, dtype=torch.bfloat16)
    ours = quantize_nf4(w)
    packed, state = _bnb_state_from_ours(ours)
    out = bnbF.dequantize_4bit(packed, state)
    assert out.dtype == torch.bfloat16
    assert torch.equal(_bits(out), _bits(dequantize_nf4(ours)))


def test_round_trip_bnb_to_ours_dequant() -> None:
    w = torch.randn(80, 192, dtype=torch.float16)
    lin = bnb.nn.Linear4bit(192, 80, bias=False, quant_type="nf4", compute_dtype=torch.float16)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
    lin = lin.to("cpu")  # Params4bit quantizes on .to()
    ours = nf4_from_state_dict("", lin.state_dict())
    ref = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(_bits(dequantize_nf4(ours)), _bits(ref))
    assert torch.equal(ours.packed, quantize_nf4(w).packed)
