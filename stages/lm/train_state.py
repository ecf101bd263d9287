"""Where training state lives between runs: the checkpoint folder of a run, the adapter as this process holds it,
and resuming from the newest checkpoint that verifies (stages/lm/checkpoints.py writes and reads them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.stages.contract.artifacts import clean_stale_temps, sha256_json
from qlora_pipeline.stages.contract.stage import StageContext
from qlora_pipeline.stages.lm.checkpoints import load_checkpoint, step_dir, usable_checkpoints
from qlora_pipeline.stages.lm.distributed import World, local
from qlora_pipeline.stages.lm.validation import ValidationState

log = logging.getLogger(__name__)


def checkpoint_root(ctx: StageContext, world: World | None = None) -> Path:
    """Keyed by everything that determines the run (train.nproc included), so only an identical run resumes from
    it; one folder per rank when several train."""
    key = sha256_json({"train": ctx.params.section("train"), "parents": {k: v.outputs for k, v in ctx.parents.items()}})
    root = ctx.artifacts_root / ".checkpoints" / f"train-{key[:16]}"
    return root if world is None else root / f"rank{world.rank}"


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapter as this process holds it (its shards under fsdp)."""
    from qlora_pipeline.kernels.lora import lora_state_dict

    return {k: local(v) for k, v in lora_state_dict(model).items()}


def restore_adapter(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        local(params[k].data).copy_(v)


@dataclass
class Resumed:
    """Where a run continues: step 0 with nothing, or the state of the checkpoint it resumed from."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    validation: ValidationState = field(default_factory=ValidationState)
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints passed over as damaged, with what was wrong."""


def resume(model: Any, opt: torch.optim.Optimizer, ckpt_root: Path, world: World | None) -> Resumed:
    """The newest checkpoint of this exact run whose files verify, restored into the model and optimizer; a fresh
    start without one. Several ranks restart at the newest step every one of them saved (a killed rank may lag by
    one)."""
    clean_stale_temps(ckpt_root)  # a checkpoint a killed run was still writing
    usable, skipped = usable_checkpoints(ckpt_root)
    last = usable[0] if usable else None
    if world is not None:
        step = world.min_int(0 if last is None else int(last.name.split("-")[1]), torch.device("cpu"))
        last = next((p for p in usable if p == step_dir(ckpt_root, step)), None)
    for line in skipped:
        log.warning("damaged checkpoint %s skipped; resuming from %s", line, last.name if last else "step 0")
    if last is None:
        return Resumed(skipped=skipped)
    tensors, state = load_checkpoint(last, opt)
    restore_adapter(model, tensors)
    validation = ValidationState.from_json(state.extra.get("validation"), state.best_adapter)
    return Resumed(state.step, state.losses, state.extra.get("log", []), validation, skipped)
