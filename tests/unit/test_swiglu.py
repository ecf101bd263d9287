"""The gated MLP's ``silu(gate) * up`` (kernels/swiglu.py) and its Triton twin (kernels/swiglu_triton.py, under
TRITON_INTERPRET=1 by conftest; compiled for sm_90 without a GPU).

Claims tested: the reference is autograd over transformers' two ops bit for bit; the twin is within one rounding of
it in both directions (its exponential is not torch's); only the gradients asked for are computed; and the compiled
kernels divide with IEEE rounding and contract no multiply-add.
"""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels.swiglu import swiglu_backward_reference, swiglu_forward_reference
from qlora_pipeline.kernels.swiglu_triton import swiglu_backward_triton, swiglu_forward_triton
from tests.ptx import probe_counts

BF16, FP32 = torch.bfloat16, torch.float32


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(shape, generator=gen) * 3).to(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_the_reference_is_autograd_over_the_two_ops(dtype: torch.dtype) -> None:
    gate, up, grad = _inputs((7, 96), dtype, 0)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = torch.nn.functional.silu(g) * u
    y.backward(grad)
    assert torch.equal(swiglu_forward_reference(gate, up), y)
    grad_gate, grad_up = swiglu_backward_reference(gate, up, grad)
    assert torch.equal(grad_gate, g.grad) and torch.equal(grad_up, u.grad)
    assert swiglu_backward_reference(gate, up, grad, need_gate=False)[0] is None
    assert swiglu_backward_reference(gate, up, grad, need_up=False)[1] is None


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    scale = torch.exp2(torch.floor(torch.log2(b.double().abs().clamp_min(1e-30))))
    return (a.double() - b.double()).abs() / (scale * 2.0**-7)


@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(37, 1536), (3, 5, 101)], ids=["smollm2-mlp", "ragged"])
def test_the_twin_is_within_one_rounding_of_the_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """bf16: at most one unit in the last place and almost every element the same bits (only an exponential that
    lands on the other side of a rounding boundary differs). fp32: within 4 units in the last place of the
    tensor's largest value (silu_backward's ``1 + g(1 - sigmoid)`` cancels near g = -1.28, so a bound relative to
    each element would measure the cancellation, not the kernel)."""
    gate, up, grad = _inputs(shape, dtype, 1)
    ref = (swiglu_forward_reference(gate, up), *swiglu_backward_reference(gate, up, grad))
    got = (swiglu_forward_triton(gate, up), *swiglu_backward_triton(gate, up, grad))
    for r, t in zip(ref, got, strict=True):
        assert t.shape == r.shape and t.dtype == r.dtype
        if dtype == BF16:
            assert _ulps_bf16(t, r).max() <= 1 and (t == r).double().mean() >= 0.99
        else:
            assert ((t.double() - r.double()).abs() <= 4 * r.double().abs().max() * 2.0**-23).all()


_PTX_PROBE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels import swiglu_triton as st
ptr = {0: "*fp32", 1: "*i16"}  # bf16 travels as int16 bits
for name, kernel, ptrs in (("forward", st._swiglu_forward_kernel, ("gate_ptr", "up_ptr", "y_ptr")),
                           ("backward", st._swiglu_backward_kernel,
                            ("gate_ptr", "up_ptr", "grad_ptr", "grad_gate_ptr", "grad_up_ptr"))):
    for kind in (0, 1):
        for fusion in (False, True):
            sig = {**{p: ptr[kind] for p in ptrs}, "n": "i32", "KIND_X": "constexpr", "BLOCK": "constexpr"}
            const = {"KIND_X": kind, "BLOCK": 1024}
            src = ASTSource(fn=kernel, signature=sig, constexprs={(list(sig).index(n),): v for n, v in const.items()})
            options = {"enable_fp_fusion": fusion, "num_warps": 4}
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            count = lambda pattern: len(re.findall(pattern, ptx))
            print(f"{name}-{kind}", fusion, count(r"\\bfma\\.rn\\.f32"), count(r"\\bdiv\\.rn\\.f32"),
                  count(r"\\bdiv\\.(approx|full)\\.f32"))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above could run the compiled kernel")
def test_the_kernels_compile_for_sm_90_with_ieee_division_and_no_contraction() -> None:
    """Both kernels compile to sm_90 PTX for fp32 and bf16 (no interpreter): with the launch's
    ``enable_fp_fusion=False`` no multiply-add is contracted and every division is IEEE-rounded."""
    counts = probe_counts(_PTX_PROBE, timeout_s=300)
    assert len(counts) == 8, counts
    for kernel in ("forward-0", "forward-1", "backward-0", "backward-1"):
        fma_off, div_rn, approx = counts[(kernel, "False")]
        assert fma_off == 0 and div_rn >= 1 and approx == 0, (kernel, counts)
    assert counts[("backward-0", "True")][0] > 0, "the option matters: Triton would contract silu_backward's terms"
