"""Causal-LM loss on the reply tokens only, without materialising logits for the rest of the sequence.

The vocabulary projection is the largest activation of a small model (8×256 tokens × 49,152 words in fp32
is 400 MB, and its gradient as much again). Only the hidden states at labelled positions go through
lm_head, so memory and time scale with the reply tokens, not the padded batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from qlora_pipeline.kernels.attention import additive_mask
from qlora_pipeline.kernels.fused_ce import DEFAULT_CHUNK, frozen_head_cross_entropy
from qlora_pipeline.kernels.lora import module_device
from qlora_pipeline.stages.lm.batching import Batch, collate, eval_batches


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the decoder stack returning hidden states, lm_head) of a HF causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def attention_types(config: Any) -> tuple[tuple[str, ...], bool]:
    """The attention types a decoder's layers use, and whether it takes one mask per type (a dict keyed by type:
    the families whose config lists `layer_types`); the others take one mask for every layer, sliding when the
    config sets a window (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    if types:
        return tuple(sorted(set(types))), True
    return ("sliding_attention" if getattr(config, "sliding_window", None) else "full_attention",), False


def device_attention_masks(model: Any, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
    """The masks transformers would build for this batch, built on its device without reading anything back: causal,
    and within a packed row's example (examples start where the position ids are 0) or a padded row's real tokens;
    sliding-window layers also see no further back than the window. As SDPA's float bias (once a forward pass,
    not once a layer) or eager's additive mask."""
    ids = batch.input_ids
    width, device = ids.shape[1], ids.device
    pos = torch.arange(width, device=device)
    distance = pos[:, None] - pos[None, :]
    if batch.position_ids is not None:
        segment = (batch.position_ids == 0).cumsum(-1)
        keep = (distance >= 0)[None] & (segment[:, :, None] == segment[:, None, :])
    else:
        keep = (distance >= 0)[None] & batch.attention_mask[:, None, :].bool()
    keep = keep[:, None]
    config = model.config
    types, per_type = attention_types(config)
    dtype = model.get_input_embeddings().weight.dtype
    masks = {}
    for kind in types:
        m = keep & (distance < config.sliding_window)[None, None] if kind == "sliding_attention" else keep
        # eager: transformers' additive mask; SDPA: the bias (-inf) it would convert a bool mask to in every layer
        m = additive_mask(m, dtype, float("-inf") if config._attn_implementation == "sdpa" else None)
        masks[kind] = m
    return masks if per_type else masks[types[0]]


def attention_mask_for(model: Any, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """The mask to hand the decoder: on the CPU the 2-D padding mask of a padded batch or none for a packed one,
    on an accelerator ready 4-D masks.

    A packed batch passes no mask on the CPU: transformers then reads where the position ids restart and builds,
    per attention type (full, sliding window), a mask in which no example sees another (tests/unit/test_packing.py
    holds it to that for every family). Those reads (`.all()` of the padding mask, the position ids' restarts) are
    a host sync per forward pass on an accelerator, where a 4-D mask (or one per attention type) is taken as given,
    so there we build them ourselves (:func:`device_attention_masks`). On the CPU a read costs nothing, so
    transformers keeps its own choice.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if batch.input_ids.device.type == "cpu" or impl not in ("sdpa", "eager"):
        return batch.attention_mask
    return device_attention_masks(model, batch)


def summed_loss(model: Any, batch: Batch, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over labelled positions (fp32, on the model's device), and their count.

    Reads nothing back to the host: positions and counts were computed on the CPU when the batch was made.
    """
    decoder, head = decoder_and_head(model)
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=attention_mask_for(model, batch),
        position_ids=batch.position_ids,
        use_cache=False,  # a cache would switch off transformers' reading of packed position ids
    ).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_positions)
    y = batch.targets
    weight = getattr(head, "weight", None)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2: logits = cap·tanh(logits / cap)
    if weight is not None and not weight.requires_grad and getattr(head, "bias", None) is None and not cap:
        return frozen_head_cross_entropy(h, weight, y, chunk), batch.n_target_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        logits = head(h[s : s + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total = total + F.cross_entropy(logits, y[s : s + chunk], reduction="sum")
    return total, batch.n_target_tokens


@torch.no_grad()
def heldout_loss(
    model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted mean loss over every labelled token of the rows, and its perplexity.

    Batches are made on the CPU and moved to the model's device; the sum stays there until one read at the end.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    lengths = [len(ids) for ids, _ in rows]
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for idx in eval_batches(lengths, batch_size):
        s, n = summed_loss(model, collate([rows[i] for i in idx], pad_id).to(device))
        total += s.double()
        count += n
    model.train(was_training)
    mean = total.item() / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
