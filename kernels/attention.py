"""Attention for training on a CPU: scores, softmax and weighted sum as three plain ops for short sequences, torch's
fused SDPA kernel for long ones.

Why: torch's CPU flash-attention kernel has a large fixed cost in its backward. Measured on the 2-core AVX512-BF16
dev machine (torch 2.13, bf16 inputs in transformers' transposed layout, 9 query heads over 3 KV heads of 64,
causal mask, forward + backward, ms; the 2,048 column with contiguous inputs):

    batch x keys   8x16   8x51   8x128   4x256   8x256   2x512   1x1024   1x2048
    fused SDPA     2.42   6.10   16.62   17.84   36.09   30.46    60.65   233.75
    three ops      0.79   1.66    7.09   14.51   28.56   20.74    50.91   308.97

so up to :data:`SHORT_KEYS` keys the three ops win (3.7x on chat-length rows), and the fused kernel beyond, where the
score matrix also grows with the square of the length. As transformers' eager attention, the scores are 16-bit and
their softmax fp32, rounded to 16 bits for the weighted sum; the queries are scaled rather than the scores, and
grouped query heads meet their KV head by a reshape, not a copy. They save ``batch * heads * queries * keys * 6``
bytes per layer (the fp32 probabilities for the softmax's backward, their 16-bit copy for the matmul's).
"""

from __future__ import annotations

from typing import Any

import torch

SHORT_KEYS = 1024
"""Longest key length the three-op path takes (from the table above)."""

ATTENTION_NAME = "qlora_cpu_training"
"""The name this attention is registered under in transformers' attention interface."""


def short_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q kᵀ · scaling, masked) v for (batch, heads, length, dim) inputs, query head h reading KV head
    h // (heads / kv_heads) as transformers' repeat_kv does. `mask`: bool (True = attend) or additive float,
    broadcastable to (batch, heads, queries, keys); None = causal. Returns (batch, queries, heads, dim),
    transformers' attention output layout."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = (query * scaling).reshape(batch, kv_heads, groups * q_len, dim)  # a group's queries share one K
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(batch, heads, q_len, k_len)
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if mask.dtype == torch.bool:
        # the dtype's minimum, not -inf: a row that attends nowhere (padding) gets finite, unused values, not NaN
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probs = probs.view(batch, kv_heads, groups * q_len, k_len)
    out = torch.matmul(probs, value).view(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous()


def cpu_training_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the three ops for a short, plain causal attention on a CPU,
    transformers' own SDPA function for everything else (long rows, GPUs, dropout, soft-capping, sinks, biases)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = dropout == 0.0 and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.device.type == "cpu" and key.shape[2] <= SHORT_KEYS and plain and (causal or attention_mask is not None):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return short_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def use_cpu_training_attention(model: Any) -> bool:
    """Switch a transformers model that uses SDPA to :func:`cpu_training_attention` (the same masks); models on
    another implementation (eager for soft-capped Gemma 2, say) keep theirs. Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION_NAME, cpu_training_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
    return True
