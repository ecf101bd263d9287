"""merge: the adapter folded into the ORIGINAL 16-bit weights, `W16 + s·B·A`, as a plain HF folder.

Merging into dequantized NF4 would bake the quantization error into the served model (the field's
consensus, and the reason peft warns on 4-bit merges); the adapter was trained to correct the NF4 base, so
the original weights plus the delta are the closest 16-bit model to what was trained and evaluated.
The exception is a LoftQ run (`quantize.loftq_iters` > 0): there the adapter starts as `W − Q` and keeps carrying
it, so adding it to `W` would count that part twice; each LoftQ projection is merged into its dequantized NF4
weight `Q` instead (the base it was trained against), every other weight stays original. `metrics.base` says which.
Output `artifacts/merge/model/` loads with plain transformers: no peft, no bitsandbytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_pipeline.kernels.dtypes import torch_dtype
from qlora_pipeline.kernels.lora import lora_delta_weight, merged_weight
from qlora_pipeline.stages.contract.artifacts import Manifest
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.stage import StageContext, execute
from qlora_pipeline.stages.lm.modelio import TOKENIZER_FILES, safetensors_files

STAGE = "merge"


def adapter_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict[str, Any]]:
    """{base weight key: (A, B)} and the scaling, read from a PEFT-format LoRA adapter."""
    from qlora_pipeline.kernels.formats.peft_adapter import lora_weight_pairs, read_adapter_config, read_adapter_tensors

    try:
        cfg = read_adapter_config(adapter_dir)
        tensors = read_adapter_tensors(adapter_dir, cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise InputError(f"cannot read the adapter in {adapter_dir}: {exc}") from None
    deltas = lora_weight_pairs(tensors)
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    return deltas, float(cfg.scaling), raw


def merge_state_dict(
    base: dict[str, torch.Tensor],
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """W + s·B·A in fp32, cast once to `dtype` (`kernels.lora.merged_weight`); returns the new tensors and the
    relative delta norm per layer."""
    missing = sorted(set(deltas) - set(base))
    if missing:
        raise InputError(
            f"the adapter targets {missing[0]} but the base model has no such weight; the adapter "
            "belongs to another model architecture"
        )
    out: dict[str, torch.Tensor] = {}
    rel: dict[str, float] = {}
    for key, w in base.items():
        if key in deltas:
            a, b = deltas[key]
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise InputError(
                    f"adapter shapes for {key} give a {b.shape[0]}×{a.shape[1]} update but the base "
                    f"weight is {tuple(w.shape)}; the adapter was trained for another base model"
                )
            delta = lora_delta_weight(a, b, scaling)
            rel[key] = float(delta.norm() / w.float().norm().clamp(min=1e-12))
            out[key] = merged_weight(w, delta=delta, dtype=dtype).contiguous()
        else:
            out[key] = w.to(dtype).contiguous() if w.is_floating_point() else w
    return out, rel


def merge_shards(
    base_dir: Path,
    out: Path,
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    dtype: torch.dtype,
    replaced: Callable[[str], torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Merge one base tensor at a time into output shards no larger than the base's largest (with an index when there
    are several; one `model.safetensors` when one holds all), so peak memory is one tensor and one output shard, not
    the model; returns the relative update per layer. `replaced(key)`, when not None, is the base weight to merge
    into instead of the file's (LoftQ's dequantized NF4)."""
    from qlora_pipeline.kernels.formats.hf_folder import LazyTensors, ShardWriter

    files = safetensors_files(base_dir)
    source = LazyTensors(base_dir)  # header reads only, so a wrong adapter fails before any tensor is loaded
    missing = set(deltas) - set(source.names())
    if missing:
        raise InputError(
            f"the adapter targets {sorted(missing)[0]} but the base model has no such weight; the adapter "
            "belongs to another model architecture"
        )
    writer = ShardWriter(out, max(f.stat().st_size for f in files))
    rel: dict[str, float] = {}
    for key in source.names():
        swap = None if replaced is None else replaced(key)
        base = source.read([key]) if swap is None else {key: swap}
        merged, one_rel = merge_state_dict(base, {key: deltas[key]} if key in deltas else {}, scaling, dtype)
        writer.add(key, merged[key])
        rel.update(one_rel)
        del base, merged
    writer.finish()
    return rel


def loftq_bases(quantize_dir: Path) -> Callable[[str], torch.Tensor | None] | None:
    """For a LoftQ run, `key -> dequantized NF4 weight` for the projections LoftQ quantized (None for the rest);
    None for a plain run."""
    from qlora_pipeline.kernels.formats.bnb_folder import load_nf4_state_dict
    from qlora_pipeline.kernels.formats.hf_folder import LazyTensors
    from qlora_pipeline.kernels.formats.peft_adapter import lora_weight_pairs, read_adapter_config, read_adapter_tensors
    from qlora_pipeline.kernels.nf4 import dequantize_nf4
    from qlora_pipeline.stages.lm.lora_plan import LOFTQ_ADAPTER

    start = quantize_dir / LOFTQ_ADAPTER
    if not start.is_dir():
        return None
    keys = set(lora_weight_pairs(read_adapter_tensors(start, read_adapter_config(start))))
    source = LazyTensors(quantize_dir / "model")
    names = source.names()

    def base(key: str) -> torch.Tensor | None:  # one projection's NF4 tensors read when merge reaches it
        if key not in keys:
            return None
        nf4, _ = load_nf4_state_dict(source.read([n for n in names if n == key or n.startswith(key + ".")]))
        return dequantize_nf4(nf4[key.removesuffix(".weight")], torch.float32)

    return base


def check_adapter_base(adapter_dir: Path, base_manifest_outputs: dict[str, str]) -> None:
    """The adapter records the sha256 of the base weights it was trained on; refuse any other base."""
    record = adapter_dir / "base_model.json"
    if not record.exists():
        return
    trained_on = json.loads(record.read_text()).get("weights_sha256", {})
    for name, digest in trained_on.items():
        current = base_manifest_outputs.get(f"model/{name}")
        if current != digest:
            raise InputError(
                f"the adapter in {adapter_dir} was trained on another base model ({name} sha256 {digest[:12]}…, "
                f"this base has {str(current)[:12]}…); re-run train on this base or point prepare at the right model"
            )


def body(ctx: StageContext) -> dict[str, Any]:
    m = ctx.params.merge
    base_dir = ctx.parent_dir("prepare") / "model"
    adapter_dir = ctx.parent_dir("train") / "adapter"
    if not any((base_dir / f).exists() for f in TOKENIZER_FILES):
        raise InputError(f"{base_dir} has no tokenizer; re-run prepare so the merged model can be served")
    check_adapter_base(adapter_dir, ctx.parents["prepare"].outputs)
    deltas, scaling, adapter_cfg = adapter_deltas(adapter_dir)
    out = ctx.out / "model"
    out.mkdir()
    replaced = loftq_bases(ctx.parent_dir("quantize"))
    rel = merge_shards(base_dir, out, deltas, scaling, torch_dtype(m.dtype), replaced)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = m.dtype
    config["dtype"] = m.dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in sorted(base_dir.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, out / f.name)
    return {
        "merged_layers": len(rel),
        "scaling": scaling,
        "rank": adapter_cfg.get("r"),
        "dtype": m.dtype,
        "mean_relative_update": sum(rel.values()) / max(1, len(rel)),
        "max_relative_update": max(rel.values(), default=0.0),
        "base": "original_16bit" if replaced is None else "loftq_dequantized_nf4",
    }


def run(params: Params, parent_run_id: str | None = None) -> Manifest:
    return execute(STAGE, params, body, parent_run_id)
