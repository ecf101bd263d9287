"""The weights a GGUF file holds, put back into the Hugging Face model they came from (a test oracle).

Each 2-D tensor is dequantized with gguf-py (its own decoders, not ours) and, for llama's permuted Q/K, put back in
HF's row order; 1-D tensors (norms, biases) are left as the model has them. Running transformers on the result gives
what the file's weights compute with exact fp32 activations, so comparing llama.cpp's logits with it isolates the
reader (llama.cpp also quantizes activations) from what the quantized weights themselves cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from qlora_pipeline.kernels.formats.gguf_tensors import Hparams, layer_tensor


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the writer's Q/K permutation: llama.cpp's adjacent pairs back to HF's halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@torch.no_grad()
def load_gguf_weights(model: torch.nn.Module, gguf_path: Path, hp: Hparams) -> int:
    """Overwrite ``model``'s 2-D weights with the file's; returns how many were replaced."""
    params = dict(model.named_parameters())
    where: dict[str, tuple[str, int | None]] = {"token_embd.weight": ("model.embed_tokens.weight", None)}
    if "lm_head.weight" in params and not hp.tied:
        where["output.weight"] = ("lm_head.weight", None)
    for key in params:
        placed = layer_tensor(hp, key)
        if placed is not None:
            where[placed[0]] = (key, placed[1])
    replaced = 0
    for t in GGUFReader(gguf_path).tensors:
        if t.name not in where or len(t.shape) != 2:
            continue
        key, heads = where[t.name]
        w = dequantize(np.array(t.data), t.tensor_type).reshape(params[key].shape)
        if heads is not None:
            w = _unpermute(w, heads)
        params[key].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        replaced += 1
    return replaced
