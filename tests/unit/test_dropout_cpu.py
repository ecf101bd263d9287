"""The compiled CPU dropout mask (kernels/dropout_cpu.py, kernels/dropout_numba.py) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels import dropout_cpu
from qlora_pipeline.kernels.lora import FastDropout, reference_keep_mask

SHAPES = [(1,), (3,), (4,), (4099,), (8192,), (8193,), (2 * 8192 + 7,), (37, 576), (3, 5, 1536)]
SEEDS = [0, -1, 12345, -(2**63), 2**63 - 1]


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch):
    """The module's per-process choice undone, so a test decides it again (and leaves it as it found it)."""
    monkeypatch.setattr(dropout_cpu, "_checked", False)
    monkeypatch.setattr(dropout_cpu, "_kernel", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [1, 3277, 32768, 58982, 65535])
def test_compiled_mask_is_the_reference_bit_for_bit(dtype: torch.dtype, threshold: int) -> None:
    """Every size (under one word, within one block, across blocks, not a whole word), seed and threshold gives the
    reference's bits; the numba kernel must be the one that ran (it is a dependency: a broken install fails here)."""
    for shape in SHAPES:
        for seed in SEEDS:
            got = dropout_cpu.keep_mask(seed, threshold, torch.Size(shape), dtype, reference_keep_mask)
            assert got is not None, "the compiled kernel did not run"
            want = reference_keep_mask(seed, threshold, torch.Size(shape), dtype)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got.view(-1).view(torch.int16), want.view(-1).view(torch.int16)), (shape, seed)
    assert dropout_cpu.compiled_in_use() is True


def test_fast_dropout_masks_come_from_the_kernel_and_match_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`FastDropout` makes the same masks with the kernel as with ``QLORA_NUMBA=off`` (the reference path), so
    training is the same either way; with 0.05 about 5 % are dropped."""
    d = FastDropout(0.05).train()
    shape = torch.Size([96, 576])
    fast = d.mask_from_seed(-987654321, shape, torch.float32)
    assert dropout_cpu.compiled_in_use() is True
    monkeypatch.setenv(dropout_cpu.SWITCH_VAR, "off")
    assert dropout_cpu.keep_mask(1, 3277, shape, torch.float32, reference_keep_mask) is None
    assert dropout_cpu.compiled_in_use() is False
    slow = d.mask_from_seed(-987654321, shape, torch.float32)
    assert torch.equal(fast, slow)
    assert abs(float((fast == 0).float().mean()) - 0.05) < 0.01


def test_no_kernel_for_other_dtypes() -> None:
    assert dropout_cpu.keep_mask(3, 3277, torch.Size([10]), torch.float64, reference_keep_mask) is None
    d = FastDropout(0.5).train()
    mask = d.mask_from_seed(3, torch.Size([1000]), torch.float64)
    assert mask.dtype == torch.float64
    assert torch.equal(mask, reference_keep_mask(3, d.threshold, mask.shape, mask.dtype))


@pytest.mark.usefixtures("fresh_state")
def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first mask of a process checks the kernel against the reference; a kernel that writes other bits (here:
    every element kept) warns once and the reference makes every mask from then on."""

    def wrong_kernel(seed, lo_minus_1, one, out_bits) -> None:
        out_bits[:] = one

    monkeypatch.setattr(dropout_cpu, "_build", lambda: wrong_kernel)
    with pytest.warns(UserWarning, match=r"dropout masks use the torch reference .*differs from the reference"):
        assert dropout_cpu.keep_mask(5, 3277, torch.Size([100]), torch.float32, reference_keep_mask) is None
    assert dropout_cpu.compiled_in_use() is False
    d = FastDropout(0.05).train()
    mask = d.mask_from_seed(5, torch.Size([50_000]), torch.float32)
    assert torch.equal(mask, reference_keep_mask(5, d.threshold, mask.shape, torch.float32))
    assert float(mask.mean()) < 0.99


@pytest.mark.usefixtures("fresh_state")
def test_a_kernel_that_cannot_be_built_leaves_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_numba():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(dropout_cpu, "_build", no_numba)
    with pytest.warns(UserWarning, match=r"numba kernel is unusable here \(ImportError: No module named 'numba'\)"):
        assert dropout_cpu.keep_mask(5, 3277, torch.Size([100]), torch.bfloat16, reference_keep_mask) is None
    d = FastDropout(0.05).train()
    mask = d.mask_from_seed(9, torch.Size([1000]), torch.bfloat16)
    assert torch.equal(mask, reference_keep_mask(9, d.threshold, mask.shape, torch.bfloat16))
