"""bitsandbytes 4-bit checkpoint layout: NF4Weight <-> state-dict tensors, and whole-state-dict quantization.

A transformers bnb 4-bit checkpoint stores per quantized linear (docs/formats.md, bitsandbytes checkpoint keys):

    {p}weight                                   uint8 [(n + 1) // 2, 1]   packed codes
    {p}weight.absmax                            uint8 [blocks] (fp32 without double quant)
    {p}weight.quant_map                         fp32 [16]                 NF4 table
    {p}weight.nested_absmax                     fp32 [ceil(blocks / 256)]
    {p}weight.nested_quant_map                  fp32 [256]                signed dynamic map
    {p}weight.quant_state.bitsandbytes__nf4     uint8 [len]               UTF-8 JSON of the scalars

The JSON is Python's ``json.dumps`` with default separators and bnb's key order, so our bytes equal the
ones ``QuantState.as_dict(packed=True)`` writes. Loading is our own code (no bitsandbytes) and rejects a
damaged checkpoint with a one-line ``ValueError`` that names the offending key. No file I/O here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch

from qlora_pipeline.kernels.dtypes import NAMED_DTYPES, dtype_name
from qlora_pipeline.kernels.nf4 import NF4_VALUES, VALID_BLOCKSIZES, NF4Weight, nf4_error_stats, quantize_nf4

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_REQUIRED_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


def _weight_key(prefix: str) -> str:
    """``prefix`` is a module prefix as in ``Module.state_dict`` (``model.layers.0.mlp.up_proj.``)."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    return prefix + "weight"


def quant_state_json(nf4: NF4Weight) -> str:
    """The JSON text bnb packs into ``quant_state.bitsandbytes__nf4`` (same keys, order, separators)."""
    state: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": nf4.blocksize,
        "dtype": dtype_name(nf4.dtype),
        "shape": list(nf4.shape),
    }
    if nf4.double_quant:
        state["nested_blocksize"] = nf4.nested_blocksize
        state["nested_dtype"] = "float32"
        state["nested_offset"] = nf4.offset
    return json.dumps(state)


def nf4_to_state_dict(prefix: str, nf4: NF4Weight) -> dict[str, torch.Tensor]:
    """Tensors for one quantized weight, keyed as transformers saves a bnb ``Linear4bit`` (no bias)."""
    key = _weight_key(prefix)
    blob = quant_state_json(nf4).encode("utf-8")
    out = {
        key: nf4.packed,
        f"{key}.absmax": nf4.absmax,
        f"{key}.quant_map": torch.tensor(NF4_VALUES, dtype=torch.float32, device=nf4.device),
    }
    if nf4.double_quant:
        assert nf4.nested_absmax is not None and nf4.nested_code is not None
        out[f"{key}.nested_absmax"] = nf4.nested_absmax
        out[f"{key}.nested_quant_map"] = nf4.nested_code.clone()  # own storage: safetensors drops shared ones
    out[f"{key}.{QUANT_STATE_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8, device=nf4.device)
    return out


def _require(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"missing tensor {key!r} in the 4-bit checkpoint")
    return tensors[key]


def _check_size(key: str, t: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    if t.numel() != numel:
        raise ValueError(f"tensor {key!r} has {t.numel()} elements, expected {numel} (truncated or wrong shape)")
    return t


def _parse_quant_state(key: str, blob: torch.Tensor) -> dict:
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"quant state {key!r} must be a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
    try:
        state = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"quant state {key!r} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"quant state {key!r} is JSON but not an object")
    nested = "nested_blocksize" in state or "nested_offset" in state
    missing = [f for f in _REQUIRED_FIELDS + (_NESTED_FIELDS if nested else ()) if f not in state]
    if missing:
        raise ValueError(f"quant state {key!r} lacks field(s) {', '.join(missing)}")
    if state["quant_type"] != "nf4":
        raise ValueError(f"quant state {key!r} has quant_type {state['quant_type']!r}; only 'nf4' is supported")
    if state["dtype"] not in NAMED_DTYPES:
        raise ValueError(f"quant state {key!r} has dtype {state['dtype']!r}; expected one of {list(NAMED_DTYPES)}")
    if state["blocksize"] not in VALID_BLOCKSIZES:
        raise ValueError(f"quant state {key!r} has blocksize {state['blocksize']!r}; expected {VALID_BLOCKSIZES}")
    shape = state["shape"]
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"quant state {key!r} has invalid shape {shape!r}")
    if nested and (not isinstance(state["nested_blocksize"], int) or state["nested_blocksize"] <= 0):
        raise ValueError(f"quant state {key!r} has invalid nested_blocksize {state['nested_blocksize']!r}")
    return state


def nf4_from_state_dict(prefix: str, tensors: dict[str, torch.Tensor]) -> NF4Weight:
    """Rebuild one NF4Weight from checkpoint tensors, validating every size against the quant state."""
    key = _weight_key(prefix)
    qs_key = f"{key}.{QUANT_STATE_KEY}"
    state = _parse_quant_state(qs_key, _require(tensors, qs_key))
    shape = torch.Size(state["shape"])
    n = shape.numel()
    blocks = math.ceil(n / state["blocksize"])
    packed = _require(tensors, key)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP): same bytes, other element type
        packed = packed.contiguous().view(torch.uint8)
    packed = _check_size(key, packed, (n + 1) // 2, torch.uint8).reshape(-1, 1)
    quant_map = _check_size(f"{key}.quant_map", _require(tensors, f"{key}.quant_map"), 16, torch.float32)
    if not torch.equal(quant_map.cpu(), torch.tensor(NF4_VALUES)):
        raise ValueError(f"tensor {key + '.quant_map'!r} is not the NF4 table (fp4 or corrupted)")
    nested = "nested_offset" in state
    absmax = _check_size(
        f"{key}.absmax", _require(tensors, f"{key}.absmax"), blocks, torch.uint8 if nested else torch.float32
    )
    nested_absmax = nested_code = offset = None
    nested_blocksize = 256
    if nested:
        nested_blocksize = state["nested_blocksize"]
        nested_absmax = _check_size(
            f"{key}.nested_absmax",
            _require(tensors, f"{key}.nested_absmax"),
            math.ceil(blocks / nested_blocksize),
            torch.float32,
        )
        nested_code = _check_size(
            f"{key}.nested_quant_map", _require(tensors, f"{key}.nested_quant_map"), 256, torch.float32
        )
        offset = float(state["nested_offset"])
    return NF4Weight(
        packed=packed,
        absmax=absmax.reshape(-1),
        nested_absmax=None if nested_absmax is None else nested_absmax.reshape(-1),
        nested_code=None if nested_code is None else nested_code.reshape(-1),
        offset=offset,
        blocksize=state["blocksize"],
        nested_blocksize=nested_blocksize,
        dtype=NAMED_DTYPES[state["dtype"]],
        shape=shape,
    )


def bnb_quantization_config(compute_dtype: str = "bfloat16") -> dict:
    """``quantization_config`` for config.json: ``BitsAndBytesConfig(nf4, double quant).to_dict()``."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def default_skip(key: str) -> bool:
    """Keep 16-bit what QLoRA keeps 16-bit: embeddings, norms, lm_head (by tensor name)."""
    name = key.lower()
    return any(part in name for part in ("embed", "norm", "lm_head", "wte", "wpe"))


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor],
    skip: Callable[[str], bool] = default_skip,
    blocksize: int = 64,
    quantizer: Callable[[str, torch.Tensor], NF4Weight] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """NF4-quantize every floating 2-D ``*.weight`` whose key ``skip`` rejects; copy the rest as-is.

    ``skip`` gets the tensor key (``model.embed_tokens.weight``). ``quantizer(module name, weight)`` replaces plain
    ``quantize_nf4`` where given (LoftQ picks a different NF4 weight; the layout is the same). Returns the new state
    dict (bnb layout) and per-layer stats keyed by module name: ``rel_error`` (relative Frobenius error of the
    dequantized weight), ``bytes_before``, ``bytes_after``.
    """
    out: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        if not (key.endswith(".weight") and tensor.dim() == 2 and tensor.is_floating_point()) or skip(key):
            out[key] = tensor
            continue
        module = key.removesuffix(".weight")
        nf4 = quantize_nf4(tensor, blocksize=blocksize) if quantizer is None else quantizer(module, tensor)
        out.update(nf4_to_state_dict(module + ".", nf4))
        stats[module] = nf4_error_stats(tensor, nf4)
    return out, stats


def load_nf4_state_dict(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, NF4Weight], dict[str, torch.Tensor]]:
    """Split a bnb-layout state dict into ``{module_name: NF4Weight}`` and the remaining plain tensors."""
    suffix = f".weight.{QUANT_STATE_KEY}"
    fp4 = [k for k in tensors if k.endswith(".quant_state.bitsandbytes__fp4")]
    if fp4:
        raise ValueError(f"tensor {fp4[0]!r} is FP4; only NF4 checkpoints are supported")
    weights: dict[str, NF4Weight] = {}
    used: set[str] = set()
    for key in tensors:
        if key.endswith(suffix):
            module = key.removesuffix(suffix)
            weights[module] = nf4_from_state_dict(module + ".", tensors)
            used.update(k for k in tensors if k == module + ".weight" or k.startswith(module + ".weight."))
    rest = {k: v for k, v in tensors.items() if k not in used}
    return weights, rest
