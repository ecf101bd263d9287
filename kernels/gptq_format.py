"""The GPTQ v1 checkpoint format (``checkpoint_format: "gptq"``): packing, an independent unpacker, and the config.

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

from typing import Any

import torch
from torch import Tensor

from kernels.gptq import GPTQResult

QUANTIZER_ID = "qlora-pipeline:0.1.0"
_PACKABLE_BITS = (2, 4, 8)  # 3-bit straddles words (10/1/10/1/10); llama.cpp's reader refuses it too


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


__all__ = ["QUANTIZER_ID", "gptq_quantization_config", "pack_gptq_v1", "unpack_gptq_v1"]
