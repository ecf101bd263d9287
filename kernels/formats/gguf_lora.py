"""The LoRA adapter alone as a llama.cpp GGUF adapter file (docs/formats.md, GGUF LoRA adapter).

A serving team that already runs the base model's GGUF applies it with ``llama-server --lora FILE`` (or
``Llama(lora_path=...)``, Ollama's ``ADAPTER``) instead of downloading a merged model. The file holds, per adapted
linear, ``<gguf name>.lora_a`` (PEFT's A, ``[r, in]``) and ``<gguf name>.lora_b`` (B, ``[out, r]``, its rows permuted
like the base tensor's for llama's Q/K), F32, with ``general.type = adapter``, ``adapter.type = lora`` and
``adapter.lora.alpha``: llama.cpp scales the update by ``alpha / r``, so alpha is written as our scaling times r
(which also carries rsLoRA's ``alpha / sqrt(r)``). Names and the permutation come from the GGUF writer's own map
(:func:`qlora_pipeline.kernels.formats.gguf_tensors.layer_tensor`), so the adapter lines up with the files it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFType, GGUFWriter, Keys

from qlora_pipeline.kernels.formats.atomic import atomic_file
from qlora_pipeline.kernels.formats.gguf_tensors import layer_tensor, permute_qk, read_hparams, read_json
from qlora_pipeline.kernels.formats.peft_adapter import lora_weight_pairs, read_adapter_config, read_adapter_tensors


def write_gguf_lora(
    adapter_dir: Path, base_model_dir: Path, out_path: Path, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """Write the PEFT adapter in ``adapter_dir`` (trained on the model in ``base_model_dir``) as a GGUF LoRA adapter.

    Returns ``{"path", "arch", "n_pairs", "rank", "alpha", "file_size"}``. A target the base's GGUF has no tensor for
    is a one-line ValueError; no file is left at ``out_path`` on any error.
    """
    hp = read_hparams(read_json(Path(base_model_dir) / "config.json"))
    config = read_adapter_config(Path(adapter_dir))
    pairs = lora_weight_pairs(read_adapter_tensors(Path(adapter_dir), config))
    tensors: list[tuple[str, np.ndarray]] = []
    for key in sorted(pairs):
        placed = layer_tensor(hp, key)
        if placed is None:
            raise ValueError(f"the adapter targets {key}, which a {hp.arch} GGUF has no tensor for")
        name, permute_heads = placed
        a, b = (t.float().numpy() for t in pairs[key])
        if permute_heads is not None:
            b = permute_qk(b, permute_heads)
        tensors += [(f"{name}.lora_a", np.ascontiguousarray(a)), (f"{name}.lora_b", np.ascontiguousarray(b))]
    alpha = float(config.scaling * config.r)
    with atomic_file(Path(out_path)) as tmp:
        writer = GGUFWriter(tmp, hp.arch)
        try:
            writer.add_type(GGUFType.ADAPTER)
            writer.add_string(Keys.Adapter.TYPE, "lora")
            writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
            for k, v in (metadata or {}).items():
                writer.add_string(k, v)
            for name, data in tensors:
                writer.add_tensor(name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {
        "path": str(out_path),
        "arch": hp.arch,
        "n_pairs": len(pairs),
        "rank": config.r,
        "alpha": alpha,
        "file_size": Path(out_path).stat().st_size,
    }


__all__ = ["write_gguf_lora"]
