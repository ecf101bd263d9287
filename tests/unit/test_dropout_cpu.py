"""The compiled CPU dropout masks (kernels/dropout_cpu.py, kernels/dropout_numba.py) against their torch reference
(kernels/dropout.py)."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels import dropout_cpu
from qlora_pipeline.kernels.dropout import FastDropout, SeededMask, reference_keep_mask

SHAPES = [(1,), (3,), (4,), (4099,), (8192,), (8193,), (2 * 8192 + 7,), (37, 576), (3, 5, 1536)]
SEEDS = [0, -1, 12345, -(2**63), 2**63 - 1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch):
    """The module's per-process choice undone, so a test decides it again (and leaves it as it found it)."""
    monkeypatch.setattr(dropout_cpu, "_checked", False)
    monkeypatch.setattr(dropout_cpu, "_kernels", None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """One integer an element: the element's bit pattern."""
    return t.reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [1, 3277, 32768, 58982, 65535])
def test_compiled_masks_are_the_reference_bit_for_bit(dtype: torch.dtype, threshold: int) -> None:
    """Every size (under one word, within one block, across blocks, not a whole word), seed and threshold: the mask
    is the reference's bit for bit; a tensor masked by the kernel (alone, or beside a gradient from the same lanes)
    equals the tensor times the reference's mask, and its dropped elements are +0.0. The numba kernels must be the
    ones that ran (numba is a dependency: a broken install fails here)."""
    for shape in SHAPES:
        for seed in SEEDS:
            size = torch.Size(shape)
            want = reference_keep_mask(seed, threshold, size, dtype)
            got = dropout_cpu.keep_mask(seed, threshold, size, dtype)
            assert got is not None, "the compiled kernel did not run"
            assert got.dtype == dtype and got.shape == size and torch.equal(_bits(got), _bits(want)), (shape, seed)
            x, grad = torch.randn(size).to(dtype), torch.randn(size).to(dtype)
            xk = dropout_cpu.masked(seed, threshold, x)
            assert xk is not None and torch.equal(xk, x * want)
            dropped = _bits(xk)[want.reshape(-1) == 0]
            assert torch.equal(dropped, torch.zeros_like(dropped)), "dropped elements are +0.0"
            grad_k = grad.clone()
            xk2 = dropout_cpu.masked_pair_(seed, threshold, x, grad_k)
            assert xk2 is not None and torch.equal(_bits(xk2), _bits(xk)) and torch.equal(grad_k, grad * want)
    assert dropout_cpu.compiled_in_use() is True


def test_seeded_mask_gives_the_same_values_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SeededMask` (what the LoRA branch applies) and `FastDropout.mask_from_seed` give the same values with the
    kernels as with ``QLORA_NUMBA=off`` (the reference path), so training is the same either way; with p = 0.05
    about 5 % are dropped. A tensor the kernels cannot take (not contiguous) goes the reference's way."""
    d = FastDropout(0.05).train()
    seeded = SeededMask(-987654321, d.threshold)
    shape = torch.Size([96, 576])
    x, grad = torch.randn(shape), torch.randn(shape)
    fast = (d.mask_from_seed(-987654321, shape), seeded.apply(x), seeded.apply_pair_(x, g_fast := grad.clone()))
    assert dropout_cpu.compiled_in_use() is True
    assert torch.equal(seeded.apply(x.t().contiguous().t()), fast[1]), "non-contiguous: the reference's multiply"
    monkeypatch.setenv(dropout_cpu.SWITCH_VAR, "off")
    assert dropout_cpu.keep_mask(1, 3277, shape, torch.float32) is None and dropout_cpu.masked(1, 3277, x) is None
    assert dropout_cpu.compiled_in_use() is False
    slow = (d.mask_from_seed(-987654321, shape), seeded.apply(x), seeded.apply_pair_(x, g_slow := grad.clone()))
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_fast, g_slow) and torch.equal(g_fast, grad * fast[0])
    assert abs(float((fast[0] == 0).float().mean()) - 0.05) < 0.01


def test_no_kernel_for_other_dtypes() -> None:
    assert dropout_cpu.keep_mask(3, 3277, torch.Size([10]), torch.float64) is None
    d = FastDropout(0.5).train()
    mask = d.mask_from_seed(3, torch.Size([1000]), torch.float64)
    assert mask.dtype == torch.float64
    assert torch.equal(mask, reference_keep_mask(3, d.threshold, mask.shape, mask.dtype))
    with pytest.raises(ValueError, match="is not x's"):
        dropout_cpu.masked_pair_(3, 3277, torch.zeros(4), torch.zeros(5))


@pytest.mark.usefixtures("fresh_state")
def test_kernels_that_disagree_with_the_reference_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first mask of a process checks the kernels against the reference; kernels that write other bits (here:
    every element kept) warn once and the reference makes every mask from then on."""

    class Wrong:
        @staticmethod
        def keep_bits(seed, lo_minus_1, one, out_bits) -> None:
            out_bits[:] = one

        @staticmethod
        def masked_bits(seed, lo_minus_1, src_bits, dst_bits) -> None:
            dst_bits[:] = src_bits

        @staticmethod
        def masked_pair_bits(seed, lo_minus_1, x_bits, xk_bits, g_bits) -> None:
            xk_bits[:] = x_bits

    monkeypatch.setattr(dropout_cpu, "_build", lambda: Wrong)
    with pytest.warns(UserWarning, match=r"dropout masks use the torch reference .*differs from the reference"):
        assert dropout_cpu.keep_mask(5, 3277, torch.Size([100]), torch.float32) is None
    assert dropout_cpu.compiled_in_use() is False
    d = FastDropout(0.05).train()
    mask = d.mask_from_seed(5, torch.Size([50_000]), torch.float32)
    assert torch.equal(mask, reference_keep_mask(5, d.threshold, mask.shape, torch.float32))
    assert float(mask.mean()) < 0.99


@pytest.mark.usefixtures("fresh_state")
def test_kernels_that_cannot_be_built_leave_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_numba():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(dropout_cpu, "_build", no_numba)
    with pytest.warns(UserWarning, match=r"numba kernels are unusable here \(ImportError: No module named 'numba'\)"):
        assert dropout_cpu.masked(5, 3277, torch.zeros(100, dtype=torch.bfloat16)) is None
    x = torch.randn(1000).to(torch.bfloat16)
    seeded = SeededMask(9, FastDropout(0.05).threshold)
    assert torch.equal(seeded.apply(x), x * reference_keep_mask(9, seeded.threshold, x.shape, torch.bfloat16))
