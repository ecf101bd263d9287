"""How long training runs and at which learning rate: `train.max_steps` or `train.epochs`, warmup, then a constant,
linear or cosine schedule (the train stage calls `lr_at` first thing in every step)."""

from __future__ import annotations

import math

from qlora_pipeline.stages.contract.params import TrainParams


def total_steps(t: TrainParams, n_rows: int) -> int:
    """`train.max_steps`, or with `train.epochs` the optimizer steps that many passes over `n_rows` examples take."""
    if t.epochs is None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * n_rows / (t.batch_size * t.grad_accum)))


def lr_at(step: int, t: TrainParams, total: int) -> float:
    """Linear warmup over warmup_ratio of the `total` steps, then `train.lr_schedule`: constant (the QLoRA paper's),
    linear decay to 0 or cosine decay to 0 at the last step (the shapes of transformers' schedulers)."""
    warmup = math.ceil(t.warmup_ratio * total)
    if warmup and step < warmup:
        return t.learning_rate * (step + 1) / warmup
    if t.lr_schedule == "constant":
        return t.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if t.lr_schedule == "linear":
        return t.learning_rate * max(0.0, 1.0 - progress)
    return t.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["lr_at", "total_steps"]
