"""The GPU path's Triton twins (the RMSNorm, the seeded dropout masks, the SwiGLU, the rotary embedding) inside a
real training loop, under TRITON_INTERPRET=1 (conftest): forced onto a CPU, they train a tiny model as the CPU path
trains it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_pipeline.kernels import (
    dropout,
    dropout_triton,
    rmsnorm,
    rmsnorm_triton,
    rope,
    rope_triton,
    slim_activations,
    swiglu,
    swiglu_triton,
)
from qlora_pipeline.kernels.lora import inject_lora
from qlora_pipeline.kernels.rope import fuse_rotary_embedding
from qlora_pipeline.kernels.slim_activations import slim_saved_activations
from tests import tiny
from tests.calls import count_calls


def _train(arch: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch, vocab_size=384)).to(torch.bfloat16)
    model.requires_grad_(False)
    linears = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    inject_lora(model, sorted(linears), r=4, alpha=8, dropout=0.1, compute_dtype=torch.bfloat16)
    slim_saved_activations(model)
    fuse_rotary_embedding(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gemma2"])
def test_the_twins_train_as_the_cpu_path_does(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama, Qwen3 (norms on the head width too: q_norm, k_norm), Phi-3 (fused qkv and gate_up projections) and
    Gemma 2 (its (1 + w) norm keeps the reference: only the masks' twin), LoRA with dropout on every projection:
    three steps with the twins take the CPU path's losses (the masks and the rotations are its bits, the norm and
    the SwiGLU within a rounding), the loss goes down, and each twin ran for every norm, MLP and attention and
    every step (Gemma 2's GELU MLP and Phi-3's fused one and partial rotation keep the reference)."""
    cpu = _train(arch, 3)
    calls = {"norm": 0, "mask": 0, "swiglu": 0, "rope": 0}
    for module, name, key in (
        (rmsnorm_triton, "rmsnorm_forward_triton", "norm"),
        (dropout_triton, "masked_triton", "mask"),
        (swiglu_triton, "swiglu_forward_triton", "swiglu"),
        (rope_triton, "rope_triton", "rope"),
    ):
        count_calls(monkeypatch, module, name, calls, key)
    monkeypatch.setattr(rmsnorm, "_takes_triton", lambda x, w: True)
    monkeypatch.setattr(dropout, "_triton_twin_applies", lambda device: True)
    monkeypatch.setattr(swiglu, "_takes_triton", lambda gate, up: True)
    monkeypatch.setattr(rope, "_takes_triton", lambda x: True)
    twins = _train(arch, 3)
    assert twins == pytest.approx(cpu, rel=1e-3) and cpu[-1] < cpu[0]
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch))
    norms = sum(slim_activations._has_whole_norm_form(type(m)) for m in model.modules())
    assert calls["norm"] == 3 * norms and (norms > 0) == (arch != "gemma2")
    assert calls["mask"] > 0 and calls["mask"] % 3 == 0
    layers = model.config.num_hidden_layers
    assert calls["swiglu"] == (3 * layers if arch in {"llama", "qwen3"} else 0)
    assert calls["rope"] == (3 * 2 * layers if arch != "phi3" else 0)  # q and k in one launch, each direction
