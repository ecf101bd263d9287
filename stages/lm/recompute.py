"""Activation recomputation (gradient checkpointing) of the decoder layers, for every model the train stage trains
(the NF4 base and the 16-bit LoRA baseline alike): which layers can recompute, and how many a batch does."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qlora_pipeline.stages.contract.recompute_budget import RecomputeBudget


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


def recompute_budget_of(model: Any, params: Any, device: Any) -> RecomputeBudget | None:
    """How many layers each batch recomputes (None: train.gradient_checkpointing off, none ever). With
    train.checkpoint_min_tokens auto on a GPU, the budget is what the device's memory holds now (the model is
    loaded): the memory this process has reserved plus what the device has free."""
    import torch

    from qlora_pipeline.stages.contract.memory_fit import recompute_tokens_that_fit
    from qlora_pipeline.stages.contract.memory_plan import ModelShape, recompute_budget, train_shape_of

    t = params.train
    if not t.gradient_checkpointing:
        return None
    config = model.config.to_dict()
    shape = ModelShape.from_config(config)
    run = train_shape_of(t, params.data.max_length, config, device.type, ranks=1)
    if t.checkpoint_min_tokens == "auto" and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        capacity = free + torch.cuda.memory_reserved(device)
        run = replace(run, recompute_budget_tokens=recompute_tokens_that_fit(shape, run, capacity))
    return recompute_budget(shape, run)


def set_recompute(model: Any, budget: RecomputeBudget | None, batch: Any) -> None:
    """Before a batch's forward pass: recompute as many layers as its length needs to stay within the budget."""
    if budget is not None:
        set_recomputed_layers(model, budget.recomputed_layers(batch.input_ids.numel()))
