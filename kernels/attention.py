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
grouped query heads meet their KV head by a reshape, not a copy. Backward recomputes the probabilities from the
kept queries and keys instead of keeping them (``_ShortAttention``): autograd over the plain ops would keep
``batch * heads * queries * keys * 6`` bytes per layer. The queries go in tiles of :data:`QUERY_TILE`, each against
only the keys some query of it attends (:func:`attended_key_tiles`): a causal row computes about half of its score
matrix, a packed row of short examples less (the table above is untiled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SHORT_KEYS = 1024
"""Longest key length the three-op path takes (from the table above)."""

BACKWARD_BYTES_PER_SCORE = 12
"""The most bytes per score :class:`_ShortAttention`'s backward holds at once (fp32 probabilities, their fp32
gradient and the softmax's fp32 gradient): what the memory plan counts for one layer's attention backward."""

QUERY_TILE = 64
"""Queries per tile of :class:`_ShortAttention`: each tile computes scores only against the keys it attends.
Measured on the 2-core AVX2 VM (fp32, 9 query heads over 3 KV heads of 64, forward + backward of one layer, tiled
time over untiled in the same run) for tiles of 32 / 48 / 64 / 96 / 128 queries: two packed rows of ~222 tokens
(four examples each) 0.73 / 0.73 / 0.66 / 0.72 / 0.70; three packed rows of 256 0.76 / 0.71 / 0.75 / 0.74 / 0.90;
one causal row of 256 1.17 / 1.06 / 0.96 / 0.87 / 0.91; eight padded rows of 100 1.02 / 1.00 / 0.99 / 1.19 / 1.08."""

ATTENTION_NAME = "qlora_cpu_training"
"""The name this attention is registered under in transformers' attention interface."""


def additive_mask(mask: torch.Tensor, dtype: torch.dtype, masked_score: float | None = None) -> torch.Tensor:
    """A bool mask (True = attend) as an additive one: 0 where a score is kept, `masked_score` where it is masked.

    By default the dtype's minimum, as transformers' eager attention adds it (not -inf: a row that attends nowhere
    gets finite scores, not NaN). With -inf it is the float bias torch's SDPA turns a bool mask into on every call:
    built once for a forward pass and handed to every layer, it spares each layer's attention that conversion (two
    scalar fills and a ``where``: 90 launches a SmolLM2 forward on a GPU), with the same values, so the same
    probabilities bit for bit. A float mask is taken as additive already."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    fill = torch.finfo(dtype).min if masked_score is None else masked_score
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, fill)


def _masked_scores(grouped: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled 16-bit scores (batch, heads, queries, keys) plus the additive mask, from queries grouped by KV head.

    Adding the mask (one pass, broadcast over the heads) costs about a third of filling a boolean one into every
    head's scores on a CPU; a masked score becomes the minimum either way, so the probabilities are the same."""
    batch, kv_heads, rows, _ = grouped.shape
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(batch, heads, rows * kv_heads // heads, key.shape[2])
    return scores.add_(bias)


@dataclass(frozen=True)
class KeyTile:
    """Queries [q0, q1) and the keys [k0, k1) that any of them attends: the rest of the score block is masked for
    every query of the tile, so it is not computed."""

    q0: int
    q1: int
    k0: int
    k1: int


def attended_key_tiles(mask: torch.Tensor, q_len: int, k_len: int, tile: int = QUERY_TILE) -> list[KeyTile]:
    """The query tiles of a boolean `mask` (True = attend, broadcastable to (batch, heads, q_len, k_len)), each with
    the span of keys from the first to the last one that any of its queries attends in any row.

    Why: a causal row computes twice the scores it uses, and a packed row (examples of ~55 tokens in rows of ~220)
    four times: its examples see nothing of each other. Leaving out keys that every query of a tile masks changes
    no probability (a masked score's is exactly 0), only the order in which the softmax and the weighted sum add
    their terms. A tile whose queries attend nowhere, and any additive (float) mask, keep every key, as the
    untiled softmax spreads such a row over all of them."""
    if mask.dtype != torch.bool:
        return [KeyTile(0, q_len, 0, k_len)]
    rows = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() > 2 else mask[None]
    tiles = []
    for q0 in range(0, q_len, tile):
        q1 = min(q0 + tile, q_len)
        seen = rows[:, q0:q1].any(dim=1).any(dim=0).nonzero()
        k0, k1 = (int(seen[0]), int(seen[-1]) + 1) if seen.numel() else (0, k_len)
        tiles.append(KeyTile(q0, q1, k0, k1))
    return tiles


def _tile_queries(grouped: torch.Tensor, tile: KeyTile, groups: int) -> torch.Tensor:
    """A tile's rows of queries grouped by KV head (batch, kv_heads, groups * tile queries, dim): every group's
    queries of the tile, in the grouped layout's order (a view when the tile is every query)."""
    batch, kv_heads, rows, dim = grouped.shape
    per_group = grouped.reshape(batch, kv_heads, groups, rows // groups, dim)[:, :, :, tile.q0 : tile.q1]
    return per_group.reshape(batch, kv_heads, groups * (tile.q1 - tile.q0), dim)


@dataclass(frozen=True)
class TilePlan:
    """A mask's query tiles and, for each, its additive mask over the tile's keys: what every layer of one forward
    pass and its backward would otherwise rebuild from the same mask (`attended_key_tiles`' reductions, the
    additive mask's fill), 30 times forward and 30 times backward on SmolLM2."""

    tiles: tuple[KeyTile, ...]
    biases: tuple[torch.Tensor, ...]


class _LastTilePlan:
    """The plan of the last mask seen, held with a reference to that mask: transformers hands every layer of a
    forward pass the same mask tensor, so one entry serves the whole step, and holding the mask (a few KB of bools)
    keeps its identity from being reused by another tensor. A mask changed in place (its version moved) or of
    another dtype is planned anew."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._mask: torch.Tensor | None = None
        self._plan: TilePlan | None = None

    def get(self, mask: torch.Tensor, q_len: int, k_len: int, dtype: torch.dtype) -> TilePlan:
        key = (mask._version, q_len, k_len, dtype)
        if self._mask is mask and self._key == key and self._plan is not None:
            return self._plan
        full = mask.expand(*mask.shape[:-2], q_len, k_len)  # a mask broadcast over queries, sliced per tile
        tiles = tuple(attended_key_tiles(full, q_len, k_len))
        biases = tuple(additive_mask(full[..., t.q0 : t.q1, t.k0 : t.k1], dtype) for t in tiles)
        self._key, self._mask, self._plan = key, mask, TilePlan(tiles, biases)
        return self._plan


_LAST_PLAN = _LastTilePlan()


def _tile_probabilities(
    grouped: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, heads: int, tile: KeyTile
) -> torch.Tensor:
    """The tile's fp32 probabilities (batch, heads, tile queries, tile keys); `bias` is its additive mask."""
    groups = heads // key.shape[1]
    scores = _masked_scores(_tile_queries(grouped, tile, groups), key[:, :, tile.k0 : tile.k1], bias, heads)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class _ShortAttention(torch.autograd.Function):
    """softmax(q kᵀ, masked) v that keeps no probabilities for backward: it recomputes them there from q and k.

    Autograd over the plain ops would keep the fp32 probabilities (for the softmax's backward) and their 16-bit
    copy (for the matmul's), 6 bytes per score: on rows of 256 tokens that is 14 KB per token and layer, more than
    all other activations of a SmolLM2 layer together. The recompute is one more q kᵀ and softmax, bit for bit the
    forward's, so the gradients are the ones autograd would give over the same tiles.

    The queries go in tiles of :data:`QUERY_TILE` (:func:`attended_key_tiles`), each against the keys it attends.
    The mask enters as transformers' eager attention applies it, added (:func:`additive_mask`): a masked score's
    probability is exactly 0, so its gradient is 0 too and backward needs no masking pass. Only a query row that
    attends nowhere (left padding) differs from a boolean ``masked_fill``: its probabilities, spread over its
    tile's keys, pass gradient to them, as under eager attention; such a row carries no loss, so that gradient is
    0 anyway.
    """

    @staticmethod
    def forward(
        ctx, grouped: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, heads: int
    ) -> torch.Tensor:
        batch, kv_heads, rows, _ = grouped.shape
        groups = heads // kv_heads
        q_len = rows // groups
        plan = _LAST_PLAN.get(mask, q_len, key.shape[2], grouped.dtype)
        out = value.new_empty(batch, kv_heads, groups, q_len, value.shape[-1])
        for tile, bias in zip(plan.tiles, plan.biases, strict=True):
            probs = _tile_probabilities(grouped, key, bias, heads, tile).to(value.dtype)
            part = torch.matmul(probs.view(batch, kv_heads, -1, tile.k1 - tile.k0), value[:, :, tile.k0 : tile.k1])
            out[:, :, :, tile.q0 : tile.q1] = part.view(batch, kv_heads, groups, tile.q1 - tile.q0, -1)
        ctx.save_for_backward(grouped, key, value)
        ctx.heads, ctx.plan = heads, plan
        return out.view(batch, kv_heads, rows, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grouped, key, value = ctx.saved_tensors
        batch, kv_heads, rows, dim = grouped.shape
        groups = ctx.heads // kv_heads
        grad_out = grad_out.to(value.dtype)
        grad_grouped = torch.empty_like(grouped).view(batch, kv_heads, groups, rows // groups, dim)
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
        for tile, bias in zip(ctx.plan.tiles, ctx.plan.biases, strict=True):
            # at most BACKWARD_BYTES_PER_SCORE live at once: the fp32 probabilities, their gradient and its softmax's
            probs32 = _tile_probabilities(grouped, key, bias, ctx.heads, tile)
            shape = (batch, kv_heads, -1, tile.k1 - tile.k0)
            keys, values = key[:, :, tile.k0 : tile.k1], value[:, :, tile.k0 : tile.k1]
            out_rows = _tile_queries(grad_out, tile, groups)
            grad_value[:, :, tile.k0 : tile.k1] += torch.matmul(
                probs32.to(value.dtype).view(shape).transpose(-1, -2), out_rows
            )
            grad_probs = torch.matmul(out_rows, values.transpose(-1, -2)).view(probs32.shape).float()
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs32, -1, torch.float32)
            del grad_probs, probs32
            grad_scores = grad_scores.to(value.dtype).view(shape)
            part = torch.matmul(grad_scores, keys)
            grad_grouped[:, :, :, tile.q0 : tile.q1] = part.view(batch, kv_heads, groups, tile.q1 - tile.q0, dim)
            grad_key[:, :, tile.k0 : tile.k1] += torch.matmul(
                grad_scores.transpose(-1, -2), _tile_queries(grouped, tile, groups)
            )
        return grad_grouped.view(grouped.shape), grad_key, grad_value, None, None


def short_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """softmax(q kᵀ · scaling, masked) v for (batch, heads, length, dim) inputs, query head h reading KV head
    h // (heads / kv_heads) as transformers' repeat_kv does. `mask`: bool (True = attend) or additive float,
    broadcastable to (batch, heads, queries, keys); None = causal. Returns (batch, queries, heads, dim),
    transformers' attention output layout."""
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    grouped = (query * scaling).reshape(batch, kv_heads, heads // kv_heads * q_len, dim)  # a group shares one K
    out = _ShortAttention.apply(grouped, key, value, mask, heads).view(batch, heads, q_len, dim)
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


def use_family_attention(model: Any) -> Any:
    """Put a model whose family needs eager attention (``Family.eager_attention``: Gemma 2, whose attention scores
    are soft-capped) on it, whichever default the installed transformers picks. transformers 5.23 picks eager for
    Gemma 2 by itself; 5.17 (a GPU node's image) picks SDPA, which drops the cap without a word, so the same weights
    would train and be scored as another function than the one llama.cpp runs from our GGUF. Returns the model."""
    from qlora_pipeline.kernels.architectures import family_of_class

    family = family_of_class(type(model).__name__)
    if family is not None and family.eager_attention and model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    return model


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
