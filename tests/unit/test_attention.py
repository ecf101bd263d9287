"""The CPU training attention: the three-op path against torch's SDPA (values and gradients), and a model switched
to it scoring exactly what SDPA scores, padded, packed and unmasked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qlora_pipeline.kernels.attention import SHORT_KEYS, short_attention, use_cpu_training_attention
from tests import tiny


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "additive"])
def test_short_attention_matches_sdpa_values_and_gradients(mask_kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 20, 16, generator=g, requires_grad=True)
    k = torch.randn(3, 2, 20, 16, generator=g, requires_grad=True)
    v = torch.randn(3, 2, 20, 16, generator=g, requires_grad=True)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    keep = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    keep[1, ..., 14:] = False
    mask = {"causal": None, "padded": causal & keep, "additive": torch.zeros(3, 1, 20, 20).masked_fill(~causal, -1e9)}
    m = mask[mask_kind]
    ours = short_attention(q, k, v, m, 0.25)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_mask = causal if m is None else m
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_a_switched_model_scores_what_sdpa_scores(arch: str) -> None:
    """Gemma 3's sliding layers (window 8) check that the masks transformers builds reach the three ops."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(arch), attn_implementation="sdpa").float()
    switched = copy.deepcopy(model)
    assert use_cpu_training_attention(switched)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 24))
    padded = torch.ones(3, 24, dtype=torch.long)
    padded[1, 17:] = 0
    packed = torch.tensor([list(range(10)) + list(range(14))] * 3)
    for kwargs in ({}, {"attention_mask": padded}, {"position_ids": packed}):
        a, b = model(input_ids=ids, **kwargs).logits, switched(input_ids=ids, **kwargs).logits
        valid = padded.bool() if "attention_mask" in kwargs else torch.ones(3, 24, dtype=torch.bool)
        torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=1e-4)
    long_ids = torch.randint(3, vocab, (1, SHORT_KEYS + 8))  # past the threshold: torch's SDPA itself
    assert torch.equal(model(input_ids=long_ids).logits, switched(input_ids=long_ids).logits)
