"""The frozen NF4 product and the LoRA branch in one autograd node (kernels/lora_fused.py
``frozen_linear_with_lora``) against the two nodes it replaces and against the math in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora_pipeline.kernels.dropout import FastDropout, SeededMask
from qlora_pipeline.kernels.linear4bit import Linear4bit, cache_dequantized_weights
from qlora_pipeline.kernels.lora import LoraLinear
from qlora_pipeline.kernels.lora_fused import (
    _widening_mm_probe,
    add_lora_branch,
    frozen_linear_with_lora,
    widening_mm,
    widening_mm_is_one_launch,
)
from qlora_pipeline.kernels.nf4 import quantize_nf4

IN, OUT, R = 128, 40, 4


def _base(dtype: torch.dtype, cached: bool) -> Linear4bit:
    torch.manual_seed(0)
    base = Linear4bit(quantize_nf4(torch.randn(OUT, IN), blocksize=64), bias=torch.randn(OUT), compute_dtype=dtype)
    if cached:
        assert cache_dequantized_weights(nn.Sequential(base), 2**20, dtype) > 0
    return base


def _seeded(kind: str) -> SeededMask | None:
    """What training passes: the dropout mask as a seed (on every device), or None without dropout."""
    return SeededMask(123456789, FastDropout(0.3).threshold) if kind == "seeded" else None


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("mask", ["none", "seeded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_node_is_the_two_nodes_and_the_input_gradient_is_rounded_once(
    dtype: torch.dtype, mask: str, cached: bool
) -> None:
    """Output and A's and B's gradients are the two nodes' bit for bit; x's gradient sums the frozen product into
    the branch's in the matmul (one rounding): within a rounding of the float64 truth, and within two of the two
    nodes' (which round the frozen product, then the sum)."""
    base = _base(dtype, cached)
    seeded = _seeded(mask)
    torch.manual_seed(1)
    a0, b0 = torch.randn(R, IN) * 0.1, torch.randn(OUT, R) * 0.1
    x0, g = torch.randn(3, 7, IN).to(dtype), torch.randn(3, 7, OUT).to(dtype)
    scale = 2.5
    runs = []
    for fused in (True, False):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        if fused:
            y = frozen_linear_with_lora(x, base.weight_source(dtype, x.device), base.bias, a, b, scale, seeded)
            assert type(y.grad_fn).__name__ == "_FrozenLinearLoraAddBackward"
        else:
            y = add_lora_branch(base(x), x, a, b, scale, seeded)
        y.backward(g)
        runs.append((y.detach(), x.grad, a.grad, b.grad))
    (y1, gx1, ga1, gb1), (y2, gx2, ga2, gb2) = runs
    assert y1.dtype == dtype and ga1.dtype == torch.float32 and float(ga1.abs().sum()) > 0
    assert torch.equal(y1, y2) and torch.equal(ga1, ga2) and torch.equal(gb1, gb2)

    w64 = base.dequantized_weight(dtype).double()
    keep64 = torch.ones(3, 7, IN, dtype=torch.float64)
    if seeded is not None:
        keep64 = seeded.mask(torch.Size([3, 7, IN]), torch.float64)
    assert mask == "none" or 0.5 < float(keep64.mean()) < 0.9
    b_cast = b0.to(dtype).double()
    a_cast = a0.to(dtype).double()
    lora_gx = ((g.double() @ b_cast).to(dtype).double() * scale).to(dtype).double() @ a_cast  # du as rounded
    truth = g.double() @ w64 + lora_gx.to(dtype).double() * keep64
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23
    tolerance = ulp * float(truth.abs().max()) * (1 if dtype == torch.bfloat16 else 8)  # fp32: the GEMM's own sums
    err_fused = float((gx1.double() - truth).abs().max())
    assert err_fused <= tolerance, (err_fused, tolerance)
    assert float((gx1.double() - gx2.double()).abs().max()) <= 2 * tolerance
    assert dtype == torch.float32 or err_fused <= float((gx2.double() - truth).abs().max())


def test_lora_over_nf4_trains_through_the_one_node_and_other_bases_keep_two() -> None:
    """LoraLinear takes the one node for an NF4 base in its compute dtype, and the branch node over anything else
    (an nn.Linear, or an NF4 base that multiplies in another dtype than the branch)."""
    lora = LoraLinear(_base(torch.bfloat16, False), r=R, alpha=8, dropout=0.1, compute_dtype=torch.bfloat16).train()
    with torch.no_grad():
        lora.lora_B.normal_()  # B starts at zero, which leaves A without a gradient
    x = torch.randn(2, 5, IN, dtype=torch.bfloat16, requires_grad=True)
    y = lora(x)
    assert type(y.grad_fn).__name__ == "_FrozenLinearLoraAddBackward"
    y.float().square().sum().backward()
    assert lora.lora_A.grad is not None and float(lora.lora_A.grad.abs().sum()) > 0 and x.grad is not None
    plain = LoraLinear(nn.Linear(IN, OUT).bfloat16(), r=R, alpha=8, compute_dtype=torch.bfloat16)
    assert type(plain(x).grad_fn).__name__ == "_LoraBranchAddBackward"
    other = LoraLinear(_base(torch.float32, False), r=R, alpha=8, compute_dtype=torch.bfloat16)
    assert type(other(x).grad_fn).__name__ != "_FrozenLinearLoraAddBackward"


def test_gradient_products_in_the_masters_dtype_are_the_reference_where_mm_cannot_widen() -> None:
    """A's and B's gradients: a 16-bit product written in fp32. A CPU has no ``torch.mm(..., out_dtype=)`` (torch
    registers it for CUDA only), so it takes the reference, the product then the cast, bit for bit; a device the
    probe cannot read a product back from (meta) keeps it too, and fp32 inputs never ask."""
    gen = torch.Generator().manual_seed(0)
    m1 = torch.randn(37, 16, generator=gen).to(torch.bfloat16).t()  # a transposed view, as du.t() in backward
    m2 = torch.randn(37, 64, generator=gen).to(torch.bfloat16)
    got = widening_mm(m1, m2, torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, (m1 @ m2).float())
    assert torch.equal(widening_mm(m1, m2, torch.bfloat16), m1 @ m2)
    assert not widening_mm_is_one_launch(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert not widening_mm_is_one_launch(torch.device("cuda"), torch.float32, torch.float32)
    assert not _widening_mm_probe(torch.device("meta"), torch.bfloat16, torch.float32)
