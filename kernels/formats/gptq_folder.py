"""The GPTQ v1 checkpoint format (``checkpoint_format: "gptq"``): packing, an independent unpacker, the config, and
the folder writer :func:`write_gptq_checkpoint` (calibration itself is :mod:`qlora_pipeline.kernels.gptq_model`).

Layout per quantized ``nn.Linear`` with ``in = K``, ``out = N``, ``b`` bits and ``p = 32 / b`` codes per int32 word
(docs/formats.md, GPTQ v1 checkpoint; AutoGPTQ ``qlinear_cuda_old``, GPT-QModel ``PackableQuantLinear``, vLLM
``GPTQLinearMethod.create_weights``, llama.cpp ``dequant_gptq``):

* ``qweight`` int32 ``[K/p, N]``: packed along the **input** dim; input ``r·p + j`` of output ``n`` sits in bits
  ``[b·j, b·j + b)`` of ``qweight[r, n]`` (LSB-first).
* ``qzeros`` int32 ``[n_groups, N/p]``: zero points packed along the **output** dim, same LSB-first order, storing
  ``zero - 1`` (the v1 convention every v1 kernel undoes with ``+1``; symmetric 4-bit zero 8 → word 0x77777777).
* ``scales`` fp16 ``[n_groups, N]``; ``g_idx`` int32 ``[K]`` (``i // group_size``); optional ``bias`` fp16 ``[N]``.

Weight = ``scales[g_idx[i], n] · (code[i, n] - (stored_zero[g_idx[i], n] + 1))``.

:func:`unpack_gptq_v1` is written from that text alone, on a different code path from :func:`pack_gptq_v1` (bit
extraction per slot instead of shift-and-sum), because it is the test oracle when gptqmodel is not installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qlora_pipeline.kernels.architectures import family_of_model_type, unsupported_architecture
from qlora_pipeline.kernels.dtypes import config_dtype
from qlora_pipeline.kernels.formats.atomic import atomic_dir
from qlora_pipeline.kernels.gptq import GPTQResult
from qlora_pipeline.kernels.gptq_model import quantize_model_gptq

QUANTIZER_ID = "qlora-pipeline:0.1.0"
_PACKABLE_BITS = (2, 4, 8)  # 3-bit straddles words (10/1/10/1/10); llama.cpp's reader refuses it too
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


def _pack_lsb_first(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes ``[..., M·p]`` along the last dim into int32 words ``[..., M]``, slot j at bits b·j."""
    per_word = 32 // bits
    *lead, m = codes.shape
    grouped = codes.to(torch.int64).reshape(*lead, m // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (grouped << shifts).sum(dim=-1)  # disjoint bit fields: sum == bitwise or; fits in 32 unsigned bits
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32)


def pack_gptq_v1(result: GPTQResult, bias: Tensor | None = None) -> dict[str, Tensor]:
    """The v1 tensors for one linear (keys without the module prefix): qweight, qzeros, scales, g_idx[, bias]."""
    bits = result.bits
    if bits not in _PACKABLE_BITS:
        raise ValueError(f"GPTQ v1 packing supports {_PACKABLE_BITS} bits, got {bits}")
    per_word = 32 // bits
    out_f, in_f = result.qweight_int.shape
    if in_f % per_word or out_f % per_word:
        raise ValueError(
            f"a {bits}-bit GPTQ checkpoint packs {per_word} values per int32 word; "
            f"in={in_f} and out={out_f} must both be multiples of {per_word}"
        )
    maxq = (1 << bits) - 1
    zeros = result.zeros.to(torch.int64)
    if bool((zeros < 1).any()) or bool((zeros > maxq).any()):
        raise ValueError(
            "GPTQ v1 stores zero-1, so a zero point of 0 would underflow to 15 and be read back as 16; "
            "quantize with sym=True (zero = 2^(bits-1)) for a v1 checkpoint"
        )
    tensors = {
        # qweight_int is [out, in]: packing its last dim packs along the input, then [out, in/p] → [in/p, out]
        "qweight": _pack_lsb_first(result.qweight_int, bits).T.contiguous(),
        "qzeros": _pack_lsb_first(zeros - 1, bits),
        "scales": result.scales.to(torch.float16).contiguous(),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def unpack_gptq_v1(tensors: dict[str, Tensor]) -> Tensor:
    """Rebuild the fp32 weight ``[out, in]`` (nn.Linear layout) from v1 tensors, straight from the format spec.

    ``bits`` is read off the shapes: ``qweight`` has ``in·bits/32`` rows and ``g_idx`` has ``in`` entries.
    """
    qweight, qzeros, scales, g_idx = tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"]
    in_f = g_idx.numel()
    bits = 32 * qweight.shape[0] // in_f
    per_word = 32 // bits
    mask = (1 << bits) - 1
    # Slot j of every word: shift right by b·j and keep b bits (an arithmetic shift of a negative int32 only
    # smears sign bits above the field, which the mask drops).
    w_slots = [(qweight >> (bits * j)) & mask for j in range(per_word)]  # each [in/p, out]
    codes = torch.stack(w_slots, dim=1).reshape(in_f, -1)  # row r·p + j  ← slot j of word row r
    z_slots = [(qzeros >> (bits * j)) & mask for j in range(per_word)]  # each [groups, out/p]
    stored_zeros = torch.stack(z_slots, dim=2).reshape(qzeros.shape[0], -1)  # col c·p + j ← slot j of word c
    zeros = stored_zeros + 1  # v1: the file holds zero - 1
    g = g_idx.long()
    weight_in_out = scales.float()[g] * (codes.float() - zeros.float()[g])  # [in, out]
    return weight_in_out.T.contiguous()


def gptq_quantization_config(
    bits: int,
    group_size: int,
    damp_percent: float,
    sym: bool = True,
    desc_act: bool = False,
    true_sequential: bool = True,
) -> dict[str, Any]:
    """``config.json["quantization_config"]``, also written verbatim as ``quantize_config.json``.

    Carries the fields each reader looks at: transformers' ``GPTQConfig`` (``quant_method``, ``bits``,
    ``group_size``, ``desc_act``, ``sym``, ``format``/legacy ``checkpoint_format``, ``act_group_aware``, ``meta``),
    gptqmodel's ``QuantizeConfig`` (``pack_dtype``, ``lm_head``, ``checkpoint_format``), vLLM's ``GPTQConfig`` and
    Marlin (``bits``, ``group_size``, ``desc_act``, ``sym``, ``lm_head``, ``checkpoint_format`` → v1) and llama.cpp's
    converter (``bits``, ``checkpoint_format`` from config.json). ``act_group_aware`` is written False because
    transformers defaults it to True and we do not reorder within groups.
    """
    if bits not in _PACKABLE_BITS:
        raise ValueError(f"GPTQ v1 checkpoints support {_PACKABLE_BITS} bits, got {bits}")
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": False,
        "static_groups": False,
        "true_sequential": true_sequential,
        "act_group_aware": False,
        "damp_percent": damp_percent,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "model_file_base_name": "model",
        "meta": {
            "quantizer": [QUANTIZER_ID],
            "damp_percent": damp_percent,
            "static_groups": False,
            "true_sequential": true_sequential,
            "act_group_aware": False,
        },
    }


def _packed_on_cpu(result: GPTQResult, bias: Tensor | None) -> dict[str, Tensor]:
    """What calibration keeps of each linear for the checkpoint: its v1 tensors, on the CPU."""
    return {k: v.cpu() for k, v in pack_gptq_v1(result, bias).items()}


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
    atomically (:func:`~qlora_pipeline.kernels.formats.atomic.atomic_dir`); on any error nothing is left behind.
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
    if family_of_model_type(config.get("model_type")) is None:
        arch = (config.get("architectures") or [config.get("model_type")])[0]
        raise ValueError(unsupported_architecture(arch, "for GPTQ"))

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    packed, stats = quantize_model_gptq(
        model,
        calibration_input_ids,
        bits,
        group_size,
        damp_percent,
        progress=progress,
        true_sequential=true_sequential,
        device=device,
        pack=_packed_on_cpu,
    )
    state_dict = _gptq_state_dict(model, packed)
    del model
    # Unquantized tensors go back to the source dtype; packed tensors keep the dtypes the format fixes (fp16 scales
    # and bias, int32 words).
    keep_dtype = config_dtype(config)
    quantized = {k.rpartition(".")[0] for k in state_dict if k.endswith(".qweight")}
    state_dict = {
        k: (v.to(keep_dtype) if v.is_floating_point() and k.rpartition(".")[0] not in quantized else v).contiguous()
        for k, v in state_dict.items()
    }
    qcfg = gptq_quantization_config(
        bits, group_size, damp_percent, sym=True, desc_act=False, true_sequential=true_sequential
    )
    config["quantization_config"] = qcfg

    with atomic_dir(out_dir) as tmp:
        save_file(state_dict, str(tmp / _WEIGHT_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.name in _COPY_NAMES or f.suffix in _COPY_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
    stats["bytes"] = (out_dir / _WEIGHT_FILE).stat().st_size
    return stats


__all__ = ["QUANTIZER_ID", "gptq_quantization_config", "pack_gptq_v1", "unpack_gptq_v1", "write_gptq_checkpoint"]
