"""Batches for training and evaluation: length-grouped, padded to the batch's longest row, seeded.

Padding every row to the longest of a random batch wastes most of a CPU step on chatterbot-like data
(one 256-token reply pads seven short ones). Grouping rows of similar length inside mega-batches, the
QLoRA recipe's `group_by_length`, keeps the batches random while cutting the padded tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from qlora_pipeline.stages.lm.formatting import IGNORE_INDEX

MEGABATCH_FACTOR = 16


@dataclass(frozen=True)
class Batch:
    """One padded batch plus what the loss needs, all computed on the CPU when the batch is made.

    ``target_positions`` are flat indices into ``hidden[:, :-1]`` of the positions whose next token is labelled,
    and ``targets`` those next tokens: the loss gathers them with ``index_select`` instead of a boolean mask,
    whose output size the host would have to read back from an accelerator (a sync per batch). The token counts
    are plain ints for the same reason.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    target_positions: torch.Tensor
    targets: torch.Tensor
    n_tokens: int
    n_target_tokens: int

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`. To CUDA the host tensors are pinned first so the copies are asynchronous
        (a copy from pageable memory waits for the device to drain: a host sync)."""
        device = torch.device(device)
        if device == self.device:
            return self
        pin = device.type == "cuda" and self.device.type == "cpu"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(device, non_blocking=True)

        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            target_positions=move(self.target_positions),
            targets=move(self.targets),
        )


def token_rows(split: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every example of a tokenized split (a `datasets.Dataset` made by prepare)."""
    return list(zip(split["input_ids"], split["labels"], strict=True))


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad ids with pad_id and labels with IGNORE_INDEX to the longest row (on the CPU)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[i, : len(y)] = torch.tensor(y, dtype=torch.long)
        mask[i, : len(x)] = 1
    row, col = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major, as a boolean mask orders them
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        target_positions=row * width + col,
        targets=labels[row, col + 1],
        n_tokens=sum(len(x) for x, _ in rows),
        n_target_tokens=int(row.numel()),
    )


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
