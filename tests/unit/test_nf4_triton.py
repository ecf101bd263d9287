"""The one-launch Triton NF4+DQ dequant equals the torch reference bit for bit (interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from qlora_pipeline.kernels.nf4 import dequantize_nf4, quantize_nf4
from qlora_pipeline.kernels.nf4_dispatch import dequantize
from tests.ptx import probe_counts

# tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, so these tests always run
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "run under tests/conftest.py"

from qlora_pipeline.kernels.nf4_triton import TILE_BLOCKS_GPU, dequantize_nf4_triton  # noqa: E402 - after the check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


KERNELS = [(None, False), (4, False), (4, True)]
"""(tile_blocks, pairs): the 1-D kernel, and the 2-D tile kernel (4 quantization blocks a program: several programs
even on small shapes) with the 16-entry table and with the byte-pair table."""


SHAPES = [(256, 320), (7, 9), (129, 65), (3, 1000), (1, 1)]
CASES = [(shape, *kernel) for shape in SHAPES for kernel in KERNELS] + [
    ((300, 1024), None, False),
    ((300, 1024), TILE_BLOCKS_GPU, False),
    ((300, 1024), TILE_BLOCKS_GPU, True),
]
"""Every shape through every kernel; the largest (4,800 quantization blocks) through the 1-D kernel and the tile
kernels at the GPU default (``TILE_BLOCKS_GPU`` blocks a program): at 4 blocks a program it is 1,200 programs, 20 s
under the interpreter, and tests nothing the smaller shapes do not."""


@pytest.mark.parametrize(("shape", "tile_blocks", "pairs"), CASES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_equals_reference(
    shape: tuple[int, int], double_quant: bool, tile_blocks: int | None, pairs: bool
) -> None:
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    w = (torch.randn(shape, generator=g) * 0.03).bfloat16()
    nf4 = quantize_nf4(w, double_quant=double_quant).to(DEVICE)
    for dtype in OUT_DTYPES:
        out = dequantize_nf4_triton(nf4, dtype, tile_blocks, pairs)
        ref = dequantize_nf4(nf4, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(_bits(out), _bits(ref)), f"{shape} dq={double_quant} {dtype}"


@pytest.mark.parametrize(("tile_blocks", "pairs"), KERNELS)
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_triton_other_blocksizes(blocksize: int, tile_blocks: int | None, pairs: bool) -> None:
    w = torch.randn(61, 333) * 5  # odd element count, partial last block, several nested blocks for small bs
    nf4 = quantize_nf4(w, blocksize=blocksize).to(DEVICE)
    for dtype in OUT_DTYPES:
        out = dequantize_nf4_triton(nf4, dtype, tile_blocks, pairs)
        assert torch.equal(_bits(out), _bits(dequantize_nf4(nf4, dtype)))


def test_triton_keeps_two_roundings_and_zero_blocks() -> None:
    """Values whose absmax is sensitive to FMA contraction, plus zero blocks, still match exactly."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(512, 256, generator=g) * torch.logspace(-3, 3, 512).unsqueeze(1)
    w[5] = 0
    nf4 = quantize_nf4(w).to(DEVICE)
    out = dequantize_nf4_triton(nf4, torch.float32)
    assert torch.equal(_bits(out), _bits(dequantize_nf4(nf4, torch.float32)))
    assert torch.equal(_bits(dequantize_nf4_triton(nf4, torch.float32, 8)), _bits(out))
    assert torch.equal(_bits(dequantize_nf4_triton(nf4, torch.float32, 8, pairs=True)), _bits(out))
    assert torch.all(out[5] == 0)
    # an FMA (one rounding) would change some absmax values: the reference really has two roundings
    q, a2, off = nf4.absmax.long(), nf4.nested_absmax, nf4.offset
    scale = a2.repeat_interleave(nf4.nested_blocksize)[: q.numel()].double()
    fused = (nf4.nested_code[q].double() * scale + off).float()
    two_step = nf4.nested_code[q] * scale.float() + torch.tensor(off, device=DEVICE)
    assert not torch.equal(fused, two_step)


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA, to see which way the dispatcher turns without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_dispatcher_sends_cuda_to_triton_and_the_rest_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import qlora_pipeline.kernels.nf4_triton as nf4_triton

    calls: list[str] = []
    monkeypatch.setattr(nf4_triton, "dequantize_nf4_triton", lambda nf4, dtype: calls.append("triton") or "triton")
    nf4 = quantize_nf4(torch.randn(64, 96))
    out = dequantize(nf4, torch.bfloat16)
    assert calls == [] and torch.equal(_bits(out), _bits(dequantize_nf4(nf4, torch.bfloat16)))
    on_cuda = dataclasses.replace(nf4, packed=nf4.packed.as_subclass(_ReportsCuda))
    assert dequantize(on_cuda, torch.bfloat16) == "triton" and calls == ["triton"]
    if torch.cuda.is_available():  # and on a real GPU the routed kernel gives the reference's bits
        monkeypatch.undo()
        got = dequantize(nf4.to("cuda"), torch.bfloat16)
        assert torch.equal(_bits(got.cpu()), _bits(dequantize_nf4(nf4, torch.bfloat16)))


_PTX_PROBE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels import nf4_triton
sig = {"packed_ptr": "*u8", "qabsmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
       "table_ptr": "*fp32", "out_ptr": "*bf16", "offset": "fp32", "n_out": "i32", "n_bytes": "i32",
       "BLOCKSIZE": "constexpr", "NESTED_BLOCKSIZE": "constexpr", "DOUBLE_QUANT": "constexpr"}
const = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256, "DOUBLE_QUANT": True}
tile = nf4_triton._nf4_dq_dequant_tile_kernel
for name, k, extra in (("1d", nf4_triton._nf4_dq_dequant_kernel, {"BYTES": 1024}),
                       ("tile", tile, {"BLOCKS": 64, "PAIRS": False}), ("pairs", tile, {"BLOCKS": 64, "PAIRS": True})):
    s, c = {**sig, **dict.fromkeys(extra, "constexpr")}, {**const, **extra}
    # what a launch specializes: 16-byte aligned pointers, sizes divisible by 16 (the benchmarked weight's are)
    aligned = {(list(s).index(n),): [["tt.divisibility", 16]] for n in s if s[n].startswith("*") or n.startswith("n_")}
    for fusion in (False, True):
        src = ASTSource(fn=k, signature=s, constexprs={(list(s).index(n),): v for n, v in c.items()}, attrs=aligned)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": fusion}).asm["ptx"]
        counts = [r"\\bfma\\.", r"cvt\\.rn\\.bf16", r"ld\\.global\\.b32\\b", r"ld\\.global\\.b64\\b"]
        print(name, fusion, *(len(re.findall(p, ptx)) for p in counts))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above already run the compiled kernel")
def test_cuda_compile_has_no_fma_when_fusion_is_off() -> None:
    """Without a GPU, compile the kernel to sm_90 PTX (no interpreter) and check the launch option we use
    (enable_fp_fusion=False) really keeps the absmax multiply and add separate, and bf16 stores round."""
    counts = probe_counts(_PTX_PROBE, timeout_s=120)
    for kernel in ("1d", "tile", "pairs"):  # every kernel compiles for sm_90
        fma_off, cvt_off, _, _ = counts[(kernel, "False")]
        fma_on, _, _, _ = counts[(kernel, "True")]
        assert fma_off == 0 and cvt_off > 0, kernel
        assert fma_on > 0, kernel  # the option matters: Triton would contract code2[q] * absmax2 + offset
    # the byte-pair table: a byte's two values come from one 8-byte gather, where the 16-entry table takes two 4-byte
    # ones: half the gathers (a few 4-byte loads of the absmax side remain in both)
    _, _, tile32, tile64 = counts[("tile", "False")]
    _, _, pairs32, pairs64 = counts[("pairs", "False")]
    assert tile64 == 0 and pairs64 > 0 and 2 * pairs64 <= tile32 and pairs32 + pairs64 < tile32, counts
