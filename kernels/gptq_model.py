"""Layer-wise sequential GPTQ for the HF causal LMs of :mod:`qlora_pipeline.kernels.architectures` (the v1 checkpoint
writer is in :mod:`qlora_pipeline.kernels.formats.gptq_folder`).

The driver follows the paper's sequential scheme: capture what enters decoder layer 0 (and the mask and rotary tables
the model hands each layer, which differ between sliding and global layers), then for each decoder layer collect the
Hessian of each linear's input over the calibration batches, GPTQ the weights, put the *dequantized*
weights back into the layer and re-run it, so the next layer is calibrated on the activations the quantized model
will actually produce (errors do not compound unseen). With ``true_sequential`` the four input-sharing sets of a block
— [q,k,v], [o], [gate,up], [down] — are quantized in execution order, each on inputs that already pass through the
quantized earlier sets. Members of a set see the same input, so they share one Hessian (3 instead of 7 Hessians per
block, and the q/k/v and gate/up GEMMs of ``x·xᵀ`` are not repeated).

Embeddings, norms and ``lm_head`` stay 16-bit (docs/formats.md, GPTQ v1 checkpoint). Nothing here touches files
or knows the checkpoint layout: the caller says what to keep of each quantized linear (``pack``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qlora_pipeline.kernels.architectures import Family, family_of_model_type, unsupported_architecture
from qlora_pipeline.kernels.gptq import (
    GPTQResult,
    Hessian,
    check_group_size,
    gptq_quantize,
    output_error,
    rtn_quantize,
)


@dataclass(frozen=True)
class LayerStream:
    """How decoder blocks come into memory for their turn and leave after it, so a model larger than host memory
    calibrates one block at a time: ``enter(i, layer, device)`` makes block ``i``'s weights real on ``device``;
    ``leave(i, layer)`` runs once its linears hold their dequantized weights and may drop them (to the meta
    device); ``captured()`` runs once the inputs of block 0 are captured (the embeddings are no longer needed).
    Without a stream the model is in memory and blocks just move to ``device`` and back."""

    enter: Callable[[int, nn.Module, torch.device], None]
    leave: Callable[[int, nn.Module], None]
    captured: Callable[[], None]


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass whose remaining work we do not need."""


def _family(model: nn.Module) -> Family:
    model_type = getattr(model.config, "model_type", None)
    family = family_of_model_type(model_type)
    if family is None:
        arch = (getattr(model.config, "architectures", None) or [model_type or type(model).__name__])[0]
        raise ValueError(unsupported_architecture(arch, "for GPTQ"))
    return family


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported model, or a ValueError naming what is supported."""
    family = _family(model)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name in (n for s in family.linear_sets for n in s):
            if not isinstance(layer.get_submodule(name), nn.Linear):
                raise ValueError(f"model.layers.{i}.{name} is not an nn.Linear; is this model already quantized?")
    return layers


def check_linear(name: str, out_f: int, in_f: int, bits: int, group_size: int) -> None:
    """One linear can be stored: the group size divides its input columns and both dims fill whole int32 words."""
    per_word = 32 // bits
    check_group_size(in_f, group_size, name)
    if in_f % per_word or out_f % per_word:
        raise ValueError(
            f"{name} is [{out_f}, {in_f}]; a {bits}-bit GPTQ checkpoint packs {per_word} values per int32 "
            f"word, so both dims must be multiples of {per_word}"
        )


def _validate_shapes(layers: nn.ModuleList, sets: tuple[tuple[str, ...], ...], bits: int, group_size: int) -> None:
    """Fail before any calibration work if a linear cannot be stored (group size, words per column)."""
    for i, layer in enumerate(layers):
        for name in (n for s in sets for n in s):
            out_f, in_f = layer.get_submodule(name).weight.shape
            check_linear(f"model.layers.{i}.{name}", out_f, in_f, bits, group_size)


def check_config(config: dict[str, Any], bits: int, group_size: int) -> None:
    """The checks GPTQ makes on a loaded model, from `config.json` alone (seconds, no weights read), so a run that
    would fail at export can fail before training (prepare's preflight)."""
    model_type = config.get("model_type")
    family = family_of_model_type(model_type)
    if family is None:
        raise ValueError(unsupported_architecture((config.get("architectures") or [model_type])[0], "for GPTQ"))
    shapes = family.linear_shapes(config)
    for name, (out_f, in_f) in shapes.items():
        check_linear(f"model.layers.*.{name}", out_f, in_f, bits, group_size)


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


class _Recorder(nn.Module):
    """Stands in for decoder block ``index`` while the model runs once per batch: keeps the keyword arguments the
    model calls that block with (its mask and rotary tables depend on the block's attention type: Gemma's sliding and
    global blocks differ) and, for block 0, the hidden states; returns the hidden states unchanged."""

    def __init__(self, index: int, last: bool, calls: list[list[tuple[Tensor | None, dict]]]) -> None:
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        self.calls[self.index].append((hidden_states.detach() if self.index == 0 else None, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _capture_block_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[Tensor]) -> tuple[list, list]:
    """What the model hands each decoder block per batch: block 0's hidden states, and every block's keyword
    arguments (mask, rotary cos/sin, positions), from one pass with the blocks replaced by :class:`_Recorder`."""
    calls: list[list[tuple[Tensor | None, dict]]] = [[] for _ in layers]
    held = list(layers)
    for i in range(len(held)):
        layers[i] = _Recorder(i, i == len(held) - 1, calls)
    try:
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(held):
            layers[i] = layer
    if any(len(c) != len(batches) for c in calls):
        raise ValueError("the model did not call every decoder block once per batch; GPTQ cannot calibrate it")
    hidden = [h for h, _ in calls[0]]
    return hidden, [[kw for _, kw in c] for c in calls]


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
    pack: Callable[[str, GPTQResult, Tensor | None], Any] | None = None,
    stream: LayerStream | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """GPTQ every decoder-block linear of a HF Llama/Qwen2 causal LM, layer by layer.

    ``calibration_input_ids`` is a list of ``[seq]`` or ``[batch, seq]`` token-id tensors (unpadded; each item is
    one forward pass, so lengths may differ). Returns ``(quantized, stats)``: ``quantized`` maps the full module name
    of every quantized linear (``model.layers.0.self_attn.q_proj``) to ``pack(name, result, bias)``, called as soon as
    that linear is quantized (so a compact packing such as the v1 checkpoint's, or a write to disk, keeps memory low),
    or to its
    :class:`~qlora_pipeline.kernels.gptq.GPTQResult` when ``pack`` is None. The model is modified in place: its
    quantized linears hold their dequantized weights afterwards, so it can be evaluated as the quantized model, and
    its other tensors are the ones a checkpoint stores unquantized. ``stats`` gives
    per-module output errors (mean over calibration tokens of ``||W x - Q x||²``) for GPTQ and for RTN on the same
    inputs, damping used, and time. ``device`` (default: where the model is) is where calibration computes: the
    embeddings, rotary tables and head move there once, each decoder block only while it is quantized, so a model
    larger than the device still calibrates one block at a time; the model is back where it was at the end. With a
    ``stream`` (:class:`LayerStream`) the blocks may live on the meta device outside their turn, so a model larger
    than host memory calibrates too; then placement is the stream's business. Pass an
    fp32 model: in bf16 the dequantized weights written back lose mantissa bits, so later layers would calibrate on
    activations slightly different from those the checkpoint produces.
    """
    from tqdm.auto import tqdm

    layers = _decoder_layers(model)
    linear_sets = _family(model).linear_sets
    _validate_shapes(layers, linear_sets, bits, group_size)
    home = next(p.device for p in model.parameters() if not p.is_meta)
    device = home if device is None else torch.device(device)
    enter = stream.enter if stream else lambda _i, layer, dev: layer.to(dev)
    leave = stream.leave if stream else lambda _i, layer: layer.to(home)
    if device != home:
        _move_all_but_layers(model, layers, device)
    batches = _as_batches(calibration_input_ids, model.config.vocab_size, device)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()

    hidden, block_kwargs = _capture_block_inputs(model, layers, batches)
    if stream:
        stream.captured()
    n_tokens = sum(int(h.shape[0] * h.shape[1]) for h in hidden)
    stages = [[s] for s in linear_sets] if true_sequential else [list(linear_sets)]
    quantized: dict[str, Any] = {}
    layer_stats: list[dict[str, Any]] = []

    for i, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        t_layer = time.perf_counter()
        enter(i, layer, device)
        inputs = list(zip(hidden, block_kwargs[i], strict=True))
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
                    bias = linear.bias.detach() if linear.bias is not None else None
                    quantized[full] = res if pack is None else pack(full, res, bias)
                    module_stats[name] = {
                        "gptq_error": err_gptq,
                        "rtn_error": err_rtn,
                        "error_ratio": err_gptq / err_rtn if err_rtn > 0 else 1.0,
                        "damp_percent": res.damp_percent,
                        "dead_columns": res.dead_columns,
                        "seconds": time.perf_counter() - t_mod,
                    }
                del hessians[s]
        hidden = [_run_layer(layer, h, kw).detach() for h, kw in inputs]
        leave(i, layer)
        layer_stats.append({"layer": i, "seconds": time.perf_counter() - t_layer, "modules": module_stats})

    model.train(was_training)
    if not stream:
        model.to(home)
    gptq_total = sum(m["gptq_error"] for ls in layer_stats for m in ls["modules"].values())
    rtn_total = sum(m["rtn_error"] for ls in layer_stats for m in ls["modules"].values())
    stats = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "n_sequences": sum(int(b.shape[0]) for b in batches),
        "n_tokens": n_tokens,
        "n_quantized_modules": len(quantized),
        "gptq_error_total": gptq_total,
        "rtn_error_total": rtn_total,
        "error_ratio_total": gptq_total / rtn_total if rtn_total > 0 else 1.0,
        "max_damp_percent": max(m["damp_percent"] for ls in layer_stats for m in ls["modules"].values()),
        "seconds": time.perf_counter() - t_start,
        "layers": layer_stats,
    }
    return quantized, stats


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


__all__ = ["LayerStream", "check_config", "quantize_model_gptq"]
