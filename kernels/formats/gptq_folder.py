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
from qlora_pipeline.kernels.formats.hf_folder import LazyTensors, ShardWriter, meta_skeleton, weight_files
from qlora_pipeline.kernels.gptq import GPTQResult
from qlora_pipeline.kernels.gptq_model import LayerStream, quantize_model_gptq

QUANTIZER_ID = "qlora-pipeline:0.1.0"
_PACKABLE_BITS = (2, 4, 8)  # 3-bit straddles words (10/1/10/1/10); llama.cpp's reader refuses it too
_BLOCKS = "model.layers."  # decoder blocks of every supported family
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


class _StreamedCheckpoint:
    """The GPTQ checkpoint built while calibration streams the model: every tensor goes to a :class:`ShardWriter`
    as soon as it is final (packed linears when quantized, a block's other tensors when it leaves, the rest from
    the source), so memory holds one block, its calibration activations and one output shard."""

    def __init__(self, src: Path, tmp: Path, keep_dtype: torch.dtype, device: torch.device) -> None:
        self.source = LazyTensors(src)
        self.keep_dtype, self.device = keep_dtype, device
        self.writer = ShardWriter(tmp, max((src / f).stat().st_size for f in weight_files(src)))
        self.quantized: set[str] = set()

    def block_keys(self, i: int) -> list[str]:
        prefix = f"{_BLOCKS}{i}."
        return [k for k in self.source.names() if k.startswith(prefix)]

    def load_outside(self, model: nn.Module) -> list[str]:
        """Real fp32 tensors for what runs before block 0 (embeddings, final norm) on the calibration device; the
        output head stays on the meta device (calibration never reaches it). Returns the keys loaded."""
        head = {f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()}
        keys = [k for k in self.source.names() if not k.startswith(_BLOCKS) and k not in head]
        tensors = {k: v.to(self.device) for k, v in self.source.read(keys, torch.float32).items()}
        model.load_state_dict(tensors, strict=False, assign=True)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        return keys

    def stream(self, model: nn.Module, outside: list[str]) -> LayerStream:
        def enter(i: int, layer: nn.Module, device: torch.device) -> None:
            prefix = f"{_BLOCKS}{i}."
            tensors = self.source.read(self.block_keys(i), torch.float32)
            layer.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True, assign=True)
            layer.to(device)

        def leave(i: int, layer: nn.Module) -> None:
            for name, tensor in layer.state_dict().items():
                if name.rpartition(".")[0] not in self.quantized_in(i):
                    self.add(f"{_BLOCKS}{i}.{name}", tensor)
            layer.to("meta")

        def captured() -> None:
            for name, module in model.named_modules():
                if f"{name}.weight" in outside and not name.startswith("model.layers"):
                    module.to("meta")

        return LayerStream(enter=enter, leave=leave, captured=captured)

    def quantized_in(self, i: int) -> set[str]:
        prefix = f"{_BLOCKS}{i}."
        return {m.removeprefix(prefix) for m in self.quantized if m.startswith(prefix)}

    def add(self, key: str, tensor: Tensor) -> None:
        self.writer.add(key, tensor.to(self.keep_dtype) if tensor.is_floating_point() else tensor)

    def pack(self, name: str, result: GPTQResult, bias: Tensor | None) -> None:
        """Called by calibration as each linear is quantized: its v1 tensors go straight to the writer."""
        self.quantized.add(name)
        for leaf, tensor in pack_gptq_v1(result, bias).items():
            self.writer.add(f"{name}.{leaf}", tensor)

    def finish(self, outside: list[str]) -> list[str]:
        """The tensors outside the blocks, as stored in the source (cast to the config's dtype), then the shards."""
        for key in outside + [k for k in self.source.names() if k not in outside and not k.startswith(_BLOCKS)]:
            self.add(key, self.source.read([key])[key])
        return self.writer.finish()


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

    The folder has the safetensors (packed linears, other tensors in the config's dtype; shards no larger than the
    source's largest, with an index when there are several), ``config.json`` with ``quantization_config``,
    ``quantize_config.json`` (for vLLM), and the tokenizer/generation files. The model is never loaded whole: its
    skeleton is built on the meta device, each decoder block is read from the source in fp32 for its turn and
    dropped after (:class:`~qlora_pipeline.kernels.gptq_model.LayerStream`), so host memory is one block, the
    calibration activations and one output shard. Calibration runs in fp32 (bf16 matmuls are slow on CPU and fp32
    activations make better Hessians). ``out_dir`` is replaced atomically
    (:func:`~qlora_pipeline.kernels.formats.atomic.atomic_dir`); on any error nothing is left behind.
    """
    from transformers import AutoConfig

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
    qcfg = gptq_quantization_config(
        bits, group_size, damp_percent, sym=True, desc_act=False, true_sequential=true_sequential
    )
    device = torch.device(device) if device is not None else torch.device("cpu")

    with atomic_dir(out_dir) as tmp:
        model = meta_skeleton(AutoConfig.from_pretrained(src, trust_remote_code=False))
        checkpoint = _StreamedCheckpoint(src, tmp, config_dtype(config), device)
        outside = checkpoint.load_outside(model)
        _, stats = quantize_model_gptq(
            model,
            calibration_input_ids,
            bits,
            group_size,
            damp_percent,
            progress=progress,
            true_sequential=true_sequential,
            device=device,
            pack=checkpoint.pack,
            stream=checkpoint.stream(model, outside),
        )
        del model
        names = checkpoint.finish(outside)
        config["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.name in _COPY_NAMES or f.suffix in _COPY_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
    stats["bytes"] = sum((out_dir / name).stat().st_size for name in names)
    return stats


__all__ = ["QUANTIZER_ID", "gptq_quantization_config", "pack_gptq_v1", "unpack_gptq_v1", "write_gptq_checkpoint"]
