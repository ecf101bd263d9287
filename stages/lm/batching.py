"""Batches for training and evaluation: packed or length-grouped, seeded, and resumable at any batch.

Padding every row to the longest of a random batch wastes most of a CPU step on chatterbot-like data
(one 256-token reply pads seven short ones). Two cures (docs/data.md):

- **packing** (`train.packing`): several examples share a row of `data.max_length` tokens, position ids restart
  at each example and attention never crosses an example boundary (transformers reads the restarts as separate
  sequences), so a packed batch's loss is the sum of its examples' losses and almost no step computes on padding;
- **length grouping** (the QLoRA recipe's `group_by_length`): rows of similar length share a batch, inside
  shuffled mega-batches, so batches stay random while the padded tokens shrink.
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
    attention_mask: torch.Tensor | None
    """The 2-D padding mask of a padded batch; None for a packed one, whose position ids say where examples start."""
    labels: torch.Tensor
    target_positions: torch.Tensor
    targets: torch.Tensor
    n_tokens: int
    n_target_tokens: int
    n_examples: int
    position_ids: torch.Tensor | None = None
    """Packed batches only: each example's positions count from 0 (trailing padding is one more such run)."""

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

        def move(t: torch.Tensor | None) -> Any:
            return None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=True)

        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            labels=move(self.labels),
            target_positions=move(self.target_positions),
            targets=move(self.targets),
            position_ids=move(self.position_ids),
        )


def token_rows(split: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every example of a tokenized split (a `datasets.Dataset` made by prepare)."""
    return list(zip(split["input_ids"], split["labels"], strict=True))


def target_count(labels: Sequence[int]) -> int:
    """Positions of an example whose next token is a label: what it adds to a batch's n_target_tokens."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


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
        n_examples=len(rows),
    )


def collate_packed(rows: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int) -> Batch:
    """Each row the concatenation of its examples, right-padded to the longest row; position ids restart at every
    example (and at the padding). A position is a target only when the next token is a label of the same example,
    so no example predicts the first token of the one after it."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for k, (x, y) in enumerate(row):
            n = len(x)
            ids[r, offset : offset + n] = torch.tensor(x, dtype=torch.long)
            labels[r, offset : offset + len(y)] = torch.tensor(y, dtype=torch.long)
            positions[r, offset : offset + n] = torch.arange(n)
            segment[r, offset : offset + n] = k
            offset += n
        positions[r, offset:] = torch.arange(width - offset)
    same = segment[:, 1:] == segment[:, :-1]
    row, col = ((labels[:, 1:] != IGNORE_INDEX) & same).nonzero(as_tuple=True)
    return Batch(
        input_ids=ids,
        attention_mask=None,
        labels=labels,
        target_positions=row * width + col,
        targets=labels[row, col + 1],
        n_tokens=sum(len(x) for row_ in rows for x, _ in row_),
        n_target_tokens=int(row.numel()),
        n_examples=sum(len(row_) for row_ in rows),
        position_ids=positions,
    )


def pack_rows(lengths: Sequence[int], indices: Sequence[int], capacity: int) -> list[list[int]]:
    """The examples `indices` in the fewest rows of at most `capacity` tokens, balanced so the rows are about equally
    long (the batch pads to its longest row): longest example first, each into the shortest row it fits in; when
    one does not fit, one more row and again. A batch of 8 examples of ~55 tokens becomes two rows of ~220."""
    total = sum(lengths[i] for i in indices)
    too_long = next((lengths[i] for i in indices if lengths[i] > capacity), None)
    if too_long is not None:
        raise ValueError(f"an example of {too_long} tokens does not fit a packed row of {capacity}")
    longest_first = sorted(indices, key=lambda i: (-lengths[i], i))
    n_rows = max(1, -(-total // capacity))
    while True:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        filled = [0] * n_rows
        for i in longest_first:
            r = min(
                (r for r in range(n_rows) if filled[r] + lengths[i] <= capacity), key=filled.__getitem__, default=-1
            )
            if r < 0:
                break
            rows[r].append(i)
            filled[r] += lengths[i]
        else:
            return [row for row in rows if row]
        n_rows += 1


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


@dataclass(frozen=True)
class BatchPlan:
    """How training cuts its examples into batches: each batch a list of rows, each row the indices of the
    examples it holds (one when not packing). A pure function of its fields and the epoch, so a resumed run
    recomputes the same batches."""

    lengths: Sequence[int]
    batch_size: int
    """Examples per batch, packed or not."""
    seed: int
    pack_to: int | None = None
    """The most tokens of a packed row; None: one example per row."""

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """Unpacked: length-grouped batches (so little is padded). Packed: plain random batches (padding no
        longer depends on which lengths meet), each laid out in balanced rows."""
        if self.pack_to is None:
            return [[[i] for i in b] for b in epoch_batches(self.lengths, self.batch_size, self.seed, epoch)]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        return [
            pack_rows(self.lengths, order[j : j + self.batch_size], self.pack_to)
            for j in range(0, len(order), self.batch_size)
        ]

    def stream(self, start: int = 0) -> Iterator[list[list[int]]]:
        """Endless batches over epochs, starting at global batch number `start` (for resume)."""
        if not self.lengths:
            raise ValueError("no rows to batch")
        epoch, offset = 0, start
        while True:
            batches = self.epoch(epoch)
            if offset < len(batches):
                yield from batches[offset:]
                offset = 0
            else:
                offset -= len(batches)
            epoch += 1

    def share(self, batch: list[list[int]], rank: int, ranks: int) -> list[list[int]]:
        """Rank `rank`'s part of a batch trained on `ranks` processes: every `ranks`-th of its examples, packed
        again (or one per row), so the ranks together compute the batch one process would."""
        if ranks == 1:
            return batch
        mine = [i for row in batch for i in row][rank::ranks]
        if self.pack_to is None:
            return [[i] for i in mine]
        return pack_rows(self.lengths, mine, self.pack_to)

    def padded_tokens(self, batch: list[list[int]]) -> int:
        """Positions `collate` makes of a batch: its rows times the longest row."""
        return len(batch) * max(sum(self.lengths[i] for i in row) for row in batch)

    def collate(self, batch: list[list[int]], examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
        if self.pack_to is None:
            return collate([examples[row[0]] for row in batch], pad_id)
        return collate_packed([[examples[i] for i in row] for row in batch], pad_id)


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic, length-sorted batches for evaluation (results do not depend on order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
