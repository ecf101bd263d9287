"""32-bit AdamW: bit-identical to torch.optim.AdamW (single-tensor path), close to bnb's AdamW32bit."""

from __future__ import annotations

import io

import pytest
import torch

from qlora_pipeline.kernels.optim.adamw import AdamW

SHAPES = [(7,), (64, 33), (3, 5, 7), (5000,)]


def _params(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _clone(ps: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _grads(ps: list[torch.Tensor], gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=gen) * scale for p in ps]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bit_identical_to_torch_adamw_over_50_steps(weight_decay: float) -> None:
    ours_p = _params(0)
    ref_p = _clone(ours_p)
    ours = AdamW(ours_p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        for p, q, g in zip(ours_p, ref_p, _grads(ours_p, gen, scale=1 + step % 4), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p, strict=True):
        assert torch.equal(p, q)
        st = ours.get_state(p)
        assert torch.equal(st["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
        assert int(st["step"]) == int(ref.state[q]["step"]) == 50


def test_per_param_step_counters_and_group_hyperparameters() -> None:
    a, b = _params(2)[:2]
    a_ref, b_ref = _clone([a, b])
    ours = AdamW([{"params": [a], "lr": 5e-3}, {"params": [b], "weight_decay": 0.2}], lr=1e-2)
    ref = torch.optim.AdamW(
        [{"params": [a_ref], "lr": 5e-3}, {"params": [b_ref], "weight_decay": 0.2}],
        lr=1e-2,
        weight_decay=0.0,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(3)
    for step in range(12):
        a.grad = torch.randn(a.shape, generator=gen)
        a_ref.grad = a.grad.clone()
        if step % 3 == 0:  # b only gets a gradient every third step: its counter must lag
            b.grad = torch.randn(b.shape, generator=gen)
            b_ref.grad = b.grad.clone()
        else:
            b.grad = b_ref.grad = None
        ours.step()
        ref.step()
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
    assert int(ours.get_state(a)["step"]) == 12 and int(ours.get_state(b)["step"]) == 4


def test_loads_a_torch_adamw_state_dict_and_continues_identically() -> None:
    ps = _params(4)
    ref_p = _clone(ps)
    ref = torch.optim.AdamW(ref_p, lr=3e-3, weight_decay=0.05, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        for q, g in zip(ref_p, _grads(ref_p, gen), strict=True):
            q.grad = g
        ref.step()
    ours_p = _clone(ref_p)
    ours = AdamW(ours_p, lr=1.0)  # hyperparameters come from the state dict
    ours.load_state_dict(ref.state_dict())
    assert ours.param_groups[0]["lr"] == 3e-3
    for _ in range(5):
        for p, q, g in zip(ours_p, ref_p, _grads(ref_p, gen), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_p, ref_p, strict=True))


def test_state_dict_round_trip_is_bit_identical() -> None:
    ps = _params(6)
    opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for p, g in zip(ps, _grads(ps, gen), strict=True):
            p.grad = g
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    ps2 = _clone(ps)
    opt2 = AdamW(ps2)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for _ in range(4):
        for p, q, g in zip(ps, ps2, _grads(ps, gen), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, ps2, strict=True))


def test_bf16_params_keep_fp32_state() -> None:
    p = torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16))
    master = torch.nn.Parameter(p.detach().float())
    opt = AdamW([p], lr=1e-2)
    ref = torch.optim.AdamW([master], lr=1e-2, weight_decay=0.0, foreach=False)
    g = torch.randn(300)
    p.grad, master.grad = g.bfloat16(), g.bfloat16().float()
    opt.step()
    ref.step()
    # one step from a bf16-exact start: fp32 math, one rounding to bf16 at the end
    assert p.dtype == torch.bfloat16
    assert torch.equal(p, master.detach().bfloat16())
    assert opt.get_state(p)["exp_avg"].dtype == torch.float32


def test_close_to_bnb_adamw32bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    for wd in (0.0, 0.1):
        p = torch.nn.Parameter(torch.randn(64, 129, generator=torch.Generator().manual_seed(8)))
        q = torch.nn.Parameter(p.detach().clone())
        ours = AdamW([p], lr=1e-2, weight_decay=wd)
        ref = bnb.optim.AdamW32bit([q], lr=1e-2, weight_decay=wd)
        gen = torch.Generator().manual_seed(9)
        for _ in range(50):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        st, sb = ours.get_state(p), ref.state[q]
        # bnb computes m as m*b1 + (1-b1)*g (FMA) and folds eps*sqrt(1-b2^t) into the denominator; we use
        # torch's lerp/addcdiv order. Same math, fp32 rounding apart.
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6)
        torch.testing.assert_close(st["exp_avg"], sb["state1"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["exp_avg_sq"], sb["state2"], rtol=1e-6, atol=0)


def test_rejects_bad_arguments() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="state_bits"):
        AdamW(p, state_bits=4)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="blocksize"):
        AdamW(p, blocksize=100)
    with pytest.raises(TypeError, match="PagingConfig"):
        AdamW(p, paging={"budget_bytes": 1})
    opt = AdamW(p)
    p[0].grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    amsgrad = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(amsgrad.state_dict())
