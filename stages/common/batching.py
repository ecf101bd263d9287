"""Batches for training and evaluation: length-grouped, padded to the batch's longest row, seeded.

Padding every row to the longest of a random batch wastes most of a CPU step on chatterbot-like data
(one 256-token reply pads seven short ones). Grouping rows of similar length inside mega-batches, the
QLoRA recipe's `group_by_length`, keeps the batches random while cutting the padded tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from stages.common.formatting import IGNORE_INDEX

MEGABATCH_FACTOR = 16


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad ids with pad_id and labels with IGNORE_INDEX to the longest row."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
        mask[i, : len(x)] = 1
    return Batch(ids, mask, labels)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches of one epoch: shuffle, sort within mega-batches by length, shuffle the batches.

    A pure function of (lengths, batch_size, seed, epoch), so a resumed run recomputes the same order.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * MEGABATCH_FACTOR
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: Sequence[int], batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless stream of index batches over epochs, starting at global batch number `start` (for resume)."""
    if not lengths:
        raise ValueError("no rows to batch")
    per_epoch = len(epoch_batches(lengths, batch_size, seed, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch)
        yield from batches[offset:]
        epoch, offset = epoch + 1, 0


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic, length-sorted batches for evaluation (results do not depend on order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
