"""Activation recomputation (gradient checkpointing) of the decoder layers, for every model the train stage trains
(the NF4 base and the 16-bit LoRA baseline alike)."""

from __future__ import annotations

from typing import Any


def enable_checkpointing(model: Any) -> None:
    """Non-reentrant recomputation of every decoder layer. Our pin (transformers 5.23) calls it
    `activation_checkpointing_enable` and warns on the old name; GPU images still carry 5.17, which has only
    `gradient_checkpointing_enable` (docs/devices.md)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: Any) -> list[Any]:
    """The decoder layers that can recompute (those :func:`enable_checkpointing` prepared), in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and hasattr(m, "_gradient_checkpointing_func")
    ]


def set_recomputed_layers(model: Any, count: int) -> None:
    """Recompute the first `count` decoder layers in backward and keep the others' activations, for the next batch
    (``RecomputeBudget.recomputed_layers`` says how many a batch needs)."""
    for i, module in enumerate(checkpointed_layers(model)):
        module.gradient_checkpointing = i < count


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute every decoder layer, or none."""
    for module in checkpointed_layers(model):
        module.gradient_checkpointing = enabled
