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
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.dtypes import compute_dtype_of, dtype_name
from qlora_pipeline.kernels.linear4bit import Linear4bit, cache_dequantized_weights, cached_weight_bytes
from qlora_pipeline.kernels.lora_copies import ComputeCopies
from qlora_pipeline.stages.contract.artifacts import Manifest
from qlora_pipeline.stages.contract.cpu_kernels import enable as enable_cpu_kernels
from qlora_pipeline.stages.contract.device import bound_cpu_kernel_caches, check_nproc
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.host_heap import bound_host_heap
from qlora_pipeline.stages.contract.params import Params, TrainParams
from qlora_pipeline.stages.contract.recompute_budget import RecomputeBudget
from qlora_pipeline.stages.contract.stage import StageContext, execute, follow
from qlora_pipeline.stages.lm.batching import Batch, BatchPlan, target_count, token_rows
from qlora_pipeline.stages.lm.checkpoints import save_checkpoint
from qlora_pipeline.stages.lm.distributed import (
    StepBatches,
    World,
    backward_scale,
    full_value,
    gradient_sync,
    launch,
    next_step,
    parameter_bytes,
    shard_model,
    sum_gradients,
    whole_parameters,
)
from qlora_pipeline.stages.lm.lm_loss import heldout_loss, summed_loss
from qlora_pipeline.stages.lm.lora16 import train_lora16_baseline
from qlora_pipeline.stages.lm.lora_plan import LOFTQ_ADAPTER, adapt_for_training, lora_targets
from qlora_pipeline.stages.lm.modelio import cast_parameters, pad_token_id, supported_config
from qlora_pipeline.stages.lm.recompute import enable_checkpointing, recompute_budget_of, set_recompute
from qlora_pipeline.stages.lm.report import plot_losses
from qlora_pipeline.stages.lm.schedule import lr_at, total_steps
from qlora_pipeline.stages.lm.train_state import (
    TrainRecord,
    TrainResult,
    adapter_tensors,
    checkpoint_root,
    non_finite,
    record_identity,
    restore_adapter,
    resume,
    run_identity,
    why_not_resumed,
)
from qlora_pipeline.stages.prepare import PrepareRecord

STAGE = "train"


def compute_dtype(t: TrainParams, device: torch.device) -> torch.dtype:
    return compute_dtype_of(t.compute_dtype, device)


def build_model(quantized_dir: Path, t: TrainParams, device: torch.device, dtype: torch.dtype) -> tuple[Any, list]:
    """NF4 base (our loader, no bitsandbytes) + LoRA on the target projections, started as PEFT starts it or, after
    a LoftQ quantize, from its starting adapter; returns (model, trainable)."""
    from qlora_pipeline.kernels.formats.bnb_loader import load_4bit_model
    from qlora_pipeline.stages.contract.memory_plan import weight_cache_budget

    bound_cpu_kernel_caches()
    bound_host_heap()
    if device.type == "cpu":
        enable_cpu_kernels()  # the compiled dropout masks and 8-bit AdamW, built and probed here once per machine
    try:
        model = load_4bit_model(quantized_dir, compute_dtype=dtype)
    except ValueError as exc:
        raise InputError(f"cannot load the 4-bit base {quantized_dir}: {exc}") from None
    model = cast_parameters(model, dtype, device)
    adapt_for_training(model, t, dtype, device)
    start = quantized_dir.parent / LOFTQ_ADAPTER
    if start.is_dir():  # LoftQ: start where quantize left the adapter (base + adapter ≈ the 16-bit weights)
        from qlora_pipeline.kernels.formats.peft_adapter import load_peft_adapter

        try:
            load_peft_adapter(model, start)
        except ValueError as exc:
            raise InputError(f"the LoftQ start in {start} does not fit this LoRA: {exc}; re-run quantize") from None
    cache_dequantized_weights(model, weight_cache_budget(t, device.type), dtype)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable


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


def make_optimizer(trainable: list, t: TrainParams) -> torch.optim.Optimizer:
    from qlora_pipeline.kernels.optim.adamw import AdamW
    from qlora_pipeline.kernels.optim.paging import PagingConfig

    kind = t.optimizer_kind
    paging = None
    if kind.paged:
        budget = None if t.optimizer_page_budget_mb is None else int(t.optimizer_page_budget_mb * 2**20)
        paging = PagingConfig(budget_bytes=budget)
    return AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, state_bits=kind.state_bits, paging=paging)


def accumulate_gradients(
    model: Any,
    work: StepBatches,
    budget: RecomputeBudget | None,
    step: int,
    device: torch.device,
    world: World | None,
    copies: ComputeCopies,
) -> Any:
    """Backward over the step's micro-batches, each loss divided by the step's target tokens (over every rank),
    with A and B in the compute dtype copied once for the step (`copies`); returns this process's summed loss,
    still on the device."""
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    n_target, scale = max(work.n_target, 1), backward_scale(world)
    with copies.fresh():
        for k, b in enumerate(work.batches):
            b = b.to(device)
            gradient_sync(model, world, last=k == len(work.batches) - 1)
            set_recompute(model, budget, b)
            try:
                total, _ = summed_loss(model, b)
                loss = total / n_target
                (loss * scale if scale != 1 else loss).backward()
            except (torch.OutOfMemoryError, MemoryError):
                raise out_of_memory(step, b, budget) from None
            step_loss += loss.detach()
    return step_loss


def out_of_memory(step: int, b: Batch, budget: RecomputeBudget | None) -> PipelineError:
    """The one-line error of a step that ran out of memory: the batch, and each setting that lowers the peak."""
    recompute = (
        f"set train.checkpoint_min_tokens below {budget.tokens} (0: every layer recomputes), "
        if budget and budget.tokens
        else ""
    )
    return PipelineError(
        f"out of memory at step {step + 1} on a batch of {b.n_examples} examples "
        f"({' × '.join(map(str, b.input_ids.shape))} tokens); lower "
        "train.batch_size (and raise train.grad_accum to keep the effective batch), lower "
        f"data.max_length, {recompute}or set train.optimizer_page_budget_mb to page optimizer state; the run "
        "resumes from its last checkpoint"
    )


def batch_plan(params: Params, rows: list) -> BatchPlan:
    """train.batch_size examples per batch: packed into rows of at most data.max_length tokens (or the longest
    example, should the data hold a longer one), or one length-grouped example per row."""
    t = params.train
    lengths = [len(ids) for ids, _ in rows]
    pack_to = max([params.data.max_length, *lengths]) if t.packing else None
    return BatchPlan(lengths, t.batch_size, t.seed, pack_to)


def train_loop(
    ctx: StageContext,
    model: Any,
    trainable: list,
    rows: list,
    val_rows: list,
    pad_id: int,
    world: World | None,
    variant: str = "qlora",
) -> TrainResult:
    """The training loop; `variant` "lora16" is the 16-bit baseline run by this same loop (its own checkpoints and
    MLflow metric names)."""
    from tqdm import tqdm

    t = ctx.params.train
    device = next(p.device for p in trainable)
    opt = make_optimizer(trainable, t)
    identity = run_identity(ctx)  # params, parents and code: what a checkpoint must share to be continued
    if variant != "qlora":
        identity["variant"] = variant
    ckpt_root = checkpoint_root(ctx, identity, world)
    resumed = resume(model, opt, ckpt_root, world)
    start, losses, log, validation = resumed.step, resumed.losses, resumed.log, resumed.validation
    started_over = None if resumed.step else why_not_resumed(ctx, identity)
    if variant == "qlora":
        ctx.record = TrainRecord(resumed.step or None, resumed.skipped, started_over)
    prefix = "train" if variant == "qlora" else variant
    if world is None or world.main:
        record_identity(ctx, identity)
    plan = batch_plan(ctx.params, rows)
    budget = recompute_budget_of(model, ctx.params, device)
    if variant == "qlora" and budget is not None:
        ctx.record.recompute_budget_tokens = budget.tokens
    targets = [target_count(labels) for _, labels in rows]
    stream = plan.stream(start=start * t.grad_accum)
    model.train()
    copies = ComputeCopies(model)
    total = total_steps(t, len(rows))
    quiet = world is not None and not world.main
    bar = tqdm(range(start, total), desc=prefix, initial=start, total=total, disable=quiet)
    for step in bar:
        lr = lr_at(step, t, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        work = next_step(plan, stream, rows, targets, pad_id, world, t.grad_accum)
        step_loss = accumulate_gradients(model, work, budget, step, device, world, copies)
        sum_gradients(trainable, world)
        norm = full_value(torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm))
        step_loss = step_loss if world is None else world.sum(step_loss)
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
        losses.append(step_value)
        log.append(
            {
                "step": step + 1,
                "loss": step_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "seconds": dt,
                "tokens": work.tokens,
                "padded_tokens": work.padded_tokens,
                "tokens_per_s": work.tokens / dt,
                "target_tokens": work.n_target,
            }
        )
        metrics = {"loss": step_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": work.tokens / dt, "step_s": dt}
        ctx.tracker.log_metrics({f"{prefix}.{k}": v for k, v in metrics.items()}, step=step + 1)
        bar.set_postfix(loss=f"{step_value:.3f}", tok_s=f"{work.tokens / dt:.0f}")
        if t.eval_every and (step + 1) % t.eval_every == 0:
            val_loss = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id)["loss"]
            model.train()
            validation.record(step + 1, val_loss, adapter_tensors(model))
            ctx.tracker.log_metrics({f"{prefix}.val_loss": val_loss}, step=step + 1)
        stop = validation.should_stop(t.early_stopping_patience)
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < total and not stop:
            extra = {"log": log, "validation": validation.to_json()}
            save_checkpoint(ckpt_root, step + 1, adapter_tensors(model), opt, losses, extra, validation.best_adapter)
        if stop:
            break
    # Checkpoints go only once the adapter artifact is published; a crash before that resumes from them.
    ctx.after_publish.append(lambda: shutil.rmtree(checkpoint_root(ctx, identity), ignore_errors=True))
    if validation.best_adapter is not None:  # the best validated adapter is the one trained
        restore_adapter(model, validation.best_adapter)
    paging = getattr(opt, "paging_stats", None)
    return TrainResult(log=log, paging=paging() if callable(paging) else None, validation=validation)


def save_adapter(ctx: StageContext, model: Any, folder: str = "adapter") -> None:
    """The adapter in PEFT format, with the sha256 of the base weights it was trained on (merge checks them)."""
    from qlora_pipeline.kernels.formats.peft_adapter import save_peft_adapter

    t = ctx.params.train
    save_peft_adapter(
        model,
        ctx.out / folder,
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
    (ctx.out / folder / "base_model.json").write_text(
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
    world = World.from_env(t.distributed)
    device = torch.device(ctx.device) if world is None else world.device(torch.device(ctx.device))
    dtype = compute_dtype(t, device)
    model, trainable = build_model(ctx.parent_dir("quantize") / "model", t, device, dtype)
    if world is not None:
        world.start(device)
        shard_model(model, world, device)
        trainable = [p for p in model.parameters() if p.requires_grad]  # fully_shard made them DTensors
        torch.manual_seed(t.seed + world.rank)  # each rank its own dropout masks
    n_trainable = sum(p.numel() for p in trainable)
    before = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id) if val_rows else None
    result = train_loop(ctx, model, trainable, rows, val_rows, pad_id, world)
    after = heldout_loss(model, val_rows, ctx.params.evaluate.batch_size, pad_id) if val_rows else None

    with whole_parameters(model):
        if world is None or world.main:
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
        "nproc": 1 if world is None else world.size,
        "nf4_bytes_per_rank": parameter_bytes(model, Linear4bit),
        "frozen_weight_cache_mb": round(cached_weight_bytes(model) / 2**20, 1),
    }
    if world is not None:
        metrics["distributed"] = world.mode
    if result.paging:
        metrics["optimizer_paging"] = result.paging
    del model, trainable
    loops = (train_loop, save_adapter)
    metrics["lora16"] = train_lora16_baseline(ctx, rows, val_rows, pad_id, world, device, dtype, *loops)
    if t.eval_every:
        v = result.validation
        metrics |= {
            "best_step": v.best_step,
            "best_val_loss": v.best_loss,
            "stopped_early": len(log) < total_steps(t, len(rows)),
        }
    return metrics


def run(params: Params, parent_run_id: str | None = None) -> Manifest | None:
    """Train on this process, or on train.nproc processes that torchrun starts (each running this function again);
    the manifest comes from rank 0, which alone publishes (None on the other ranks)."""
    world = World.from_env(params.train.distributed)
    if world is None:
        nproc = check_nproc(params)
        if nproc > 1:
            return launch(STAGE, params, nproc, parent_run_id)
        return execute(STAGE, params, body, parent_run_id)
    try:
        if world.main:
            return execute(STAGE, params, body, parent_run_id)
        follow(STAGE, params, body)
        return None
    finally:
        world.stop()
