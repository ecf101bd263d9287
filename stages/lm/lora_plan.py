"""Which projections get LoRA, and where an adapter starts: PEFT's default (A random, B = 0) or LoftQ.

One home for both because they must agree: quantize (LoftQ picks the NF4 base and the starting adapter together),
train (starts from that adapter) and merge (adds the trained adapter to the base it was trained against) all read
the same `train` fields through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.architectures import family_of_class
from qlora_pipeline.kernels.nf4 import NF4Weight
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import TrainParams

LOFTQ_ADAPTER = "loftq_adapter"
"""quantize's folder (beside `model/`) holding the LoftQ starting adapter, in PEFT format."""


def lora_targets(t: TrainParams, config: dict[str, Any]) -> list[str]:
    """`train.target_modules`, or every projection of the model's family when it is null."""
    if t.target_modules is not None:
        return list(t.target_modules)
    family = family_of_class((config.get("architectures") or [None])[0])
    if family is None:
        raise InputError(f"cannot tell the model family of {config.get('architectures')}; set train.target_modules")
    return list(family.lora_targets)


def inject_train_lora(model: Any, t: TrainParams, dtype: torch.dtype) -> None:
    """LoRA as `train` configures it, after seeding with `train.seed`: the QLoRA model and the 16-bit baseline get
    the same layers and the same initial A."""
    from qlora_pipeline.kernels.dtypes import torch_dtype
    from qlora_pipeline.kernels.lora import inject_lora

    torch.manual_seed(t.seed)
    try:
        inject_lora(
            model,
            lora_targets(t, model.config.to_dict()),
            r=t.lora_r,
            alpha=t.lora_alpha,
            dropout=t.lora_dropout,
            use_rslora=t.use_rslora,
            adapter_dtype=torch_dtype(t.adapter_dtype),
            compute_dtype=dtype,
        )
    except ValueError as exc:
        raise InputError(f"train.target_modules: {exc}; fix it in params.yaml") from None


def adapt_for_training(model: Any, t: TrainParams, dtype: torch.dtype, device: torch.device) -> None:
    """What both trained models (the QLoRA model and the 16-bit baseline) get before their first step: on a CPU
    the three-op attention (kernels/attention.py), LoRA as `train` configures it, norms and gated MLPs that
    keep only their inputs for backward (kernels/slim_activations.py), and the rotary embedding of q and k as one
    node (kernels/rope.py: one launch for both a direction on CUDA)."""
    from qlora_pipeline.kernels.attention import use_cpu_training_attention
    from qlora_pipeline.kernels.rope import fuse_rotary_embedding
    from qlora_pipeline.kernels.slim_activations import slim_saved_activations

    if device.type == "cpu":
        use_cpu_training_attention(model)
    inject_train_lora(model, t, dtype)
    slim_saved_activations(model)
    fuse_rotary_embedding(model)


@dataclass
class LoftQCollector:
    """A `quantizer` for `save_4bit_checkpoint`: LoftQ on the LoRA targets, plain NF4 elsewhere; it keeps each
    target's starting factors and its step-0 errors (LoftQ's and plain NF4's) for the adapter and the report."""

    t: TrainParams
    targets: list[str]
    iters: int
    blocksize: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def __call__(self, module: str, weight: torch.Tensor) -> NF4Weight:
        from qlora_pipeline.kernels.loftq import loftq_init
        from qlora_pipeline.kernels.lora import is_targeted, lora_scaling
        from qlora_pipeline.kernels.nf4 import quantize_nf4

        if not is_targeted(module, self.targets):
            return quantize_nf4(weight, blocksize=self.blocksize)
        scaling = lora_scaling(self.t.lora_r, self.t.lora_alpha, self.t.use_rslora)
        init = loftq_init(weight, self.t.lora_r, scaling, self.iters, self.blocksize)
        self.pairs[module] = (init.lora_A, init.lora_B)
        self.errors[module] = {"plain_nf4": init.plain_nf4_error, "loftq": init.error, "iters": list(init.errors)}
        return init.nf4

    @classmethod
    def of(cls, t: TrainParams, config: dict[str, Any], iters: int, blocksize: int) -> LoftQCollector | None:
        """The LoftQ quantizer when `quantize.loftq_iters` > 0, else None (plain NF4)."""
        return cls(t, lora_targets(t, config), iters, blocksize) if iters > 0 else None

    def write_adapter(self, out_dir: Path, base_model_name_or_path: str) -> None:
        """The starting adapter in PEFT format (dropout 0: it is an initialisation; train sets its own)."""
        from qlora_pipeline.kernels.formats.peft_adapter import write_peft_adapter

        t = self.t
        write_peft_adapter(
            self.pairs, out_dir, base_model_name_or_path, self.targets, t.lora_r, t.lora_alpha, 0.0, t.use_rslora
        )

    def summary(self) -> dict[str, Any]:
        """Mean step-0 relative error over the adapted projections, LoftQ vs plain NF4, and the worst ratio."""
        n = max(1, len(self.errors))
        ratios = [e["loftq"] / e["plain_nf4"] for e in self.errors.values() if e["plain_nf4"] > 0]
        return {
            "iters": self.iters,
            "projections": len(self.errors),
            "mean_rel_error_plain_nf4": sum(e["plain_nf4"] for e in self.errors.values()) / n,
            "mean_rel_error_loftq": sum(e["loftq"] for e in self.errors.values()) / n,
            "worst_ratio_loftq_over_plain": max(ratios, default=None),
        }
