"""Triton 8-bit AdamW kernel vs the torch reference (TRITON_INTERPRET=1 on CPU, set in conftest).

Claim tested: bit-identical state codes, absmax and parameters; the only exception is the bit pattern of NaN
in bf16 params (torch's vectorized fp32->bf16 cast writes 0xFFFF, c10's scalar cast and ours 0x7FC0), so bf16
params are compared bitwise on non-NaN elements and by NaN position otherwise.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qlora_pipeline.kernels.dynamic_map import quantize_blockwise, requantize_blockwise
from qlora_pipeline.kernels.optim.adam8bit_triton import adamw8bit_update_triton
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars
from qlora_pipeline.kernels.optim.adamw_math import QuantMaps, adamw8bit_update_reference
from tests.ptx import probe_counts

MAPS = QuantMaps.create()
BS = 256


def _state(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 1e-2
    m[: 2 * BS] = 0.0  # first block all zero (absmax 0 path); v keeps values
    q1, a1 = requantize_blockwise(m, MAPS.lut1, BS)
    q2, a2 = requantize_blockwise(v, MAPS.lut2, BS)
    return [q1, q2, a1, a2]


def _run_both(p, g, state, s, rows=None):
    ref = [p.clone(), g.clone(), *(t.clone() for t in state)]
    tri = [p.clone(), g.clone(), *(t.clone() for t in state)]
    maps = (MAPS.code1, MAPS.code2, MAPS.lut1, MAPS.lut2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy under the interpreter: NaN/Inf arithmetic
        adamw8bit_update_reference(*ref, *maps, s, BS)
        adamw8bit_update_triton(*tri, *maps, s, BS, rows=rows)
    return ref, tri


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.bfloat16:
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])
    if a.is_floating_point():
        ints = {torch.float32: torch.int32, torch.float16: torch.int16}[a.dtype]
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_kernel_bit_identical_to_reference(dtype: torch.dtype, weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 40 * BS + 77  # partial last block
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * 0.3).to(dtype)
    g[BS + 5], g[3 * BS], g[3 * BS + 1] = float("nan"), float("inf"), float("-inf")
    s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, weight_decay, step=7)
    ref, tri = _run_both(p, g, _state(n, gen), s)
    for name, a, b in zip(("p", "g", "q1", "q2", "absmax1", "absmax2"), ref, tri, strict=True):
        assert _bits_equal(a, b), name
    assert torch.isnan(ref[0][BS + 5]) and int(ref[2][BS + 5]) == 0  # sanity: the NaN path was exercised


def test_one_program_per_block_gives_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 3 * BS + 10
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    s = AdamScalars.make(2e-4, (0.9, 0.999), 1e-8, 0.0, step=1)
    state = _state(n, gen)
    ref, tri = _run_both(p, g, state, s, rows=1)
    _, tri_batched = _run_both(p, g, state, s, rows=4)
    assert all(_bits_equal(a, b) for a, b in zip(ref, tri, strict=True))
    assert all(_bits_equal(a, b) for a, b in zip(tri, tri_batched, strict=True))


def test_many_steps_stay_identical() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 20 * BS
    p = torch.randn(n, generator=gen)
    zeros = [torch.zeros(n, dtype=torch.uint8)] * 2 + [torch.zeros(n // BS)] * 2
    ref = [p.clone(), None, *(t.clone() for t in zeros)]
    tri = [p.clone(), None, *(t.clone() for t in zeros)]
    maps = (MAPS.code1, MAPS.code2, MAPS.lut1, MAPS.lut2)
    for step in range(1, 9):
        g = torch.randn(n, generator=gen) * step
        s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.01, step)
        adamw8bit_update_reference(ref[0], g, *ref[2:], *maps, s, BS)
        adamw8bit_update_triton(tri[0], g, *tri[2:], *maps, s, BS)
    for i in (0, 2, 3, 4, 5):
        assert _bits_equal(ref[i], tri[i])


def test_requantizer_matches_dynamic_map_and_bnb_bytes() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50_000, generator=gen) * torch.rand(50_000, generator=gen) ** 4
    for code, lut, xs in ((MAPS.code1, MAPS.lut1, x), (MAPS.code2, MAPS.lut2, x.abs())):
        q, a = requantize_blockwise(xs, lut, BS)
        q_dm, a_dm = quantize_blockwise(xs, code, BS)
        assert torch.equal(q, q_dm) and torch.equal(a, a_dm)
        bnb_f = pytest.importorskip("bitsandbytes.functional")
        q_b, st = bnb_f.quantize_blockwise(xs, code=code, blocksize=BS)
        assert torch.equal(q, q_b) and torch.equal(a, st.absmax)


_PTX_PROBE = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels.optim.adam8bit_triton import _adamw8bit_blockwise_kernel as kernel
ptrs = ["p_ptr", "g_ptr", "q1_ptr", "q2_ptr", "absmax1_ptr", "absmax2_ptr", "code1_ptr", "code2_ptr", "lut1_ptr",
        "lut2_ptr"]
kinds = {0: "*fp32", 1: "*i16"}  # bf16 params travel as int16 bits
scalars = ["beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction2_sqrt", "eps", "decay",
           "neg_step_size"]
for p_kind in (0, 1):
    for fusion in (False, True):
        types = {"p_ptr": kinds[p_kind], "g_ptr": kinds[p_kind], "q1_ptr": "*u8", "q2_ptr": "*u8",
                 "absmax1_ptr": "*fp32", "absmax2_ptr": "*fp32", "code1_ptr": "*fp32", "code2_ptr": "*fp32",
                 "lut1_ptr": "*u8", "lut2_ptr": "*u8"}
        sig = {**types, "n_elements": "i32", "n_blocks": "i32", **{s: "fp32" for s in scalars},
               "P_KIND": "constexpr", "G_KIND": "constexpr", "APPLY_DECAY": "constexpr", "BLOCK": "constexpr",
               "ROWS": "constexpr"}
        const = {"P_KIND": p_kind, "G_KIND": p_kind, "APPLY_DECAY": True, "BLOCK": 256, "ROWS": 1}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(list(sig).index(n),): v for n, v in const.items()})
        options = {"enable_fp_fusion": fusion, "num_warps": 2}
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))
        print(p_kind, fusion, count(r"\\bfma\\.rn\\.f32"), count(r"\\bdiv\\.rn\\.f32"), count(r"\\bsqrt\\.rn\\.f32"),
              count(r"\\bdiv\\.(approx|full)\\.f32"), count(r"\\bsqrt\\.approx\\.f32"))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel in the tests above instead")
def test_the_kernel_compiles_for_sm_90_with_ieee_ops_only() -> None:
    """Without a GPU, compile the kernel to sm_90 PTX (no interpreter), fp32 and bf16 params, and check what its
    bit-exactness rests on: with the launch's ``enable_fp_fusion=False`` no multiply-add is contracted into an FMA,
    and every division and square root is the IEEE-rounded one (``div.rn``/``sqrt.rn``, none approximate)."""
    counts = probe_counts(_PTX_PROBE, timeout_s=300)
    assert len(counts) == 4, counts
    for p_kind in ("0", "1"):
        fma_off, div_rn, sqrt_rn, div_approx, sqrt_approx = counts[(p_kind, "False")]
        assert fma_off == 0 and div_rn >= 2 and sqrt_rn >= 1 and div_approx == sqrt_approx == 0, (p_kind, counts)
        assert counts[(p_kind, "True")][0] > 0, "the option matters: Triton would contract m * beta1 + g * (1 - beta1)"
