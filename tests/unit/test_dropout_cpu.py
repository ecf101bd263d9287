"""The compiled CPU dropout kernels (kernels/dropout_native.c through kernels/dropout_cpu.py, built and probed by
stages/contract/cpu_kernels.py) against their torch reference (kernels/dropout.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qlora_pipeline.kernels import cpu_native, dropout_cpu
from qlora_pipeline.kernels.dropout import FastDropout, SeededMask, reference_keep_mask
from qlora_pipeline.stages.contract import cpu_kernels
from tests.compiled_kernels import require_compiled
from tests.lora_step import STEP_RESULTS, lora_dropout_step

SHAPES = [(1,), (3,), (4,), (4099,), (8192,), (8193,), (2 * 8192 + 7,), (37, 576), (3, 5, 1536)]
SEEDS = [0, -1, 12345, -(2**63), 2**63 - 1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cc = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def compiled() -> None:
    """The kernels in use in this process, as training puts them (built and probed once per machine)."""
    require_compiled(dropout_cpu.compiled_in_use)


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's kernels taken out for one test (put back after it)."""
    monkeypatch.setattr(dropout_cpu, "_library", None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """One integer an element: the element's bit pattern."""
    return t.reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [1, 3277, 32768, 58982, 65535])
def test_compiled_masks_are_the_reference_bit_for_bit(dtype: torch.dtype, threshold: int) -> None:
    """Every size (under one word, within one block, across blocks, not a whole word), seed and threshold: the mask
    is the reference's bit for bit; a tensor masked by the kernels (alone, or beside a gradient from the same lanes)
    equals the tensor times the reference's mask, and its dropped elements are +0.0."""
    for shape in SHAPES:
        for seed in SEEDS:
            size = torch.Size(shape)
            want = reference_keep_mask(seed, threshold, size, dtype)
            got = dropout_cpu.keep_mask(seed, threshold, size, dtype)
            assert got is not None, "the compiled kernels did not run"
            assert got.dtype == dtype and got.shape == size and torch.equal(_bits(got), _bits(want)), (shape, seed)
            x, grad = torch.randn(size).to(dtype), torch.randn(size).to(dtype)
            xk = dropout_cpu.masked(seed, threshold, x)
            assert xk is not None and torch.equal(xk, x * want)
            dropped = _bits(xk)[want.reshape(-1) == 0]
            assert torch.equal(dropped, torch.zeros_like(dropped)), "dropped elements are +0.0"
            grad_k = grad.clone()
            xk2 = dropout_cpu.masked_pair_(seed, threshold, x, grad_k)
            assert xk2 is not None and torch.equal(_bits(xk2), _bits(xk)) and torch.equal(grad_k, grad * want)


@pytest.mark.usefixtures("compiled")
def test_lora_training_is_the_same_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA projection with dropout (the training path: one autograd node, masks held as seeds) gives the same
    output and the same gradients of x, A and B with the compiled kernels as with ``QLORA_CPU_KERNELS=off``; and
    using the kernels leaves torch's random stream where the reference leaves it (the next draw is the same)."""
    results = {}
    for switch in ("on", "off"):
        monkeypatch.setenv(cpu_native.SWITCH_VAR, switch)
        assert dropout_cpu.compiled_in_use() is (switch == "on")
        results[switch] = lora_dropout_step()
    for name, fast, slow in zip(STEP_RESULTS, *results.values(), strict=True):
        assert torch.equal(fast, slow), name
    assert float(results["on"][2].abs().sum()) > 0


@pytest.mark.usefixtures("compiled")
def test_a_tensor_the_kernels_cannot_take_goes_the_reference_way() -> None:
    seeded = SeededMask(-987654321, FastDropout(0.05).threshold)
    x = torch.randn(96, 576)
    assert torch.equal(seeded.apply(x.t().contiguous().t()), seeded.apply(x))  # not contiguous: the multiply
    assert dropout_cpu.keep_mask(3, 3277, torch.Size([10]), torch.float64) is None
    mask = FastDropout(0.5).mask_from_seed(3, torch.Size([1000]), torch.float64)
    assert mask.dtype == torch.float64 and torch.equal(mask, reference_keep_mask(3, 32768, mask.shape, mask.dtype))
    with pytest.raises(ValueError, match="is not x's"):
        dropout_cpu.masked_pair_(3, 3277, torch.zeros(4), torch.zeros(5))


@pytest.mark.usefixtures("compiled")
def test_checking_the_library_does_not_move_torchs_random_stream(tmp_path: Path) -> None:
    verdict, library = cpu_kernels.prepare()
    assert verdict.ok and library is not None, verdict.reason
    state = torch.get_rng_state()
    assert dropout_cpu.use_library(library) is None
    assert torch.equal(torch.get_rng_state(), state)


def _build_fake(tmp_path: Path, body: str) -> Path:
    """A library with the kernels' symbols and `body` as every function's body."""
    source = tmp_path / "fake.c"
    names = [f"qlora_{what}_{w}" for what in ("keep_bits", "masked_bits", "masked_pair_bits") for w in ("32", "16")]
    source.write_text("".join(f"void {name}(void) {{ {body} }}\n" for name in names))
    library = tmp_path / "libfake.so"
    subprocess.run([cpu_kernels.compiler(), "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


@needs_cc
@pytest.mark.usefixtures("no_kernels")
def test_a_library_whose_masks_differ_is_not_used(tmp_path: Path) -> None:
    """A library that writes nothing (so not the reference's masks) fails the check in this process and in the
    probe's child; the reference makes the masks."""
    library = _build_fake(tmp_path, "")
    problem = dropout_cpu.use_library(library)
    assert problem is not None and "differ from the reference" in problem
    assert not dropout_cpu.compiled_in_use() and dropout_cpu.masked(1, 3277, torch.ones(10)) is None
    verdict = cpu_kernels.probe(library)
    assert not verdict.ok and "differ from the reference" in verdict.reason
    x = torch.randn(1000)
    assert torch.equal(SeededMask(9, 3277).apply(x), x * reference_keep_mask(9, 3277, x.shape, x.dtype))


@needs_cc
@pytest.mark.usefixtures("no_kernels")
def test_a_library_that_crashes_dies_in_the_probe_not_here(tmp_path: Path) -> None:
    """A library whose kernels segfault kills only the probe's child: the verdict says so and nothing is loaded."""
    library = _build_fake(tmp_path, "*(volatile int *)0 = 1;")
    verdict = cpu_kernels.probe(library)
    assert not verdict.ok and "died of SIGSEGV" in verdict.reason
    assert not dropout_cpu.compiled_in_use()


@pytest.mark.usefixtures("no_kernels")
def test_no_compiler_leaves_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    line = cpu_kernels.enable()
    assert line.startswith("CPU dropout masks and 8-bit AdamW: torch reference") and "no C compiler" in line
    assert not dropout_cpu.compiled_in_use()


@needs_cc
@pytest.mark.usefixtures("no_kernels")
def test_a_failed_build_is_said_and_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A compiler that fails: one line naming it, the verdict kept (not rebuilt by the next process), the reference."""
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    line = cpu_kernels.enable()
    assert "torch reference" in line and "failed" in line
    assert list(tmp_path.glob("cpu-kernels/*/verdict.json")), "the verdict is kept"
    assert not dropout_cpu.compiled_in_use()


@pytest.mark.usefixtures("no_kernels")
def test_a_file_that_is_not_a_library_is_not_used(tmp_path: Path) -> None:
    bogus = tmp_path / cpu_kernels.LIBRARY_NAME
    bogus.write_text("not a shared library")
    problem = dropout_cpu.use_library(bogus)
    assert problem is not None and problem.startswith("OSError")
    assert not dropout_cpu.compiled_in_use() and dropout_cpu.masked(1, 3277, torch.ones(10)) is None
