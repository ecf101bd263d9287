"""Causal-LM loss on the reply tokens only, without materialising logits for the rest of the sequence.

The vocabulary projection is the largest activation of a small model (8×256 tokens × 49,152 words in fp32
is 400 MB, and its gradient as much again). Only the hidden states at labelled positions go through
lm_head, so memory and time scale with the reply tokens, not the padded batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kernels.fused_ce import frozen_head_cross_entropy
from stages.common.batching import Batch, collate, eval_batches
from stages.common.formatting import IGNORE_INDEX


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the decoder stack returning hidden states, lm_head) of a HF causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def summed_loss(model: Any, batch: Batch, chunk: int = 512) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over labelled positions (fp32), and how many there were."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    y = targets[keep]
    weight = getattr(head, "weight", None)
    if weight is not None and not weight.requires_grad and getattr(head, "bias", None) is None:
        return frozen_head_cross_entropy(h, weight, y, chunk), int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        logits = head(h[s : s + chunk]).float()
        total = total + F.cross_entropy(logits, y[s : s + chunk], reduction="sum")
    return total, int(y.numel())


@torch.no_grad()
def heldout_loss(
    model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int
) -> dict[str, float]:
    """Token-weighted mean loss over every labelled token of the rows, and its perplexity."""
    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids, _ in rows]
    total, count = 0.0, 0
    for idx in eval_batches(lengths, batch_size):
        batch = collate([rows[i] for i in idx], pad_id)
        s, n = summed_loss(model, batch)
        total += float(s)
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": float(torch.exp(torch.tensor(mean))), "tokens": count}
