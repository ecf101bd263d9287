"""Write and read NF4 checkpoints in the folder layout transformers uses for bnb 4-bit models.

This module reads and writes the files (the numerics in ``kernels`` never touch files); the tensor-level bnb
layout it builds on is :mod:`qlora_pipeline.kernels.formats.bnb_folder`. ``save_4bit_checkpoint`` turns a 16-bit HF
folder (config.json + safetensors) into a folder that ``AutoModelForCausalLM.from_pretrained(dir)`` loads
with bitsandbytes installed, quantizing exactly the modules transformers itself would (every nn.Linear
except those ``get_keys_to_not_convert`` keeps: lm_head / output embeddings, tied weights) with bytes
identical to bnb's. ``load_4bit_model`` reads such a folder without bitsandbytes, into the HF model class
with our :class:`~qlora_pipeline.kernels.linear4bit.Linear4bit` layers.

Atomicity is the caller's job (stages write into a temporary sibling directory and rename it:
:func:`qlora_pipeline.kernels.formats.atomic.atomic_dir`).
Never unpickles: only safetensors are read.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qlora_pipeline.kernels.formats.bnb_folder import bnb_quantization_config, load_nf4_state_dict, quantize_state_dict
from qlora_pipeline.kernels.formats.hf_folder import INDEX_FILE, LazyTensors, ShardWriter, meta_skeleton, weight_files
from qlora_pipeline.kernels.linear4bit import replace_linears_with_4bit
from qlora_pipeline.kernels.nf4 import NF4Weight


def _modules_to_quantize(model: nn.Module) -> set[str]:
    """Names of the nn.Linear modules transformers' bnb quantizer converts (it keeps lm_head and tied ones)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(model))
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in keep and not any(name.startswith(k + ".") for k in keep)
    }


def save_4bit_checkpoint(
    model_dir_16bit: Path,
    out_dir: Path,
    blocksize: int = 64,
    compute_dtype: str = "bfloat16",
    weight_dtype: torch.dtype | None = None,
    quantizer: Callable[[str, torch.Tensor], NF4Weight] | None = None,
) -> dict:
    """Quantize a 16-bit HF folder into a bnb-layout NF4 folder; returns size and error statistics.

    Non-quantized tensors (embeddings, norms, lm_head) are copied unchanged; other files (tokenizer,
    generation config) are copied; config.json gains ``quantization_config``. One tensor is quantized at a time and
    written into output shards no larger than the largest input shard (``model.safetensors`` when one holds all), so
    peak memory is one tensor plus one output shard, not the model.
    ``weight_dtype`` casts every floating tensor first (what ``from_pretrained(dtype=...)`` does before bnb
    quantizes): NF4 bytes depend on the dtype quantized from, so pass the dtype users load the model in
    when the files hold another one. None quantizes the tensors as stored. ``quantizer`` as in
    :func:`quantize_state_dict` (LoftQ).
    """
    from transformers import AutoConfig

    t0 = time.perf_counter()
    model_dir_16bit, out_dir = Path(model_dir_16bit), Path(out_dir)
    files = weight_files(model_dir_16bit)
    config = AutoConfig.from_pretrained(model_dir_16bit, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{model_dir_16bit} is already quantized; quantize a 16-bit model")
    targets = _modules_to_quantize(meta_skeleton(config))
    out_dir.mkdir(parents=True, exist_ok=True)

    layers: dict[str, dict] = {}
    source = LazyTensors(model_dir_16bit)
    # Output shards no larger than the largest input shard: one tensor in, its NF4 form out, one shard buffered.
    writer = ShardWriter(out_dir, max((model_dir_16bit / f).stat().st_size for f in files))
    total_before = 0
    for key in source.names():
        tensor = source.read([key])[key]
        total_before += tensor.numel() * tensor.element_size()
        if weight_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(weight_dtype)
        new, stats = quantize_state_dict(
            {key: tensor},
            skip=lambda k: k.removesuffix(".weight") not in targets,
            blocksize=blocksize,
            quantizer=quantizer,
        )
        layers.update(stats)
        for k, v in new.items():
            writer.add(k, v)
        del tensor, new
    missing = sorted(targets - layers.keys())
    if missing:
        raise ValueError(f"linear weight {missing[0]}.weight not found in {model_dir_16bit} safetensors")
    writer.finish()
    total_after = writer.total_bytes

    raw_config = json.loads((model_dir_16bit / "config.json").read_text())
    raw_config["quantization_config"] = bnb_quantization_config(compute_dtype)
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    for path in sorted(model_dir_16bit.iterdir()):
        if path.is_file() and path.name not in ("config.json", INDEX_FILE) and path.suffix != ".safetensors":
            if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                continue  # pickles are never read or passed on
            shutil.copy2(path, out_dir / path.name)

    before = sum(s["bytes_before"] for s in layers.values())
    after = sum(s["bytes_after"] for s in layers.values())
    errors = [s["rel_error"] for s in layers.values()]
    return {
        "blocksize": blocksize,
        "n_quantized": len(layers),
        "quantized_bytes_before": before,
        "quantized_bytes_after": after,
        "total_bytes_before": total_before,
        "total_bytes_after": total_after,
        "bits_per_weight": 8 * after / max(1, sum(s["numel"] for s in layers.values())),
        "mean_rel_error": sum(errors) / max(1, len(errors)),
        "max_rel_error": max(errors, default=0.0),
        "seconds": time.perf_counter() - t0,
        "layers": layers,
    }


def load_4bit_model(model_dir: Path, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a bnb-layout NF4 folder into its HF model class with our Linear4bit layers (no bitsandbytes).

    Every base parameter is frozen (requires_grad False) and the model is in eval mode; ``compute_dtype``
    None picks the per-device default of :func:`qlora_pipeline.kernels.dtypes.default_compute_dtype`.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    model = meta_skeleton(config)
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(model_dir / name))
    nf4_weights, rest = load_nf4_state_dict(tensors)
    if not nf4_weights:
        raise ValueError(f"{model_dir} holds no NF4 weights (no *.quant_state.bitsandbytes__nf4 tensors)")
    replace_linears_with_4bit(model, nf4_weights, compute_dtype)
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"tensor {result.unexpected_keys[0]!r} in {model_dir} matches no module of the model")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"tensor {still_meta[0]!r} missing from {model_dir} ({len(still_meta)} missing in all)")
    model.requires_grad_(False)
    return model.eval()
