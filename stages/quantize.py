"""quantize: the frozen base's linear weights → NF4 + double quant, in the bitsandbytes checkpoint layout.

Output `artifacts/quantize/`: `model/` (config.json with quantization_config, bnb-layout safetensors,
tokenizer) that transformers+bitsandbytes and our own loader both load; `layer_errors.json`.
Embeddings, norms and lm_head stay 16-bit. With `quantize.loftq_iters` > 0 the LoRA targets are quantized by LoftQ
(`stages/lm/lora_plan.py`) and `loftq_adapter/` (PEFT format) holds the adapter training starts from, with
`loftq_errors.json` (each target's step-0 error, LoftQ vs plain NF4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.artifacts import Manifest
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.stage import StageContext, execute
from qlora_pipeline.stages.lm.lora_plan import LOFTQ_ADAPTER, LoftQCollector
from qlora_pipeline.stages.lm.modelio import read_config

STAGE = "quantize"


def check_base_model(model_dir: Path, params: Params) -> None:
    """At prepare: the weights quantize will read are safetensors files of the model folder (an index naming a path
    outside it is refused)."""
    from qlora_pipeline.kernels.formats.hf_folder import INDEX_FILE, weight_files

    if not (model_dir / "config.json").is_file() or not (model_dir / INDEX_FILE).is_file():
        return  # prepare reports a missing config or missing weights itself
    try:
        weight_files(model_dir)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"base model: {exc}") from None


def body(ctx: StageContext) -> dict[str, Any]:
    from qlora_pipeline.kernels.formats.bnb_loader import save_4bit_checkpoint

    q = ctx.params.quantize
    src = ctx.parent_dir("prepare") / "model"
    compute = "bfloat16" if q.compute_dtype == "auto" else q.compute_dtype
    loftq = LoftQCollector.of(ctx.params.train, read_config(src), q.loftq_iters, q.blocksize)
    try:
        stats = save_4bit_checkpoint(
            src, ctx.out / "model", blocksize=q.blocksize, compute_dtype=compute, quantizer=loftq
        )
    except ValueError as exc:
        raise InputError(f"cannot quantize {src}: {exc}") from None
    layers = stats.pop("layers")
    (ctx.out / "layer_errors.json").write_text(json.dumps(layers, indent=1, sort_keys=True))
    worst = max(layers.items(), key=lambda kv: kv[1]["rel_error"])
    metrics: dict[str, Any] = {
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()},
        "worst_layer": worst[0],
        "compression": round(stats["total_bytes_before"] / max(1, stats["total_bytes_after"]), 3),
    }
    if loftq is not None:
        loftq.write_adapter(ctx.out / LOFTQ_ADAPTER, "artifacts/quantize/model")
        (ctx.out / "loftq_errors.json").write_text(json.dumps(loftq.errors, indent=1, sort_keys=True))
        metrics["loftq"] = loftq.summary()
    return metrics


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
