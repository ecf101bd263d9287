"""Layer-wise sequential GPTQ for HF Llama / Qwen2 causal LMs, and the v1 checkpoint writer.

The driver follows the paper's sequential scheme: capture what enters decoder layer 0, then for each decoder layer
collect the Hessian of each linear's input over the calibration batches, GPTQ the weights, put the *dequantized*
weights back into the layer and re-run it, so the next layer is calibrated on the activations the quantized model
will actually produce (errors do not compound unseen). With ``true_sequential`` the four input-sharing sets of a block
— [q,k,v], [o], [gate,up], [down] — are quantized in execution order, each on inputs that already pass through the
quantized earlier sets. Members of a set see the same input, so they share one Hessian (3 instead of 7 Hessians per
block, and the q/k/v and gate/up GEMMs of ``x·xᵀ`` are not repeated).

Embeddings, norms and ``lm_head`` stay 16-bit (docs/formats.md, GPTQ v1 checkpoint). ``write_gptq_checkpoint``
is the only function here that touches files; it writes into a hidden temporary sibling and renames it into place at
the end, so a failure never leaves a partial folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kernels.gptq import Hessian, check_group_size, gptq_quantize, output_error, rtn_quantize
from kernels.gptq_format import gptq_quantization_config, pack_gptq_v1

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Input-sharing sets of a Llama/Qwen2 decoder block, in execution order.
LINEAR_SETS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_WEIGHT_FILE = "model.safetensors"
# Files copied verbatim next to the weights: tokenizer, chat template, generation defaults.
_COPY_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.json",
)
_COPY_SUFFIXES = (".jinja",)


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass whose remaining work we do not need."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported model, or a ValueError naming what is supported."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (getattr(model.config, "architectures", None) or [model_type or type(model).__name__])[0]
        supported = ", ".join(SUPPORTED_MODEL_TYPES.values())
        raise ValueError(f"unsupported architecture {arch} for GPTQ; supported: {supported}")
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name in (n for s in LINEAR_SETS for n in s):
            if not isinstance(layer.get_submodule(name), nn.Linear):
                raise ValueError(f"model.layers.{i}.{name} is not an nn.Linear; is this model already quantized?")
    return layers


def _validate_shapes(layers: nn.ModuleList, bits: int, group_size: int) -> None:
    """Fail before any calibration work if a linear cannot be stored (group size, words per column)."""
    per_word = 32 // bits
    for i, layer in enumerate(layers):
        for name in (n for s in LINEAR_SETS for n in s):
            out_f, in_f = layer.get_submodule(name).weight.shape
            full = f"model.layers.{i}.{name}"
            check_group_size(in_f, group_size, full)
            if in_f % per_word or out_f % per_word:
                raise ValueError(
                    f"{full} is [{out_f}, {in_f}]; a {bits}-bit GPTQ checkpoint packs {per_word} values per int32 "
                    f"word, so both dims must be multiples of {per_word}"
                )


def _as_batches(calibration_input_ids: list[Tensor], vocab_size: int, device: torch.device) -> list[Tensor]:
    if not calibration_input_ids:
        raise ValueError("no calibration sequences: GPTQ needs activations to build its Hessians")
    batches = []
    for k, ids in enumerate(calibration_input_ids):
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration item {k} must be a non-empty [seq] or [batch, seq] tensor of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"calibration item {k} has token ids outside [0, {vocab_size})")
        batches.append(ids.to(device=device, dtype=torch.long))
    return batches


def _capture_layer0_inputs(model: nn.Module, layer0: nn.Module, batches: list[Tensor]) -> list[tuple[Tensor, dict]]:
    """Hidden states and keyword arguments (mask, rotary cos/sin, positions) with which the model calls layer 0."""
    captured: list[tuple[Tensor, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), kwargs))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _collect_hessians(
    layer: nn.Module, sets: list[tuple[str, ...]], inputs: list[tuple[Tensor, dict]]
) -> dict[tuple[str, ...], Hessian]:
    """One Hessian per input-sharing set, from a pass over the calibration inputs that stops after the last set."""
    hessians: dict[tuple[str, ...], Hessian] = {}
    handles = []
    last = sets[-1]
    for s in sets:
        first = layer.get_submodule(s[0])
        h = hessians[s] = Hessian(first.in_features, device=first.weight.device)

        def hook(_m: nn.Module, args: tuple, _out: Tensor, h: Hessian = h, stop: bool = s is last) -> None:
            h.add(args[0])
            if stop:
                raise _StopForward

        handles.append(first.register_forward_hook(hook))
    try:
        for hidden, kwargs in inputs:
            with contextlib.suppress(_StopForward):
                _run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    calibration_input_ids: list[Tensor],
    bits: int = 4,
    group_size: int = 64,
    damp_percent: float = 0.01,
    progress: bool = True,
    true_sequential: bool = True,
    device: torch.device | str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """GPTQ every decoder-block linear of a HF Llama/Qwen2 causal LM, layer by layer.

    ``calibration_input_ids`` is a list of ``[seq]`` or ``[batch, seq]`` token-id tensors (unpadded; each item is
    one forward pass, so lengths may differ). Returns ``(state_dict, stats)``: the state dict has
    ``<module>.qweight/.qzeros/.scales/.g_idx`` (+ fp16 ``.bias``) for every quantized linear and the other tensors
    unchanged (tied duplicates dropped, as ``save_pretrained`` does). The model is modified in place: its quantized
    linears hold their dequantized weights afterwards, so it can be evaluated as the quantized model. ``stats`` gives
    per-module output errors (mean over calibration tokens of ``||W x - Q x||²``) for GPTQ and for RTN on the same
    inputs, damping used, and time. ``device`` (default: where the model is) is where calibration computes: the
    embeddings, rotary tables and head move there once, each decoder block only while it is quantized, so a model
    larger than the device still calibrates one block at a time; the model is back where it was at the end. Pass an
    fp32 model: in bf16 the dequantized weights written back lose mantissa bits, so later layers would calibrate on
    activations slightly different from those the checkpoint produces.
    """
    from tqdm.auto import tqdm

    layers = _decoder_layers(model)
    _validate_shapes(layers, bits, group_size)
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    if device != home:
        _move_all_but_layers(model, layers, device)
    batches = _as_batches(calibration_input_ids, model.config.vocab_size, device)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()

    inputs = _capture_layer0_inputs(model, layers[0], batches)
    n_tokens = sum(int(h.shape[0] * h.shape[1]) for h, _ in inputs)
    stages = [[s] for s in LINEAR_SETS] if true_sequential else [list(LINEAR_SETS)]
    packed: dict[str, dict[str, Tensor]] = {}
    layer_stats: list[dict[str, Any]] = []

    for i, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        t_layer = time.perf_counter()
        layer.to(device)
        module_stats: dict[str, dict[str, Any]] = {}
        for stage in stages:
            hessians = _collect_hessians(layer, stage, inputs)
            for s in stage:
                H = hessians[s].matrix
                for name in s:
                    t_mod = time.perf_counter()
                    linear = layer.get_submodule(name)
                    full = f"model.layers.{i}.{name}"
                    W = linear.weight.detach().float()
                    res = gptq_quantize(W, H, bits, group_size, damp_percent, name=full)
                    rtn = rtn_quantize(W, bits, group_size, name=full)
                    err_gptq, err_rtn = output_error(W, res.dequantized, H), output_error(W, rtn.dequantized, H)
                    linear.weight.copy_(res.dequantized.to(linear.weight.dtype))
                    packed[full] = {
                        k: v.cpu()
                        for k, v in pack_gptq_v1(res, linear.bias.detach() if linear.bias is not None else None).items()
                    }
                    module_stats[name] = {
                        "gptq_error": err_gptq,
                        "rtn_error": err_rtn,
                        "error_ratio": err_gptq / err_rtn if err_rtn > 0 else 1.0,
                        "damp_percent": res.damp_percent,
                        "dead_columns": res.dead_columns,
                        "seconds": time.perf_counter() - t_mod,
                    }
                del hessians[s]
        inputs = [(_run_layer(layer, h, kw).detach(), kw) for h, kw in inputs]
        layer.to(home)
        layer_stats.append({"layer": i, "seconds": time.perf_counter() - t_layer, "modules": module_stats})

    model.train(was_training)
    model.to(home)
    state_dict = _gptq_state_dict(model, packed)
    gptq_total = sum(m["gptq_error"] for ls in layer_stats for m in ls["modules"].values())
    rtn_total = sum(m["rtn_error"] for ls in layer_stats for m in ls["modules"].values())
    stats = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "n_sequences": sum(int(b.shape[0]) for b in batches),
        "n_tokens": n_tokens,
        "n_quantized_modules": len(packed),
        "gptq_error_total": gptq_total,
        "rtn_error_total": rtn_total,
        "error_ratio_total": gptq_total / rtn_total if rtn_total > 0 else 1.0,
        "max_damp_percent": max(m["damp_percent"] for ls in layer_stats for m in ls["modules"].values()),
        "seconds": time.perf_counter() - t_start,
        "layers": layer_stats,
    }
    return state_dict, stats


def _move_all_but_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Everything but the decoder blocks to ``device`` (the blocks follow one at a time)."""
    held = list(layers)
    for i in range(len(layers)):
        layers[i] = nn.Identity()
    try:
        model.to(device)
    finally:
        for i, layer in enumerate(held):
            layers[i] = layer


def _gptq_state_dict(model: nn.Module, packed: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The model's tensors with each quantized linear's weight/bias replaced by its packed v1 tensors."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        module, _, leaf = key.rpartition(".")
        if module in packed and leaf in ("weight", "bias"):
            continue
        if id(tensor) in seen:  # tied weights (lm_head ↔ embed_tokens) are one Parameter; safetensors refuses both
            continue
        seen.add(id(tensor))
        out[key] = tensor.detach().cpu()
    for module, tensors in packed.items():
        for leaf, tensor in tensors.items():
            out[f"{module}.{leaf}"] = tensor
    return out


def _source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is set aside first and removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_gptq_checkpoint(
    model_dir_16bit: str | Path,
    out_dir: str | Path,
    calibration_input_ids: list[Tensor],
    bits: int = 4,
    group_size: int = 64,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Quantize a 16-bit HF folder with GPTQ and write a v1 GPTQ checkpoint folder; returns the stats.

    The folder has ``model.safetensors`` (packed linears, other tensors in the source dtype), ``config.json`` with
    ``quantization_config``, ``quantize_config.json`` (for vLLM), and the tokenizer/generation files. Calibration
    runs in fp32 (bf16 matmuls are slow on CPU and fp32 activations make better Hessians). ``out_dir`` is replaced
    atomically; on any error nothing is left behind.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src, out_dir = Path(model_dir_16bit), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json; point model_dir_16bit at a HF model folder")
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{src} is already quantized ({method}); GPTQ needs the 16-bit model")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        arch = (config.get("architectures") or [config.get("model_type")])[0]
        raise ValueError(
            f"unsupported architecture {arch} for GPTQ; supported: {', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state_dict, stats = quantize_model_gptq(
        model,
        calibration_input_ids,
        bits,
        group_size,
        damp_percent,
        progress=progress,
        true_sequential=true_sequential,
        device=device,
    )
    del model
    # Unquantized tensors go back to the source dtype; packed tensors keep the dtypes the format fixes (fp16 scales
    # and bias, int32 words).
    keep_dtype = _source_dtype(config)
    quantized = {k.rpartition(".")[0] for k in state_dict if k.endswith(".qweight")}
    state_dict = {
        k: (v.to(keep_dtype) if v.is_floating_point() and k.rpartition(".")[0] not in quantized else v).contiguous()
        for k, v in state_dict.items()
    }
    qcfg = gptq_quantization_config(
        bits, group_size, damp_percent, sym=True, desc_act=False, true_sequential=true_sequential
    )
    config["quantization_config"] = qcfg

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file(state_dict, str(tmp / _WEIGHT_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.name in _COPY_NAMES or f.suffix in _COPY_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats["bytes"] = (out_dir / _WEIGHT_FILE).stat().st_size
    return stats


__all__ = ["LINEAR_SETS", "SUPPORTED_MODEL_TYPES", "quantize_model_gptq", "write_gptq_checkpoint"]
