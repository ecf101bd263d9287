"""Where training state lives between runs: the checkpoint folder of a run, the adapter as this process holds it,
and resuming from the newest checkpoint that verifies (stages/lm/checkpoints.py writes and reads them); what a
training run reports (`TrainRecord`, `TrainResult`) and how it stops on a non-finite loss."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.optim.adamw import local_shard
from qlora_pipeline.stages.contract.artifacts import clean_stale_temps, sha256_json
from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.contract.stage import StageContext, StageRecord
from qlora_pipeline.stages.lm.checkpoints import latest_checkpoint, load_checkpoint, step_dir, usable_checkpoints
from qlora_pipeline.stages.lm.distributed import World
from qlora_pipeline.stages.lm.validation import ValidationState

log = logging.getLogger(__name__)


@dataclass
class TrainRecord(StageRecord):
    resumed_from_step: int | None = None
    """The checkpoint step this run continued from; None for a run from step 0."""
    skipped_checkpoints: list[str] = field(default_factory=list)
    """Newer checkpoints found damaged (truncated, edited) and passed over, with what was wrong."""
    started_over: str | None = None
    """Why checkpoints of an earlier, interrupted run could not be continued (what changed), if there were any."""
    recompute_budget_tokens: int | None = None
    """train.checkpoint_min_tokens as this run applied it (auto resolved on its device); None without gradient
    checkpointing."""


@dataclass
class TrainResult:
    log: list[dict[str, float]]
    """One entry per step: loss, lr, grad norm, seconds, tokens."""
    paging: dict[str, Any] | None
    """The optimizer's paging statistics, for paged optimizers."""
    validation: ValidationState


class NonFiniteLoss(PipelineError):
    """The loss became NaN or Inf; the last good checkpoint is kept for inspection or resume."""


def non_finite(what: str, value: float, step: int, lr: float, ckpt_root: Path) -> NonFiniteLoss:
    where = latest_checkpoint(ckpt_root)
    kept = f"the last good checkpoint is {where}" if where else "no checkpoint was written yet"
    return NonFiniteLoss(
        f"{what} became {value} at step {step + 1} (lr {lr:.3g}); {kept}; lower train.learning_rate or check the "
        "data, then run train again to resume"
    )


RESUMABLE = (
    "learning_rate",
    "lr_schedule",
    "warmup_ratio",
    "max_steps",
    "epochs",
    "eval_every",
    "early_stopping_patience",
    "checkpoint_every",
)
"""train params a run may change and still continue from its checkpoints: the schedule and the length of the run
(what the NaN and out-of-memory messages tell a user to change before resuming). With packing, batch_size and
grad_accum may change too while their product (examples per step) stays: the same examples make each step."""


def run_identity(ctx: StageContext) -> dict[str, Any]:
    """What a checkpoint must share with this run to continue it: the train params except the resumable ones, the
    parent artifacts, and the code of the stage (its numerics)."""
    from qlora_pipeline.stages.contract.codedeps import code_hash
    from qlora_pipeline.stages.contract.registry import STAGES

    train = {k: v for k, v in ctx.params.section("train").items() if k not in RESUMABLE}
    if train.get("packing"):
        train["examples_per_step"] = train.pop("batch_size") * train.pop("grad_accum")
    parents = {k: v.outputs for k, v in ctx.parents.items()}
    return {"train": train, "parents": sha256_json(parents), "code": code_hash(STAGES[ctx.stage].code())}


def checkpoint_root(ctx: StageContext, identity: dict[str, Any], world: World | None = None) -> Path:
    """Keyed by the run's identity (`run_identity`, train.nproc included), so only a run that can continue them
    resumes from them; one folder per rank when several train."""
    key = sha256_json(identity)
    root = ctx.artifacts_root / ".checkpoints" / f"train-{key[:16]}"
    return root if world is None else root / f"rank{world.rank}"


def record_identity(ctx: StageContext, identity: dict[str, Any]) -> None:
    """Write the run's identity next to its checkpoints (so a later run can say why it cannot continue them)."""
    root = checkpoint_root(ctx, identity)
    root.mkdir(parents=True, exist_ok=True)
    (root / IDENTITY).write_text(json.dumps(identity, sort_keys=True))


IDENTITY = "run.json"


def why_not_resumed(ctx: StageContext, mine: dict[str, Any]) -> str | None:
    """When checkpoints of another run are on disk: which of its train params, parents or code differ from this
    run's identity (`mine`), so starting over is said, not silent."""
    root = checkpoint_root(ctx, mine)
    for other in sorted((ctx.artifacts_root / ".checkpoints").glob(f"train-*/{IDENTITY}")):
        if other.parent == root or not any(other.parent.glob("**/step-*")):
            continue
        theirs = json.loads(other.read_text())
        if theirs.get("variant") != mine.get("variant"):
            continue  # the 16-bit baseline's checkpoints never continue the QLoRA run, nor the other way round
        changed = [
            f"train.{k} {theirs['train'].get(k)!r} -> {mine['train'].get(k)!r}"
            for k in sorted(set(mine["train"]) | set(theirs["train"]))
            if mine["train"].get(k) != theirs["train"].get(k)
        ]
        changed += ["the parent artifacts"] * (theirs["parents"] != mine["parents"])
        changed += ["the training code"] * (theirs["code"] != mine["code"])
        why = f"checkpoints of an earlier run in {other.parent.name} cannot continue this one ({', '.join(changed)})"
        log.warning("starting over: %s", why)
        return why
    return None


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The adapter as this process holds it (its shards under fsdp)."""
    from qlora_pipeline.kernels.lora import lora_state_dict

    return {k: local_shard(v) for k, v in lora_state_dict(model).items()}


def restore_adapter(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        local_shard(params[k].data).copy_(v)


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
        step = world.min_int(0 if last is None else int(last.name.split("-")[1]))
        last = next((p for p in usable if p == step_dir(ckpt_root, step)), None)
    for line in skipped:
        log.warning("damaged checkpoint %s skipped; resuming from %s", line, last.name if last else "step 0")
    if last is None:
        return Resumed(skipped=skipped)
    tensors, state = load_checkpoint(last, opt)
    restore_adapter(model, tensors)
    validation = ValidationState.from_json(state.extra.get("validation"), state.best_adapter)
    return Resumed(state.step, state.losses, state.extra.get("log", []), validation, skipped)
