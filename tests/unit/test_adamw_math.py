"""The update over many tensors at once gives the bits of one update per tensor (kernels/optim/adamw_math.py), and
the optimizer really takes them together."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels.dynamic_map import requantize_blockwise
from qlora_pipeline.kernels.optim import adamw_math
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars
from qlora_pipeline.kernels.optim.adamw import AdamW
from qlora_pipeline.kernels.optim.adamw_math import (
    QuantMaps,
    State8bit,
    adamw8bit_update,
    adamw8bit_update_many,
    adamw32_update_many,
)
from qlora_pipeline.kernels.optim.paging import PagingConfig

BS = 256
SIZES = [3000, 256, 17, 6144, 1000]  # ragged tails (3000, 17, 1000), a tensor under one block, whole blocks
MAPS = QuantMaps.create()


def _states(dtype: torch.dtype, seed: int) -> list[State8bit]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 1e-2
        q1, a1 = requantize_blockwise(m, MAPS.lut1, BS)
        q2, a2 = requantize_blockwise(v, MAPS.lut2, BS)
        p = torch.randn(n, generator=gen).to(dtype)
        out.append(State8bit(p, torch.randn(n, generator=gen).to(dtype), q1, q2, a1, a2))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN compares equal to the same NaN)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _copy(states: list[State8bit]) -> list[State8bit]:
    return [State8bit(*(getattr(st, f).clone() for f in State8bit.__dataclass_fields__)) for st in states]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_many_is_bit_identical_to_one_call_per_tensor(dtype: torch.dtype) -> None:
    together = _states(dtype, 0)
    alone = _copy(together)
    together[1].g[5] = float("nan")  # a NaN gradient and an Inf one stay in their own tensor's blocks
    alone[1].g[5] = float("nan")
    together[3].g[300] = float("inf")
    alone[3].g[300] = float("inf")
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, 0.01, step)
        adamw8bit_update_many(together, MAPS, s, BS)
        for st in alone:
            adamw8bit_update(st, MAPS, s, BS)
        for a, b in zip(together, alone, strict=True):
            for f in State8bit.__dataclass_fields__:
                assert torch.equal(_bits(getattr(a, f)), _bits(getattr(b, f))), (f, a.p.numel(), step)
        for a, b in zip(together, alone, strict=True):  # fresh gradients, the same for both
            g = torch.randn(a.g.shape, generator=gen).to(dtype)
            a.g.copy_(g)
            b.g.copy_(g)
    assert any(bool(torch.isnan(st.p).any()) for st in together)  # the NaN gradient did reach its param


def test_32bit_many_is_bit_identical_to_one_call_per_tensor() -> None:
    gen = torch.Generator().manual_seed(2)
    ps = [torch.randn(n, generator=gen) for n in SIZES]
    gs = [torch.randn(n, generator=gen) for n in SIZES]
    ms = [torch.zeros(n) for n in SIZES]
    vs = [torch.zeros(n) for n in SIZES]
    ps1, ms1, vs1 = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]
    for step in range(1, 4):
        adamw32_update_many(ps, gs, ms, vs, 1e-3, (0.9, 0.999), 1e-8, 0.01, step)
        for p, g, m, v in zip(ps1, gs, ms1, vs1, strict=True):
            adamw32_update_many([p], [g], [m], [v], 1e-3, (0.9, 0.999), 1e-8, 0.01, step)
    for a, b in zip(ps + ms + vs, ps1 + ms1 + vs1, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("paging", [None, PagingConfig(None, 8 << 10, True)])
def test_the_optimizer_updates_small_tensors_together(monkeypatch: pytest.MonkeyPatch, paging) -> None:
    """Six 8-bit tensors and two with 32-bit state (under min_8bit_size), interleaved: one 8-bit call and one
    32-bit call a step, and the bits of a budgeted optimizer, which updates one page at a time."""
    calls = {"8bit": 0, "32bit": 0}
    many8, many32 = adamw_math.adamw8bit_update_many, adamw_math.adamw32_update_many

    def count8(states, *args):
        calls["8bit"] += 1
        many8(states, *args)

    def count32(*args):
        calls["32bit"] += 1
        many32(*args)

    monkeypatch.setattr("qlora_pipeline.kernels.optim.adamw.adamw8bit_update_many", count8)
    monkeypatch.setattr("qlora_pipeline.kernels.optim.adamw.adamw32_update_many", count32)
    sizes = [(16, 576), (576, 16), (16, 192), (192, 16), (16, 300), (300, 16), (16, 576), (576, 16)]
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = AdamW(ps, lr=1e-3, weight_decay=0.01, state_bits=8, paging=paging)
    ref = AdamW(ref_ps, lr=1e-3, weight_decay=0.01, state_bits=8, paging=PagingConfig(4 << 10, 4 << 10, True))
    steps = 3
    for _ in range(steps):
        for p, q in zip(ps, ref_ps, strict=True):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        before = dict(calls)
        opt.step()
        assert (calls["8bit"] - before["8bit"], calls["32bit"] - before["32bit"]) == (1, 1)
        ref.step()
    for p, q in zip(ps, ref_ps, strict=True):
        assert torch.equal(p, q)
        sa, sb = opt.get_state(p), ref.get_state(q)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
