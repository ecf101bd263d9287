"""train: LoRA adapters on the frozen NF4 base, our (paged) AdamW, checkpoints that resume exactly.

Output `artifacts/train/`: `adapter/` in PEFT format (adapter_config.json + adapter_model.safetensors),
`train_log.json` (loss, lr, tokens/s per step), `loss_curve.png`. Only the adapters get gradients and
optimizer state; the 4-bit weights are re-dequantized in the backward pass, never stored.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.architectures import family_of_class
from qlora_pipeline.kernels.dtypes import dtype_name, torch_dtype
from qlora_pipeline.stages.contract.artifacts import Manifest, clean_stale_temps, sha256_json
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.params import Params, TrainParams
from qlora_pipeline.stages.contract.stage import StageContext, StageRecord, execute
from qlora_pipeline.stages.lm.batching import Batch, BatchPlan, token_rows
from qlora_pipeline.stages.lm.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from qlora_pipeline.stages.lm.lm_loss import heldout_loss, summed_loss
from qlora_pipeline.stages.lm.modelio import cast_parameters, pad_token_id, supported_config
from qlora_pipeline.stages.lm.schedule import lr_at, total_steps
from qlora_pipeline.stages.lm.validation import ValidationState
from qlora_pipeline.stages.prepare import PrepareRecord

STAGE = "train"


@dataclass
class TrainRecord(StageRecord):
    resumed_from_step: int | None = None
    """The checkpoint step this run continued from; None for a run from step 0."""


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


def compute_dtype(t: TrainParams, device: torch.device) -> torch.dtype:
    from qlora_pipeline.kernels.linear4bit import default_compute_dtype

    return default_compute_dtype(device) if t.compute_dtype == "auto" else torch_dtype(t.compute_dtype)


def build_model(quantized_dir: Path, t: TrainParams, device: torch.device, dtype: torch.dtype) -> tuple[Any, list]:
    """NF4 base (our loader, no bitsandbytes) + LoRA on the target projections; returns (model, trainable)."""
    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model
    from qlora_pipeline.kernels.lora import inject_lora

    try:
        model = load_4bit_model(quantized_dir, compute_dtype=dtype)
    except ValueError as exc:
        raise InputError(f"cannot load the 4-bit base {quantized_dir}: {exc}") from None
    model = cast_parameters(model, dtype, device)
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
    if t.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


def lora_targets(t: TrainParams, config: dict[str, Any]) -> list[str]:
    """`train.target_modules`, or every projection of the model's family when it is null."""
    if t.target_modules is not None:
        return list(t.target_modules)
    family = family_of_class((config.get("architectures") or [None])[0])
    if family is None:
        raise InputError(f"cannot tell the model family of {config.get('architectures')}; set train.target_modules")
    return list(family.lora_targets)


def check_base_model(model_dir: Path, params: Params) -> None:
    """At prepare: every name in train.target_modules is a projection of this model's family."""
    t = params.train
    found = supported_config(model_dir) if t.target_modules is not None else None
    if found is None:
        return
    family = found[0]
    unknown = [name for name in t.target_modules if name not in family.lora_targets]
    if unknown:
        raise InputError(
            f"train.target_modules names {unknown[0]}, which {family.hf_class} does not have (its projections: "
            f"{', '.join(family.lora_targets)}); list some of those, or set train.target_modules: null for all"
        )


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Turn recomputation on or off per batch: a short batch's activations fit anyway, and the long batches,
    which set the memory peak, still checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and hasattr(module, "_gradient_checkpointing_func"):
            module.gradient_checkpointing = enabled


def make_optimizer(trainable: list, t: TrainParams) -> torch.optim.Optimizer:
    from qlora_pipeline.kernels.optim.adamw import AdamW
    from qlora_pipeline.kernels.optim.paging import PagingConfig

    kind = t.optimizer_kind
    paging = None
    if kind.paged:
        budget = None if t.optimizer_page_budget_mb is None else int(t.optimizer_page_budget_mb * 2**20)
        paging = PagingConfig(budget_bytes=budget)
    return AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, state_bits=kind.state_bits, paging=paging)


def checkpoint_root(ctx: StageContext) -> Path:
    """Keyed by everything that determines the run, so only an identical run resumes from it."""
    key = sha256_json({"train": ctx.params.section("train"), "parents": {k: v.outputs for k, v in ctx.parents.items()}})
    return ctx.artifacts_root / ".checkpoints" / f"train-{key[:16]}"


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    from qlora_pipeline.kernels.lora import lora_state_dict

    return lora_state_dict(model)


def restore_adapter(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        params[k].data.copy_(v)


def resume(
    ctx: StageContext, model: Any, opt: torch.optim.Optimizer, ckpt_root: Path
) -> tuple[int, list, list, ValidationState]:
    """(start step, losses, log, validation state) from the last complete checkpoint of this exact run, or a fresh
    start."""
    clean_stale_temps(ckpt_root)  # a checkpoint a killed run was still writing
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return 0, [], [], ValidationState()
    tensors, state = load_checkpoint(last, opt)
    restore_adapter(model, tensors)
    ctx.record = TrainRecord(resumed_from_step=state.step)
    validation = ValidationState.from_json(state.extra.get("validation"), state.best_adapter)
    return state.step, state.losses, state.extra.get("log", []), validation


def accumulate_gradients(model: Any, batches: list[Batch], t: TrainParams, step: int, device: torch.device) -> Any:
    """Backward over the step's micro-batches, each loss divided by the step's target tokens; returns the summed
    loss, still on the device."""
    n_target = sum(b.n_target_tokens for b in batches)
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    for b in batches:
        b = b.to(device)
        if t.gradient_checkpointing:
            set_checkpointing(model, b.input_ids.numel() >= t.checkpoint_min_tokens)
        try:
            total, _ = summed_loss(model, b)
            loss = total / max(n_target, 1)
            loss.backward()
        except (torch.OutOfMemoryError, MemoryError):
            raise PipelineError(
                f"out of memory at step {step + 1} on a batch of {b.n_examples} examples "
                f"({' × '.join(map(str, b.input_ids.shape))} tokens); lower "
                "train.batch_size (and raise train.grad_accum to keep the effective batch), lower "
                "data.max_length, or set train.optimizer_page_budget_mb to page optimizer state; the run "
                "resumes from its last checkpoint"
            ) from None
        step_loss += loss.detach()
    return step_loss


def batch_plan(params: Params, rows: list) -> BatchPlan:
    """train.batch_size examples per batch: packed into rows of at most data.max_length tokens (or the longest
    example, should the data hold a longer one), or one length-grouped example per row."""
    t = params.train
    lengths = [len(ids) for ids, _ in rows]
    pack_to = max([params.data.max_length, *lengths]) if t.packing else None
    return BatchPlan(lengths, t.batch_size, t.seed, pack_to)


def train_loop(ctx: StageContext, model: Any, trainable: list, rows: list, val_rows: list, pad_id: int) -> TrainResult:
    from tqdm import tqdm

    t = ctx.params.train
    device = next(p.device for p in trainable)
    opt = make_optimizer(trainable, t)
    ckpt_root = checkpoint_root(ctx)
    start, losses, log, validation = resume(ctx, model, opt, ckpt_root)
    plan = batch_plan(ctx.params, rows)
    stream = plan.stream(start=start * t.grad_accum)
    model.train()
    total = total_steps(t, len(rows))
    bar = tqdm(range(start, total), desc="train", initial=start, total=total)
    for step in bar:
        lr = lr_at(step, t, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batches = [plan.collate(next(stream), rows, pad_id) for _ in range(t.grad_accum)]
        step_loss = accumulate_gradients(model, batches, t, step, device)
        norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        # The step's one read back to the host (for the log and the checks); everything before it stays queued.
        step_value, grad_norm = torch.stack([step_loss, norm.float()]).tolist()
        # Both checks come before the update, so NaN weights never reach a checkpoint.
        if not math.isfinite(step_value):
            raise non_finite("training loss", step_value, step, lr, ckpt_root)
        if not math.isfinite(grad_norm):
            raise non_finite("gradient norm", grad_norm, step, lr, ckpt_root)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens = sum(b.n_tokens for b in batches)
        losses.append(step_value)
        log.append(
            {
                "step": step + 1,
                "loss": step_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "seconds": dt,
                "tokens": tokens,
                "padded_tokens": sum(b.input_ids.numel() for b in batches),
                "tokens_per_s": tokens / dt,
                "target_tokens": sum(b.n_target_tokens for b in batches),
            }
        )
        metrics = {"loss": step_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "step_s": dt}
        ctx.tracker.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=step + 1)
        bar.set_postfix(loss=f"{step_value:.3f}", tok_s=f"{tokens / dt:.0f}")
        if t.eval_every and (step + 1) % t.eval_every == 0:
            val_loss = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id)["loss"]
            model.train()
            validation.record(step + 1, val_loss, adapter_tensors(model))
            ctx.tracker.log_metrics({"train.val_loss": val_loss}, step=step + 1)
        stop = validation.should_stop(t.early_stopping_patience)
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < total and not stop:
            extra = {"log": log, "validation": validation.to_json()}
            save_checkpoint(ckpt_root, step + 1, adapter_tensors(model), opt, losses, extra, validation.best_adapter)
        if stop:
            break
    # Checkpoints go only once the adapter artifact is published; a crash before that resumes from them.
    ctx.after_publish.append(lambda: shutil.rmtree(ckpt_root, ignore_errors=True))
    if validation.best_adapter is not None:  # the best validated adapter is the one trained
        restore_adapter(model, validation.best_adapter)
    paging = getattr(opt, "paging_stats", None)
    return TrainResult(log=log, paging=paging() if callable(paging) else None, validation=validation)


def plot_losses(log: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    steps, losses = [e["step"] for e in log], [e["loss"] for e in log]
    ax.plot(steps, losses, lw=0.8, alpha=0.45, label="per step")
    window = 5
    if len(losses) >= window:
        smooth = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(steps[window - 1 :], smooth, lw=1.8, label=f"{window}-step mean")
        ax.legend(frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (reply tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_adapter(ctx: StageContext, model: Any) -> None:
    """The adapter in PEFT format, with the sha256 of the base weights it was trained on (merge checks them)."""
    from qlora_pipeline.kernels.formats.peft_adapter import save_peft_adapter

    t = ctx.params.train
    save_peft_adapter(
        model,
        ctx.out / "adapter",
        base_model_name_or_path=PrepareRecord.of(ctx.parents["prepare"]).base_model_id,
        target_modules=lora_targets(t, model.config.to_dict()),
        r=t.lora_r,
        alpha=t.lora_alpha,
        dropout=t.lora_dropout,
        use_rslora=t.use_rslora,
    )
    weights = {
        k.removeprefix("model/"): v
        for k, v in ctx.parents["prepare"].outputs.items()
        if k.startswith("model/") and k.endswith(".safetensors")
    }
    (ctx.out / "adapter" / "base_model.json").write_text(
        json.dumps({"base_model": "artifacts/prepare/model", "weights_sha256": weights}, indent=1)
    )


def body(ctx: StageContext) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    t = ctx.params.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    prep = ctx.parent_dir("prepare")
    tok = AutoTokenizer.from_pretrained(prep / "model")
    pad_id = pad_token_id(tok)
    data = datasets.load_from_disk(str(prep / "data"))
    rows, val_rows = token_rows(data["train"]), token_rows(data["validation"])
    if t.eval_every and not val_rows:
        raise InputError("train.eval_every needs a validation split; set data.val_fraction above 0")
    if len(rows) < t.batch_size:
        raise InputError(
            f"train.batch_size={t.batch_size} is larger than the {len(rows)} training examples; lower train.batch_size"
        )
    device = torch.device(ctx.device)
    dtype = compute_dtype(t, device)
    model, trainable = build_model(ctx.parent_dir("quantize") / "model", t, device, dtype)
    n_trainable = sum(p.numel() for p in trainable)
    before = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id) if val_rows else None
    result = train_loop(ctx, model, trainable, rows, val_rows, pad_id)
    after = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id) if val_rows else None

    save_adapter(ctx, model)
    log = result.log
    (ctx.out / "train_log.json").write_text(json.dumps(log, indent=1))
    plot_losses(log, ctx.out / "loss_curve.png", f"LoRA r={t.lora_r} on NF4, {t.optimizer}")
    ctx.tracker.log_artifact(ctx.out / "loss_curve.png")
    timed = log[2:] if len(log) > 4 else log
    metrics = {
        "steps": len(log),
        "trainable_params": n_trainable,
        "first_loss": log[0]["loss"] if log else None,
        "final_loss": sum(e["loss"] for e in log[-5:]) / max(1, len(log[-5:])),
        "median_step_s": sorted(e["seconds"] for e in timed)[len(timed) // 2] if timed else None,
        "tokens_per_s": sum(e["tokens"] for e in timed) / max(1e-9, sum(e["seconds"] for e in timed)),
        "padding_share": round(
            1 - sum(e["tokens"] for e in log) / max(1, sum(e.get("padded_tokens", e["tokens"]) for e in log)), 4
        ),
        "compute_dtype": dtype_name(dtype),
        "device": str(device),
        "val_loss_before": before["loss"] if before else None,
        "val_loss_after": after["loss"] if after else None,
    }
    if result.paging:
        metrics["optimizer_paging"] = result.paging
    if t.eval_every:
        v = result.validation
        metrics |= {
            "best_step": v.best_step,
            "best_val_loss": v.best_loss,
            "stopped_early": len(log) < total_steps(t, len(rows)),
        }
    return metrics


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
