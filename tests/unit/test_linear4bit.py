"""Linear4bit: forward/backward numerics, frozen weight, no saved dequantized weight, order independence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qlora_pipeline.kernels import dtypes
from qlora_pipeline.kernels.linear4bit import (
    Linear4bit,
    quantize_model_linears,
    replace_linears_with_4bit,
)
from qlora_pipeline.kernels.nf4 import dequantize_nf4, quantize_nf4


def _layer(bias: bool = True, compute_dtype: torch.dtype = torch.float32, seed: int = 0) -> Linear4bit:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(48, 80, generator=g) * 0.1).bfloat16()
    b = torch.randn(48, generator=g).bfloat16() if bias else None
    return Linear4bit(quantize_nf4(w), bias=b, compute_dtype=compute_dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_match_f_linear(compute_dtype: torch.dtype) -> None:
    layer = _layer(compute_dtype=compute_dtype)
    w = dequantize_nf4(layer.nf4, compute_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 80, generator=g, dtype=compute_dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    gy = torch.randn(3, 5, 48, generator=g, dtype=compute_dtype)

    y = layer(x)
    y_ref = nn.functional.linear(x_ref, w, layer.bias.to(compute_dtype))
    assert y.dtype == compute_dtype
    assert torch.equal(y, y_ref)
    y.backward(gy)
    y_ref.backward(gy)
    tol = {"rtol": 1e-6, "atol": 1e-6} if compute_dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert x.grad.abs().sum() > 0


def test_output_follows_input_dtype() -> None:
    layer = _layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 80)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = nn.functional.linear(x.bfloat16(), dequantize_nf4(layer.nf4, torch.bfloat16), layer.bias).float()
    assert torch.equal(y, ref)


def test_weight_is_frozen_buffers_only() -> None:
    layer = _layer()
    assert list(layer.parameters()) == []
    for name in ("packed", "absmax", "nested_absmax", "nested_code", "bias"):
        assert not getattr(layer, name).requires_grad
    x = torch.randn(2, 80, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert all(getattr(layer, n).grad is None for n in ("packed", "absmax", "bias"))


def test_nothing_dequantized_is_saved_for_backward() -> None:
    layer = _layer()
    x = torch.randn(16, 80, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []  # not even x: the weight grad is never computed
    node = y.grad_fn
    reachable = [v for v in vars(node).values() if isinstance(v, torch.Tensor)]
    assert node.weight.cached is None  # no resident copy for this layer
    nf4 = node.weight.nf4
    reachable += [nf4.packed, nf4.absmax, nf4.nested_absmax, nf4.nested_code]
    assert all(t.dtype == torch.uint8 or t.numel() <= 256 for t in reachable)
    assert sum(t.numel() * t.element_size() for t in reachable) < 48 * 80  # < 1 byte per weight
    assert nf4.packed.data_ptr() == layer.packed.data_ptr()  # a reference, not a copy


def test_eval_then_train_gives_identical_gradients() -> None:
    x = torch.randn(6, 80)
    fresh = _layer()
    xa = x.clone().requires_grad_(True)
    fresh.train()
    fresh(xa).square().sum().backward()

    used = _layer()
    used.eval()
    with torch.no_grad():
        used(x)
    used(x.bfloat16().float())
    used.train()
    xb = x.clone().requires_grad_(True)
    used(xb).square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(fresh.packed, used.packed)


def test_dtype_casts_do_not_touch_quant_state() -> None:
    layer = _layer()
    before = dequantize_nf4(layer.nf4, torch.float32)
    layer.to(torch.float16)
    assert layer.nested_absmax.dtype == torch.float32 and layer.nested_code.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    assert torch.equal(dequantize_nf4(layer.nf4, torch.float32), before)
    layer.to("cpu")
    assert layer.packed.device.type == "cpu"


def test_state_dict_round_trip_in_bnb_layout() -> None:
    src = _layer(seed=3)
    sd = src.state_dict()
    assert list(sd) == [
        "bias",
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ]
    dst = _layer(seed=4)
    assert not torch.equal(dst.packed, src.packed)
    dst.load_state_dict(sd)
    x = torch.randn(2, 80)
    assert torch.equal(dst(x), src(x))
    bad = dict(sd)
    bad["weight.absmax"] = bad["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"weight\.absmax"):
        _layer().load_state_dict(bad)


def test_replace_and_quantize_model_linears() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False)).bfloat16()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y16 = model(x)
    stats = quantize_model_linears(model, target=lambda name: name == "0", compute_dtype=torch.bfloat16)
    assert set(stats) == {"0"} and isinstance(model[0], Linear4bit) and isinstance(model[2], nn.Linear)
    assert 0.07 < stats["0"]["rel_error"] < 0.11
    assert stats["0"]["bytes_before"] == 64 * 128 * 2 and stats["0"]["bytes_after"] == 4096 + 128 + 64 + 4 + 1024 + 4
    rel = (model(x) - y16).float().norm() / y16.float().norm()
    assert 0.01 < rel < 0.2
    with pytest.raises(ValueError, match="shape"):
        replace_linears_with_4bit(model, {"2": quantize_nf4(torch.randn(32, 64))})
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        replace_linears_with_4bit(model, {"1": quantize_nf4(torch.randn(32, 64))})


@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_compute_dtype_follows_the_cpus_bf16(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """bf16 on a GPU and on a CPU with bf16 dot products, fp32 on any other CPU (where bf16 matmuls run ~24x
    slower); a layer without a compute dtype computes in it."""
    monkeypatch.setattr(dtypes, "cpu_multiplies_bf16", lambda: native_bf16)
    cpu_dtype = torch.bfloat16 if native_bf16 else torch.float32
    assert dtypes.default_compute_dtype("cpu") == cpu_dtype
    assert dtypes.default_compute_dtype("cuda") == torch.bfloat16
    assert dtypes.compute_dtype_of("auto", "cpu") == cpu_dtype
    assert dtypes.compute_dtype_of("float16", "cpu") == torch.float16
    layer = _layer(compute_dtype=None)
    x = torch.randn(2, 80)
    ref = nn.functional.linear(x.to(cpu_dtype), dequantize_nf4(layer.nf4, cpu_dtype), layer.bias.to(cpu_dtype))
    assert torch.equal(layer(x), ref.float())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux's /proc/cpuinfo to read the CPU's flags")
def test_cpu_bf16_probe_agrees_with_the_kernels_flags() -> None:
    """torch's probe against the CPU flags Linux reports (x86: avx512_bf16 or amx_bf16; ARM: bf16)."""
    import platform

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = bool(flags & {"avx512_bf16", "amx_bf16"}) if x86 else "bf16" in flags
    assert dtypes.cpu_multiplies_bf16() is expected


def test_cached_weight_computes_exactly_what_the_dequant_does() -> None:
    """The dequantized cache: the same forward and input gradient bit for bit, filled in model order within its
    budget, never saved, dropped by a move or by sharding."""
    from qlora_pipeline.kernels.linear4bit import cache_dequantized_weights, cached_weight_bytes

    model = nn.Sequential(_layer(compute_dtype=torch.bfloat16, seed=0), _layer(compute_dtype=torch.bfloat16, seed=1))
    x = torch.randn(4, 80, requires_grad=True)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x.grad = None
        y = model[0](x) + model[1](x)
        y.float().square().sum().backward()
        assert x.grad is not None
        return y.detach(), x.grad.clone()

    plain = run()
    one_layer = 48 * 80 * 2
    assert cache_dequantized_weights(model, one_layer + 10, torch.bfloat16) == one_layer
    assert model[0].dequantized_cache is not None and model[1].dequantized_cache is None
    assert cache_dequantized_weights(model, 2 * one_layer, torch.bfloat16) == 2 * one_layer
    assert torch.equal(model[1].dequantized_cache, dequantize_nf4(model[1].nf4, torch.bfloat16))
    cached = run()
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[1], plain[1])
    assert not any("cache" in k for k in model.state_dict())
    model[0].store_as_parameters()
    assert model[0].dequantized_cache is None and cached_weight_bytes(model) == one_layer
    model.to("meta")
    assert cached_weight_bytes(model) == 0


def test_the_packed_state_as_parameters_survives_a_parameter_that_requires_grad() -> None:
    """FSDP2 wraps each shard as ``nn.Parameter(shard)`` and sets ``requires_grad`` only afterwards in torch 2.11
    (the GPU node's): held as parameters, every piece of the NF4 state must take that, and the layer must still
    read the same bits and compute the same outputs."""
    layer = _layer(bias=True)
    before = layer.nf4
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(2))
    y_before = layer(x)
    layer.store_as_parameters()
    for name, p in layer.named_parameters():
        assert nn.Parameter(p.detach()).requires_grad, name  # what torch 2.11's fully_shard does first
    after = layer.nf4
    for field in ("packed", "absmax", "nested_absmax", "nested_code"):
        a, b = getattr(before, field), getattr(after, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert torch.equal(layer(x), y_before)
