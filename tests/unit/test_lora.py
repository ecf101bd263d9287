"""LoRA layers against hand-computed numbers and against peft 0.21 (the oracle) on a tiny random Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from qlora_pipeline.kernels.dropout import draw_seed
from qlora_pipeline.kernels.lora import (
    LoraLinear,
    count_trainable,
    inject_lora,
    linear_leaf_names,
    lora_modules,
    lora_state_dict,
    merged_weight,
)
from tests import tiny

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads, vocab 384."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config("llama", vocab_size=384)).to(dtype)
    return model.eval()


def input_ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (batch, seq), generator=g)


def randomize_lora(model: nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Non-zero A and B, so the LoRA branch actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def copy_lora_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Same A/B values in peft's layers (its default adapter), matched by module path."""
    peft_layers = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            p = peft_layers[name]
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)


def peft_lora(base: nn.Module, r: int, alpha: float, use_rslora: bool = False) -> nn.Module:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=ALL_PROJ, use_rslora=use_rslora)
    return peft.get_peft_model(base, cfg).eval()


def test_inject_freezes_everything_but_a_b_and_counts_like_peft() -> None:
    model = tiny_llama()
    wrapped = inject_lora(model, ALL_PROJ, r=8, alpha=16, dropout=0.0)
    assert len(wrapped) == 2 * 7
    assert wrapped[0] == "model.layers.0.self_attn.q_proj"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.{ab}" for w in wrapped for ab in ("lora_A", "lora_B")}
    # per layer r*(in+out): q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = r*1024
    assert count_trainable(model) == 2 * 8 * 1024 == 16384
    m = model.get_submodule("model.layers.1.self_attn.k_proj")
    assert isinstance(m, LoraLinear) and (m.lora_A.shape, m.lora_B.shape) == ((8, 64), (32, 8))
    assert m.scaling == 2.0 and m.weight is m.base.weight
    assert not torch.count_nonzero(m.lora_B)

    peft_model = peft_lora(tiny_llama(), r=8, alpha=16)
    assert peft_model.get_nb_trainable_parameters()[0] == count_trainable(model)


def test_zero_b_gives_base_logits_exactly() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    inject_lora(model, ALL_PROJ, r=8, alpha=16, dropout=0.0)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_backward_puts_grads_only_on_a_and_b() -> None:
    model = tiny_llama()
    inject_lora(model, ALL_PROJ, r=4, alpha=8, dropout=0.0)
    model.train()
    ids = input_ids()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name.endswith("lora_A"):
            # B == 0 at init, so dL/dA = s * B.T @ ... is exactly zero: the classic LoRA start.
            assert p.grad is not None and not torch.count_nonzero(p.grad), name
        else:
            assert p.grad is None, name


def test_layer_gradients_match_closed_form() -> None:
    """y = xW.T + s(xA.T)B.T with L = sum(y * g): dL/dB = s g.T (x A.T), dL/dA = s (g B).T x, dL/dx = gW + s gBA."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12, bias=True)
    lora = LoraLinear(lin, r=3, alpha=6, dropout=0.0)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(12, 3))
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 12)
    (lora(x) * g).sum().backward()
    s = 2.0
    a, b, w = lora.lora_A.detach(), lora.lora_B.detach(), lin.weight.detach()
    torch.testing.assert_close(lora.lora_B.grad, s * g.T @ (x.detach() @ a.T))
    torch.testing.assert_close(lora.lora_A.grad, s * (g @ b).T @ x.detach())
    torch.testing.assert_close(x.grad, g @ w + s * g @ b @ a)
    assert lin.weight.grad is None and lin.bias.grad is None


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_peft(use_rslora: bool) -> None:
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject_lora(ours, ALL_PROJ, r=8, alpha=16, dropout=0.0, use_rslora=use_rslora)
    randomize_lora(ours)
    peft_model = peft_lora(copy.deepcopy(base), r=8, alpha=16, use_rslora=use_rslora)
    copy_lora_into_peft(ours, peft_model)
    expected_s = 16 / math.sqrt(8) if use_rslora else 2.0
    assert ours.get_submodule("model.layers.0.mlp.up_proj").scaling == pytest.approx(expected_s)
    ids = input_ids()
    with torch.no_grad():
        got, want, plain = ours(ids).logits, peft_model(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the adapter really contributes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_matches_peft_merge_and_unload(dtype: torch.dtype) -> None:
    base = tiny_llama(dtype=dtype)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    ours = copy.deepcopy(base)
    inject_lora(ours, ALL_PROJ, r=8, alpha=16, dropout=0.0)  # fp32 adapters, like peft's autocast upcast
    randomize_lora(ours)
    peft_model = peft_lora(copy.deepcopy(base), r=8, alpha=16)
    copy_lora_into_peft(ours, peft_model)
    merged = peft_model.merge_and_unload()
    merged_params = dict(merged.named_parameters())
    changed = 0
    for name, lora in lora_modules(ours).items():
        w0 = originals[f"{name}.weight"]
        mine = merged_weight(w0, lora)
        assert mine.dtype == dtype
        assert torch.equal(mine, merged_params[f"{name}.weight"]), name
        changed += int(torch.count_nonzero(mine != w0))
    assert changed > 0.9 * 16384 * 4  # most weights move (bf16 rounding may hide a few tiny updates)


def test_unknown_target_is_one_line_and_leaves_model_untouched() -> None:
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        inject_lora(model, ["q_proj", "qproj"], r=8, alpha=16, dropout=0.0)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        "unknown LoRA target 'qproj'; linear modules in this model: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
    assert not lora_modules(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert linear_leaf_names(model)[0] == "down_proj"
    with pytest.raises(ValueError, match="unknown LoRA target 'embed_tokens'"):
        inject_lora(model, ["embed_tokens"], r=8, alpha=16, dropout=0.0)


def test_inject_twice_is_refused() -> None:
    model = tiny_llama()
    inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject_lora(model, ["q_proj"], r=2, alpha=4, dropout=0.0)


def test_same_seed_same_init_and_kaiming_bound() -> None:
    inits = []
    for seed in (7, 7, 8):
        model = tiny_llama()
        torch.manual_seed(seed)
        inject_lora(model, ALL_PROJ, r=8, alpha=16, dropout=0.0)
        inits.append(lora_state_dict(model))
    assert inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    assert not torch.equal(
        inits[0]["model.layers.0.self_attn.q_proj.lora_A"], inits[2]["model.layers.0.self_attn.q_proj.lora_A"]
    )
    # kaiming_uniform_(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in)); down_proj has in=128.
    a = inits[0]["model.layers.0.mlp.down_proj.lora_A"]
    bound = 1 / math.sqrt(128)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_dropout_only_on_lora_branch() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    lora = LoraLinear(lin, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(16, 4))
    x = torch.randn(6, 32)
    lora.train()
    torch.manual_seed(123)
    y = lora(x)
    torch.manual_seed(123)
    mask_x = lora.dropout(x)  # the same generator state gives the same mask
    assert 0 < float((mask_x == 0).float().mean()) < 1
    torch.testing.assert_close(y, lin(x) + (mask_x @ lora.lora_A.T) @ lora.lora_B.T)
    lora.eval()
    torch.testing.assert_close(lora(x), lin(x) + (x @ lora.lora_A.T) @ lora.lora_B.T)


class FrozenBufferLinear(nn.Module):
    """Stands in for Linear4bit: weight in a buffer, in/out_features attributes, not an nn.Linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.bfloat16) @ self.weight.T).to(x.dtype)


def test_wraps_any_module_with_in_out_features_and_bf16_adapter() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 40).to(torch.bfloat16)
    parent = nn.Sequential()
    parent.add_module("proj", FrozenBufferLinear(w))
    assert inject_lora(parent, ["proj"], r=4, alpha=8, dropout=0.0, adapter_dtype=torch.bfloat16) == ["proj"]
    lora = parent.proj
    assert isinstance(lora, LoraLinear) and lora.adapter_dtype == torch.bfloat16
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(24, 4))
    x = torch.randn(3, 40)
    y = parent(x)
    assert y.dtype == torch.float32  # cast back to x's dtype
    a, b = lora.lora_A.float(), lora.lora_B.float()
    want = x.to(torch.bfloat16).float() @ w.float().T + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(y, want, atol=0.1, rtol=0.02)  # bf16 tolerance
    assert count_trainable(parent) == 4 * (40 + 24)


def test_gradient_checkpointing_gives_same_lora_grads_with_dropout() -> None:
    """Checkpoint recompute replays the same dropout mask (torch restores the RNG), so grads are identical."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_llama()
        torch.manual_seed(5)
        inject_lora(model, ALL_PROJ, r=4, alpha=8, dropout=0.1)
        randomize_lora(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_calls = [0]
        model.get_submodule("model.layers.0.self_attn.q_proj").register_forward_hook(
            lambda *_, c=n_calls: c.__setitem__(0, c[0] + 1)
        )
        ids = input_ids()
        torch.manual_seed(11)
        model(ids, labels=ids, use_cache=False).loss.backward()
        calls.append(n_calls[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # the checkpointed block really ran its forward again in backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
        assert grads[0][k].abs().sum() > 0, k


def test_fast_dropout_rate_scale_gradient_and_replay() -> None:
    from qlora_pipeline.kernels.dropout import FastDropout

    d = FastDropout(0.05).train()
    ones = torch.ones(2_000_003)
    out = d(ones)
    rate = float((out == 0).float().mean())
    assert abs(rate - 3277 / 65536) < 6 * (0.05 * 0.95 / ones.numel()) ** 0.5
    assert abs(float(out.mean()) - 1.0) < 2e-3  # inverted dropout keeps the expectation
    x = torch.randn(64, 48, requires_grad=True)
    torch.manual_seed(7)
    y = d(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * d.scale)
    torch.manual_seed(7)
    assert torch.equal(d(x), y), "same generator state → same mask (activation checkpointing replays it)"
    assert torch.equal(d.eval()(x), x)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        FastDropout(1.0)


def _splitmix64_python(seed: int, i: int) -> int:
    """splitmix64 as published (Steele, Lea, Flood 2014), in Python's unbounded integers."""
    z = (seed + i * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 12345, -(2**63), 2**63 - 1, -7])
def test_splitmix64_words_are_the_published_generator(seed: int) -> None:
    from qlora_pipeline.kernels.dropout import splitmix64

    words = splitmix64(seed, 1000, torch.device("cpu")).tolist()
    assert [w % 2**64 for w in words] == [_splitmix64_python(seed % 2**64, i) for i in range(1000)]


def test_cpu_dropout_lanes_each_drop_at_the_rate() -> None:
    """Each of a word's four 16-bit lanes (the top one included, which torch's random_ cannot fill) drops at p,
    and neighbouring elements are uncorrelated."""
    from qlora_pipeline.kernels.dropout import FastDropout

    d = FastDropout(0.25).train()
    torch.manual_seed(3)
    kept = d.keep_mask(torch.Size([4 * 250_000]), torch.device("cpu"), torch.bfloat16)
    assert kept.dtype == torch.bfloat16 and set(kept.unique().tolist()) == {0.0, 1.0}
    dropped = (1 - kept).view(-1, 4).float()
    sigma = (0.25 * 0.75 / 250_000) ** 0.5
    for lane in range(4):
        assert abs(float(dropped[:, lane].mean()) - 0.25) < 6 * sigma, lane
    both = float((dropped[:, 0] * dropped[:, 1]).mean())
    assert abs(both - 0.25**2) < 6 * (0.0625 * 0.9375 / 250_000) ** 0.5


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mixed_precision_branch_matches_the_op_by_op_math(dropout: float, compute_dtype: torch.dtype) -> None:
    """The training path (bf16 compute, or fp32 on a CPU without bf16; fp32 A/B: one autograd node,
    kernels/lora_fused.py) against the same math written op by op in fp32 from the same mask: output and the
    gradients of x, A and B."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=True).to(compute_dtype)
    lora = LoraLinear(lin, r=4, alpha=8, dropout=dropout, compute_dtype=compute_dtype).train()
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(40, 4))
    x = torch.randn(3, 7, 48).to(compute_dtype).requires_grad_()
    g = torch.randn(3, 7, 40)
    torch.manual_seed(9)
    y = lora(x)
    assert type(y.grad_fn).__name__ == "_LoraBranchAddBackward"
    (y.float() * g).sum().backward()
    torch.manual_seed(9)
    kept = lora.dropout.mask_from_seed(draw_seed(), x.shape, x.dtype) if dropout else None  # forward's draw
    keep = lora.dropout.scale if dropout else 1.0
    assert (kept is None) == (dropout == 0.0) and (kept is None or 0.4 < float(kept.float().mean()) < 1)
    xr = x.detach().float().requires_grad_()
    a = lora.lora_A.detach().clone().requires_grad_()
    b = lora.lora_B.detach().clone().requires_grad_()
    h = xr if kept is None else xr.masked_fill(kept == 0, 0) * keep
    want = lin(x.detach()).float() + 2.0 * (h @ a.T) @ b.T
    (want * g).sum().backward()
    assert y.dtype == compute_dtype and lora.lora_A.grad.dtype == torch.float32
    pairs = [
        (y.float(), want.detach()),
        (x.grad.float(), xr.grad + g @ lin.weight.float()),
        (lora.lora_A.grad, a.grad),
        (lora.lora_B.grad, b.grad),
    ]
    # bf16 operands: each within a few bf16 roundings of the largest value; fp32: within fp32 rounding
    tolerance = 0.02 if compute_dtype == torch.bfloat16 else 1e-5
    for got, ref in pairs:
        assert float((got - ref).abs().max()) <= tolerance * float(ref.abs().max()), (got, ref)
    assert float(a.grad.abs().sum()) > 0 and lin.weight.grad is None


def test_mixed_precision_checkpoint_replay_gives_the_same_grads() -> None:
    """bf16 model, LoRA in bf16 compute: the recomputed block draws the same masks, so grads match exactly."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(dtype=torch.bfloat16)
        torch.manual_seed(5)
        inject_lora(model, ALL_PROJ, r=4, alpha=8, dropout=0.1, compute_dtype=torch.bfloat16)
        randomize_lora(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = input_ids()
        torch.manual_seed(11)
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 28
    for k in grads[0]:
        assert torch.equal(grads[1][k], grads[0][k]), k
        assert grads[0][k].abs().sum() > 0, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.05, 0.25, 0.5])
def test_cpu_keep_mask_is_the_lane_threshold_rule(p: float, dtype: torch.dtype) -> None:
    """The 0/1 mask keeps exactly the elements whose signed 16-bit splitmix64 lane is at or above the threshold
    (the clamp-and-shift that builds it against the plain comparison, the two lanes at the threshold included),
    as 0.0 and 1.0 of the requested dtype (a bit pattern for the 16-bit ones)."""
    from qlora_pipeline.kernels.dropout import FastDropout, splitmix64

    d = FastDropout(p).train()
    n = 4 * 50_001 + 3  # not a whole number of words
    torch.manual_seed(11)
    kept = d.keep_mask(torch.Size([n]), torch.device("cpu"), dtype)
    torch.manual_seed(11)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    lanes = splitmix64(seed, -(-n // 4), torch.device("cpu")).view(torch.int16)[:n]
    t = d.threshold - 32768
    assert kept.dtype == dtype and torch.equal(kept, (lanes >= t).to(dtype))
    assert int(((lanes == t) | (lanes == t - 1)).sum()) > 0, "the two lanes either side of the threshold occur"
