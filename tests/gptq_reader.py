"""An independent reader of GPTQ v1 checkpoints for the tests, written from the format description alone.

docs/formats.md, GPTQ v1 checkpoint: per linear with K inputs, N outputs, b bits, p = 32 / b codes per int32 word,
`qweight [K/p, N]` holds input `r·p + j` of output `n` in bits `[b·j, b·j + b)` of word `[r, n]`; `qzeros
[groups, N/p]` holds output `c·p + j` of a group in the same bits of word `[group, c]`, as the zero point minus
one; `scales [groups, N]` fp16; `g_idx [K]` the group of each input. Weight `[N, K]` = scale · (code − zero).

It shares no code with kernels/formats/gptq_folder.py: words are read as unsigned 32-bit numpy integers and every
slot is cut out with Python integer shifts, one slot at a time.
"""

from __future__ import annotations

import numpy as np
import torch


def _slots(words: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] uint32 words → [rows, cols, 32 // bits] codes, slot j holding bits [bits·j, bits·j + bits)."""
    mask = (1 << bits) - 1
    return np.stack([(words >> np.uint32(bits * j)) & np.uint32(mask) for j in range(32 // bits)], axis=-1)


def read_gptq_v1(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    qweight = tensors["qweight"].numpy().view(np.uint32)
    qzeros = tensors["qzeros"].numpy().view(np.uint32)
    scales = tensors["scales"].numpy().astype(np.float32)
    g_idx = tensors["g_idx"].numpy().astype(np.int64)
    k = g_idx.shape[0]
    bits = 32 * qweight.shape[0] // k
    per_word = 32 // bits
    # qweight [K/p, N, p] → codes [K, N]: input r·p + j is slot j of row r
    codes = _slots(qweight, bits).transpose(0, 2, 1).reshape(k, qweight.shape[1]).astype(np.float32)
    # qzeros [G, N/p, p] → zeros [G, N]: output c·p + j is slot j of column c; stored as zero − 1
    zeros = _slots(qzeros, bits).reshape(qzeros.shape[0], qzeros.shape[1] * per_word).astype(np.float32) + 1
    weight_k_n = scales[g_idx] * (codes - zeros[g_idx])
    return torch.from_numpy(np.ascontiguousarray(weight_k_n.T))
