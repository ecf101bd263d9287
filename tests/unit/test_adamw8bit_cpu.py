"""The compiled 8-bit AdamW step (kernels/optim/adamw8bit_native.c through kernels/optim/adamw8bit_cpu.py, built and
probed by stages/contract/cpu_kernels.py) against its torch reference (adamw_math.adamw8bit_update_reference)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from qlora_pipeline.kernels import cpu_native
from qlora_pipeline.kernels.dynamic_map import requantize_blockwise
from qlora_pipeline.kernels.optim import adamw8bit_cpu
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars
from qlora_pipeline.kernels.optim.adamw import AdamW
from qlora_pipeline.kernels.optim.adamw_math import QuantMaps, State8bit, adamw8bit_update_reference
from qlora_pipeline.stages.contract import cpu_kernels
from tests.compiled_kernels import require_compiled

MAPS = QuantMaps.create()
TABLES = (MAPS.code1, MAPS.code2, MAPS.lut1, MAPS.lut2)


@pytest.fixture(scope="module")
def compiled() -> None:
    """The kernels in use in this process, as training puts them (built and probed once per machine)."""
    require_compiled(adamw8bit_cpu.compiled_in_use)


def _state(n: int, blocksize: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> State8bit:
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 0.1).to(dtype)
    m = torch.randn(n, generator=gen) * 1e-2
    m[: min(n, blocksize)] = 0.0  # the first block's m all zero: absmax 0, codes 0
    v = torch.rand(n, generator=gen) ** 3 * 1e-3
    (q1, a1), (q2, a2) = requantize_blockwise(m, MAPS.lut1, blocksize), requantize_blockwise(v, MAPS.lut2, blocksize)
    return State8bit(p, g, q1, q2, a1, a2)


def _fields(st: State8bit) -> list[torch.Tensor]:
    return [st.p, st.g, st.q1, st.q2, st.absmax1, st.absmax2]


def _clone(st: State8bit) -> State8bit:
    return State8bit(*(t.clone() for t in _fields(st)))


def _assert_same_bits(got: State8bit, want: State8bit) -> None:
    for name, a, b in zip(("p", "g", "q1", "q2", "absmax1", "absmax2"), _fields(got), _fields(want), strict=True):
        if a.dtype == torch.float32:
            nan = torch.isnan(b)
            assert torch.equal(torch.isnan(a), nan), name
            assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32)), name
        else:
            assert torch.equal(a, b), name


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_many_tensors_in_one_call_are_the_reference_bit_for_bit(blocksize: int, weight_decay: float) -> None:
    """Ragged sizes (a lone element, tails shorter than a vector), NaN, Inf and huge gradients, several steps."""
    gen = torch.Generator().manual_seed(blocksize)
    sizes = [1, 7, blocksize, blocksize + 1, 3 * blocksize + 13, 20_000]
    want = [_state(n, blocksize, gen) for n in sizes]
    want[-1].g[[5, 900, 17_000]] = torch.tensor([float("nan"), float("inf"), -3e38])
    got, before = [_clone(st) for st in want], [_clone(st) for st in want]
    for step in range(1, 4):
        s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, weight_decay, step)
        for st in want:
            adamw8bit_update_reference(*_fields(st), *TABLES, s, blocksize)
        assert adamw8bit_cpu.update_many(got, MAPS, s, blocksize)
    for g, w in zip(got, want, strict=True):
        _assert_same_bits(g, w)
    moved = [not torch.equal(g.q1, b.q1) and not torch.equal(g.q2, b.q2) for g, b in zip(got, before, strict=True)]
    assert moved[-3:] == [True] * 3, "the codes of m and v moved"


@pytest.mark.usefixtures("compiled")
def test_a_lone_large_tensor_is_the_reference_bit_for_bit() -> None:
    """One tensor of many blocks: the kernel shares its blocks among threads instead of the tensors."""
    gen = torch.Generator().manual_seed(1)
    want = _state(300_001, 256, gen)
    got = _clone(want)
    s = AdamScalars.make(2e-4, (0.9, 0.95), 1e-6, 0.01, 10)
    adamw8bit_update_reference(*_fields(want), *TABLES, s, 256)
    assert adamw8bit_cpu.update_many([got], MAPS, s, 256)
    _assert_same_bits(got, want)


@pytest.mark.usefixtures("compiled")
def test_training_is_the_same_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our AdamW with 8-bit state over many small tensors (the LoRA case), five steps: the same parameters and state
    with the compiled kernel as with ``QLORA_CPU_KERNELS=off``."""
    results, calls = {}, []
    run = adamw8bit_cpu._run
    monkeypatch.setattr(adamw8bit_cpu, "_run", lambda *a: calls.append(len(a[1])) or run(*a))
    for switch in ("on", "off"):
        monkeypatch.setenv(cpu_native.SWITCH_VAR, switch)
        assert adamw8bit_cpu.compiled_in_use() is (switch == "on")
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (5000, 4096, 9216, 24_576)]
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, state_bits=8)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results[switch] = [p.detach().clone() for p in params]
    assert calls == [4] * 5, "with the kernel on, each step updated the four tensors in one call"
    for fast, slow in zip(*results.values(), strict=True):
        assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


@pytest.mark.usefixtures("compiled")
def test_what_the_kernel_does_not_take_goes_the_reference_way() -> None:
    gen = torch.Generator().manual_seed(2)
    s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    assert not adamw8bit_cpu.update_many([_state(100, 256, gen, torch.bfloat16)], MAPS, s, 256)  # bf16 params
    assert not adamw8bit_cpu.update_many([_state(10_000, 8192, gen)], MAPS, s, 8192)  # blocks over 4,096
    st = _state(100, 64, gen)
    strided = State8bit(torch.randn(200)[::2], *_fields(st)[1:])
    assert not adamw8bit_cpu.update_many([strided], MAPS, s, 64)


def test_a_library_whose_update_differs_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library with the kernel's symbol that writes nothing fails the check in this process; nothing is used."""
    cc = cpu_kernels.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(adamw8bit_cpu, "_library", None)
    source = tmp_path / "fake.c"
    source.write_text("int qlora_adamw8bit_many_f32(void) { return 0; }\n")
    library = tmp_path / "libfake.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    problem = adamw8bit_cpu.use_library(library)
    assert problem is not None and "differs from the reference" in problem
    assert not adamw8bit_cpu.compiled_in_use()
    s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.0, 1)
    assert not adamw8bit_cpu.update_many([_state(100, 64, torch.Generator())], MAPS, s, 64)


@pytest.mark.usefixtures("compiled")
def test_the_memory_plan_counts_the_update_the_step_will_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit state on a CPU whose compiled kernel is in use: no update temporaries planned; switched off (the torch
    reference, 56 bytes an element of a call) or on a GPU (the Triton kernel's laid-out copies): counted."""
    from qlora_pipeline.stages.contract.memory_plan import train_shape_of
    from qlora_pipeline.stages.contract.params import TrainParams
    from tests import tiny

    config = {**tiny.tiny_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]}
    t = TrainParams(optimizer="paged_adamw_8bit", lora_r=8, lora_alpha=16)
    assert cpu_kernels.expected_in_use()
    assert train_shape_of(t, 64, config, "cpu").compiled_update
    assert not train_shape_of(t, 64, config, "cuda").compiled_update
    assert not train_shape_of(TrainParams(optimizer="paged_adamw_32bit"), 64, config, "cpu").compiled_update
    monkeypatch.setenv(cpu_native.SWITCH_VAR, "off")
    assert not cpu_kernels.expected_in_use() and not train_shape_of(t, 64, config, "cpu").compiled_update
