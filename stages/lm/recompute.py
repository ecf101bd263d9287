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


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Turn recomputation on or off per batch: a short batch's activations fit anyway, and the long batches,
    which set the memory peak, still checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and hasattr(module, "_gradient_checkpointing_func"):
            module.gradient_checkpointing = enabled
