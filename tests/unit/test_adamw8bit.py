"""8-bit blockwise AdamW against bitsandbytes' AdamW8bit (CPU backend) on the same param/grad sequences.

What "within one code step" means here: bnb's CPU quantizer (which we reproduce) can only emit the codes some
of its 65536 bins map to, so the step between two representable states is the gap between neighbouring
*reachable* codes. Single steps from an identical state are compared code-rank by code-rank; free-running
sequences are compared on dequantized values against the largest reachable-code gap times the block absmax,
because after a rare edge flip an element's m legitimately follows its own (decaying) trajectory.
"""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.kernels.optim.adamw import AdamW
from qlora_pipeline.kernels.optim.adamw_math import QuantMaps

bnb = pytest.importorskip("bitsandbytes")

MAPS = QuantMaps.create()
KEYS8 = ("state1", "state2", "absmax1", "absmax2")


def _rank(q: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Position of each code among the codes the quantizer can emit."""
    reach = torch.unique(lut.long())
    pos = torch.full((256,), -1, dtype=torch.long)
    pos[reach] = torch.arange(reach.numel())
    r = pos[q.long()]
    assert (r >= 0).all(), "a state holds a code bnb's CPU quantizer can never produce"
    return r


def _max_gap(code: torch.Tensor, lut: torch.Tensor) -> float:
    c = code[torch.unique(lut.long())]
    return float((c[1:] - c[:-1]).max())


def _dequant(st: dict, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    n = st["state1"].numel()
    a1 = st["absmax1"].repeat_interleave(blocksize)[:n]
    a2 = st["absmax2"].repeat_interleave(blocksize)[:n]
    return MAPS.code1[st["state1"].reshape(-1).long()] * a1, MAPS.code2[st["state2"].reshape(-1).long()] * a2


def _pair(n: int, seed: int, wd: float, lr: float = 1e-3):
    p = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    q = torch.nn.Parameter(p.detach().clone())
    ours = AdamW([p], lr=lr, weight_decay=wd, state_bits=8)
    ref = bnb.optim.AdamW8bit([q], lr=lr, weight_decay=wd)
    return p, q, ours, ref


@pytest.mark.parametrize("n", [10_000, 300_000])
def test_single_steps_from_bnb_state_match_within_one_code_step(n: int) -> None:
    p, q, ours, ref = _pair(n, seed=0, wd=0.01)
    gen = torch.Generator().manual_seed(1)
    same_codes = total = 0
    for step in range(6):
        g = torch.randn(n, generator=gen) * (1 + step % 3)
        if step > 0:  # start ours from bnb's exact state and param, then take one step each
            sd = ours.state_dict()
            sd["state"][0].update({k: ref.state[q][k].clone() for k in KEYS8}, step=ref.state[q]["step"])
            ours.load_state_dict(sd)
            p.data.copy_(q.data)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        st, sb = ours.get_state(p), ref.state[q]
        # params see the same dequantized state; only FMA/sqrt rounding differs
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st["absmax1"], sb["absmax1"], rtol=5e-7, atol=0)  # a few ulp: FMA vs two roundings
        torch.testing.assert_close(st["absmax2"], sb["absmax2"], rtol=5e-7, atol=0)  # a few ulp: FMA vs two roundings
        for key, lut in (("state1", MAPS.lut1), ("state2", MAPS.lut2)):
            assert (_rank(st[key], lut) - _rank(sb[key], lut)).abs().max() <= 1
            same_codes += int((st[key] == sb[key]).sum())
            total += st[key].numel()
    assert same_codes / total > 0.999


@pytest.mark.parametrize("n", [10_000, 300_000])
def test_free_running_sequence_stays_within_one_code_step_of_bnb(n: int) -> None:
    lr = 1e-3
    p, q, ours, ref = _pair(n, seed=2, wd=0.0, lr=lr)
    gen = torch.Generator().manual_seed(3)
    gap1, gap2 = _max_gap(MAPS.code1, MAPS.lut1), _max_gap(MAPS.code2, MAPS.lut2)
    for step in range(12):
        g = torch.randn(n, generator=gen) * (1 + step % 3)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        st, sb = ours.get_state(p), ref.state[q]
        m, v = _dequant(st)
        mb, vb = _dequant(sb)
        a1 = torch.maximum(st["absmax1"], sb["absmax1"]).repeat_interleave(256)[:n]
        a2 = torch.maximum(st["absmax2"], sb["absmax2"]).repeat_interleave(256)[:n]
        assert ((m - mb).abs() <= gap1 * a1 * (1 + 1e-6)).all()
        assert ((v - vb).abs() <= gap2 * a2 * (1 + 1e-6)).all()
        assert (st["state1"] == sb["state1"]).float().mean() > 0.999
        assert (st["state2"] == sb["state2"]).float().mean() > 0.999
    d = (p - q).abs()
    assert (d <= 1e-6).float().mean() > 0.9999
    assert d.max() < 0.25 * lr  # the few diverged elements differ by a fraction of one step's update


def test_params_below_min_8bit_size_keep_fp32_state_and_match_torch() -> None:
    small = torch.nn.Parameter(torch.randn(4095))
    big = torch.nn.Parameter(torch.randn(4096))
    small_ref = torch.nn.Parameter(small.detach().clone())
    opt = AdamW([small, big], lr=1e-2, weight_decay=0.1, state_bits=8)
    ref = torch.optim.AdamW([small_ref], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(5):
        g = torch.randn(4095)
        small.grad, small_ref.grad, big.grad = g.clone(), g.clone(), torch.randn(4096)
        opt.step()
        ref.step()
    s, b = opt.get_state(small), opt.get_state(big)
    assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["exp_avg"].dtype == torch.float32
    assert set(b) == {"step", *KEYS8} and b["state1"].dtype == torch.uint8
    assert b["absmax1"].shape == (16,)
    assert torch.equal(small, small_ref)


@pytest.mark.parametrize("n", [4095, 4096])
def test_default_min_8bit_size_matches_bnb(n: int) -> None:
    """bnb AdamW8bit keeps 32-bit state for params under 4096 elements; ours by default too, at the same edge."""
    p, q = torch.nn.Parameter(torch.randn(n)), torch.nn.Parameter(torch.randn(n))
    ours, ref = AdamW([p], state_bits=8), bnb.optim.AdamW8bit([q])
    p.grad, q.grad = torch.randn(n), torch.randn(n)
    ours.step()
    ref.step()
    ours_8bit = "state1" in ours.get_state(p) and ours.get_state(p)["state1"].dtype == torch.uint8
    assert ours_8bit is (ref.state[q]["state1"].dtype == torch.uint8) is (n >= 4096)


def test_min_8bit_size_is_configurable() -> None:
    small, big = torch.nn.Parameter(torch.randn(999)), torch.nn.Parameter(torch.randn(1000))
    opt = AdamW([small, big], state_bits=8, min_8bit_size=1000)
    small.grad, big.grad = torch.randn(999), torch.randn(1000)
    opt.step()
    assert "exp_avg" in opt.get_state(small) and opt.get_state(big)["state1"].dtype == torch.uint8


def test_nonfinite_gradients_behave_like_bnb_cpu() -> None:
    n = 4096
    p, q, ours, ref = _pair(n, seed=4, wd=0.0, lr=1e-2)
    gen = torch.Generator().manual_seed(5)

    def step(g: torch.Tensor) -> None:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()

    for _ in range(3):
        step(torch.randn(n, generator=gen))
    g = torch.randn(n, generator=gen)
    g[3], g[300], g[600] = float("nan"), float("inf"), float("-inf")
    step(g)
    st, sb = ours.get_state(p), ref.state[q]
    # the offending elements' params become NaN, nothing else does
    assert torch.nonzero(torch.isnan(p)).flatten().tolist() == [3, 300, 600]
    assert torch.equal(torch.isnan(p), torch.isnan(q))
    # NaN -> code 0; an Inf makes its block's absmax Inf (blocks 1 and 2); absmax ignores the NaN (block 0)
    assert st["state1"][3] == st["state2"][3] == 0 and st["state1"][300] == 0
    assert torch.isinf(st["absmax1"]).nonzero().flatten().tolist() == [1, 2]
    assert torch.equal(torch.isinf(st["absmax2"]), torch.isinf(sb["absmax2"]))
    assert torch.isfinite(st["absmax1"][0])
    for k in ("state1", "state2"):
        assert (
            _rank(st[k], MAPS.lut1 if k == "state1" else MAPS.lut2)
            - _rank(sb[k], MAPS.lut1 if k == "state1" else MAPS.lut2)
        ).abs().max() <= 1
    # next (finite) step: the Inf-poisoned blocks turn their params NaN, in both implementations
    step(torch.randn(n, generator=gen))
    assert torch.equal(torch.isnan(p), torch.isnan(q))
    assert int(torch.isnan(p).sum()) == 1 + 2 * 256
    finite = ~torch.isnan(q)
    torch.testing.assert_close(p[finite], q[finite], rtol=0, atol=1e-6)


def test_per_group_state_bits_and_bf16_params() -> None:
    a = torch.nn.Parameter(torch.randn(8192, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(8192))
    opt = AdamW([{"params": [a], "state_bits": 8}, {"params": [b]}], lr=1e-3)
    for _ in range(3):
        a.grad, b.grad = torch.randn(8192, dtype=torch.bfloat16), torch.randn(8192)
        opt.step()
    assert a.dtype == torch.bfloat16
    assert "state1" in opt.get_state(a) and "exp_avg" in opt.get_state(b)
    m, v = opt.dequantized_state(a)
    assert m.shape == (8192,) and (v >= 0).all()


def test_bf16_param_step_is_the_fp32_step_rounded_once() -> None:
    """With 8-bit state, a bf16 parameter's update is computed in fp32 from the upcast param and grad and
    rounded to bf16 once: an fp32 copy stepped with the same grads and re-rounded after every step must match it
    bit for bit, and both must hold the same 8-bit state."""
    gen = torch.Generator().manual_seed(7)
    a = torch.nn.Parameter(torch.randn(8192, generator=gen).bfloat16())
    c = torch.nn.Parameter(a.detach().float())
    opt_a = AdamW([a], lr=1e-2, weight_decay=0.1, state_bits=8)
    opt_c = AdamW([c], lr=1e-2, weight_decay=0.1, state_bits=8)
    start = a.detach().clone()
    for _ in range(4):
        g = torch.randn(8192, generator=gen).bfloat16()
        a.grad, c.grad = g, g.float()
        opt_a.step()
        opt_c.step()
        c.data = c.data.bfloat16().float()
        assert torch.equal(a.detach().view(torch.int16), c.detach().bfloat16().view(torch.int16))
        sa, sc = opt_a.get_state(a), opt_c.get_state(c)
        assert all(torch.equal(sa[k], sc[k]) for k in KEYS8)
    assert not torch.equal(a.detach(), start), "the parameter moved"
