"""The 16-bit LoRA baseline: the same adapter (targets, rank, alpha, dropout, initial A), data order, steps and seed
on the original 16-bit base, trained by the train stage's own loop, so that evaluate can say what 4 bits cost
(QLoRA − LoRA on held-out loss) in every run instead of assuming it is small.

It costs a second training run on a model four times the size in memory, so `train.lora16_baseline: auto` runs it
only for bases of at most `AUTO_MAX_WEIGHT_BYTES` of 16-bit weights (the embedded default: 270 MB), and only in one
process; `true` forces it, `false` turns it off.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.stages.contract.host_heap import return_freed_heap
from qlora_pipeline.stages.contract.params import TrainParams
from qlora_pipeline.stages.contract.stage import StageContext
from qlora_pipeline.stages.lm.distributed import World
from qlora_pipeline.stages.lm.lm_loss import heldout_loss
from qlora_pipeline.stages.lm.lora_plan import adapt_for_training
from qlora_pipeline.stages.lm.modelio import cast_parameters, load_16bit_model, safetensors_files
from qlora_pipeline.stages.lm.recompute import enable_checkpointing
from qlora_pipeline.stages.lm.train_state import TrainResult

ADAPTER = "adapter_lora16"
"""train's folder (beside `adapter/`) holding the baseline's adapter, in PEFT format, for the 16-bit base."""
AUTO_MAX_WEIGHT_BYTES = 2**30


@dataclass(frozen=True)
class BaselineDecision:
    runs: bool
    why: str


def decide(t: TrainParams, model_dir: Path, nproc: int) -> BaselineDecision:
    """Whether the baseline trains in this run, and why (the reason lands in train's metrics)."""
    if t.lora16_baseline is False:
        return BaselineDecision(False, "off: train.lora16_baseline is false")
    if nproc > 1:
        return BaselineDecision(False, "off: the baseline trains in one process and train.nproc > 1")
    size = sum(f.stat().st_size for f in safetensors_files(model_dir))
    if t.lora16_baseline == "auto" and size > AUTO_MAX_WEIGHT_BYTES:
        return BaselineDecision(
            False,
            f"off: auto trains it for 16-bit bases of at most {AUTO_MAX_WEIGHT_BYTES / 2**30:.0f} GiB, this one has "
            f"{size / 2**30:.1f} GiB; set train.lora16_baseline: true to train it anyway",
        )
    return BaselineDecision(True, "on" if t.lora16_baseline is True else f"on: auto, {size / 2**20:.0f} MiB base")


def build_lora16_model(model_dir: Path, t: TrainParams, device: torch.device, dtype: torch.dtype) -> tuple[Any, list]:
    """The 16-bit base in the compute dtype + LoRA exactly as the QLoRA model gets it (same seed before injection,
    so the same initial A); returns (model, trainable)."""
    model = cast_parameters(load_16bit_model(model_dir, dtype), dtype, device)
    adapt_for_training(model, t, dtype, device)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    return model, [p for p in model.parameters() if p.requires_grad]


def train_lora16_baseline(
    ctx: StageContext,
    rows: list,
    val_rows: list,
    pad_id: int,
    world: World | None,
    device: torch.device,
    dtype: torch.dtype,
    train_loop: Callable[..., TrainResult],
    save_adapter: Callable[..., None],
) -> dict[str, Any]:
    """The baseline through the train stage's own loop and adapter writer (passed in: they live in the stage), when
    it runs; its adapter goes to `adapter_lora16/`. Returns what it did (or why not) for the metrics."""
    t = ctx.params.train
    decision = decide(t, ctx.parent_dir("prepare") / "model", 1 if world is None else world.size)
    if not decision.runs:
        return {"trained": False, "why": decision.why}
    return_freed_heap()  # the QLoRA model's freed memory, before the 16-bit one (collects garbage first)
    torch.manual_seed(t.seed)
    model, trainable = build_lora16_model(ctx.parent_dir("prepare") / "model", t, device, dtype)
    result = train_loop(ctx, model, trainable, rows, val_rows, pad_id, None, variant="lora16")
    after = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id) if val_rows else None
    save_adapter(ctx, model, ADAPTER)
    log = result.log
    (ctx.out / "train_log_lora16.json").write_text(json.dumps(log, indent=1))
    timed = log[2:] if len(log) > 4 else log
    return {
        "trained": True,
        "why": decision.why,
        "steps": len(log),
        "final_loss": sum(e["loss"] for e in log[-5:]) / max(1, len(log[-5:])),
        "val_loss_after": after["loss"] if after else None,
        "tokens_per_s": sum(e["tokens"] for e in timed) / max(1e-9, sum(e["seconds"] for e in timed)),
    }
