"""The Triton twin of the seeded dropout masks (kernels/dropout_triton.py) against their torch reference
(kernels/dropout.py), under TRITON_INTERPRET=1 (conftest), and compiled for sm_90 without a GPU."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels import dropout, dropout_triton
from qlora_pipeline.kernels.dropout import reference_keep_mask
from tests.calls import count_calls
from tests.lora_step import STEP_RESULTS, lora_dropout_step
from tests.ptx import probe_counts

SHAPES = [(1,), (3,), (4099,), (2 * 8192 + 7,), (37, 576)]
SEEDS = [0, -1, -(2**63), 2**63 - 1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("threshold", [1, 3277, 65535])
def test_the_twin_is_the_reference_bit_for_bit(dtype: torch.dtype, threshold: int) -> None:
    """Every size (under one word, not a whole word, over one program's block, 2-D), seed (the int64 extremes
    too) and threshold: the mask is the reference's bit for bit; a tensor masked alone or beside a gradient equals
    the tensor times the mask, its dropped elements +0.0, and the gradient is masked in place."""
    for shape in SHAPES:
        for seed in SEEDS:
            size = torch.Size(shape)
            want = reference_keep_mask(seed, threshold, size, dtype)
            got = dropout_triton.keep_mask_triton(seed, threshold, size, dtype, "cpu")
            assert got.dtype == dtype and got.shape == size and torch.equal(_bits(got), _bits(want)), (shape, seed)
            x, grad = torch.randn(size).to(dtype), torch.randn(size).to(dtype)
            xk = dropout_triton.masked_triton(seed, threshold, x)
            assert torch.equal(xk, x * want)
            dropped = _bits(xk)[want.reshape(-1) == 0]
            assert torch.equal(dropped, torch.zeros_like(dropped)), "dropped elements are +0.0"
            grad_k = grad.clone()
            xk2 = dropout_triton.masked_pair_triton(seed, threshold, x, grad_k)
            assert torch.equal(_bits(xk2), _bits(xk)) and torch.equal(grad_k, grad * want)


def test_lora_training_takes_the_twin_where_the_dispatcher_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA projection with dropout (the training path: masks held as seeds) gives the same output and the same
    gradients of x, A and B through the twin (forced here; on CUDA it is the default) as on the CPU's path, and
    draws the same seeds: a GPU run's masks are a CPU run's. Both the forward's and backward's uses went through
    the twin."""
    calls = {"masked_triton": 0, "masked_pair_triton": 0}
    results = {}
    for twin in (False, True):
        if twin:
            monkeypatch.setattr(dropout, "_triton_twin_applies", lambda device: True)
            for name in calls:
                count_calls(monkeypatch, dropout_triton, name, calls, name)
        results[twin] = lora_dropout_step()
    assert calls == {"masked_triton": 1, "masked_pair_triton": 1}
    for name, cpu, twin in zip(STEP_RESULTS, *results.values(), strict=True):
        assert torch.equal(cpu, twin), name
    assert float(results[True][2].abs().sum()) > 0


def test_the_twin_refuses_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="is not x's"):
        dropout_triton.masked_pair_triton(3, 3277, torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="contiguous fp32, bf16 or fp16"):
        dropout_triton.masked_triton(3, 3277, torch.zeros(4, dtype=torch.float64))


_PTX_PROBE = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qlora_pipeline.kernels import dropout_triton as dt
for bits in ("i16", "i32"):
    for mode in (0, 1, 2):
        sig = {"seed": "i64", "lo": "i32", "x_ptr": f"*{bits}", "out_ptr": f"*{bits}", "g_ptr": f"*{bits}",
               "n": "i32", "one": "i32", "MODE": "constexpr", "BLOCK": "constexpr"}
        const = {"MODE": mode, "BLOCK": 1024}
        src = ASTSource(fn=dt._seeded_mask_kernel, signature=sig,
                        constexprs={(list(sig).index(n),): v for n, v in const.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        count = lambda pattern: len(re.findall(pattern, ptx))
        print(bits, mode, count(r"\\bld\\.global"), count(r"\\bst\\.global"), count(r"\\bmul\\.lo\\.[su]64"))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above could run the compiled kernel")
def test_the_kernel_compiles_for_sm_90() -> None:
    """Without a GPU, the kernel compiles to sm_90 PTX for 16- and 32-bit elements in its three modes, and each mode
    moves what it says: the mask reads nothing (its lanes are hashed, not loaded) and writes once; the masked tensor
    reads and writes one tensor; the pair two. splitmix64's multiplies stay 64-bit."""
    counts = probe_counts(_PTX_PROBE, timeout_s=300)
    assert len(counts) == 6, counts
    for bits in ("i16", "i32"):
        (ld0, st0, mul0), (ld1, st1, _), (ld2, st2, _) = (counts[(bits, str(mode))] for mode in (0, 1, 2))
        assert ld0 == 0 and st0 > 0 and mul0 >= 3, (bits, counts)
        assert ld1 == st1 == st0 and ld2 == st2 == 2 * st1, (bits, counts)
