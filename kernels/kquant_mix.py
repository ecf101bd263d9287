"""Which GGML type llama.cpp's Q4_K_M and Q5_K_M give each tensor (``src/llama-quant.cpp``,
``llama_tensor_get_type_impl`` and ``tensor_type_fallback``), without an importance matrix, for the dense families of
:mod:`qlora_pipeline.kernels.architectures`. The block quantizers themselves are :mod:`qlora_pipeline.kernels.kquants`
(K-quants) and gguf-py (the 32-value types)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gguf import GGMLQuantizationType as QT

from qlora_pipeline.kernels.kquants import QK_K

__all__ = ["MIX_BASE", "Fallback", "k_m_type_for", "use_more_bits"]


@dataclass(frozen=True)
class Fallback:
    """One tensor that could not get the type the mix asked for, and why (llama.cpp logs the same warning)."""

    tensor: str
    wanted: str
    used: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v/ffn_down get Q6_K in Q4_K_M: first and last eighth plus every
    third layer in between (C integer division; the operands are never negative where it matters)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_BLOCK_SIZE = {
    QT.Q4_K: 256,
    QT.Q5_K: 256,
    QT.Q6_K: 256,
    QT.Q5_0: 32,
    QT.Q5_1: 32,
    QT.Q8_0: 32,
    QT.Q4_0: 32,
    QT.F16: 1,
    QT.F32: 1,
}
_SHAPE_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _shape_fallback(name: str, wanted: QT, cols: int, fallbacks: list[Fallback] | None) -> QT:
    """tensor_type_fallback: a row length the block size does not divide gets the 32-block type, else F16."""
    if cols % _BLOCK_SIZE[wanted] == 0:
        return wanted
    used = _SHAPE_FALLBACK.get(wanted, QT.F16)
    reason = f"ncols {cols} not divisible by {_BLOCK_SIZE[wanted]} (required for {wanted.name})"
    if cols % _BLOCK_SIZE[used] != 0:
        used = QT.F16
        reason += "; fallback type does not fit either, using F16"
    if fallbacks is not None:
        fallbacks.append(Fallback(name, wanted.name, used.name, reason))
    return used


MIX_BASE = {"Q4_K_M": QT.Q4_K, "Q5_K_M": QT.Q5_K}
"""The `_K_M` file types and the K-quant most of their tensors get (llama_ftype_get_default_type)."""


def k_m_type_for(
    mix: str,
    tensor_name: str,
    layer: int,
    n_layers: int,
    cols: int,
    *,
    tied_embeddings: bool = True,
    fallbacks: list[Fallback] | None = None,
) -> QT:
    """The GGML type llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M or _Q5_K_M (``mix``) gives a tensor (no imatrix, dense
    model).

    tensor_name is the GGUF name (e.g. "blk.3.attn_v.weight"), layer its block index (llama.cpp counts attn_v and
    ffn_down tensors in file order, which is the block index; ignored for non-block tensors),
    cols the row length (GGUF ne[0]). tied_embeddings mirrors llama.cpp's `has_tied_embeddings` (true when the file
    has no output.weight): a tied token_embd is quantized like the output head. When the chosen type does not fit the
    row length, the fallback is appended to `fallbacks` (if given) so callers can report it.

    Rules: norms and non-"weight" tensors stay F32; output.weight (and tied token_embd) -> Q6_K, or Q8_0 when
    cols % 256 != 0; attn_v, a fused attn_qkv (Phi-3: llama.cpp counts it as attn_v; its Q5_K rule for attn_qkv
    comes after that branch and is never reached) and ffn_down -> Q6_K in `use_more_bits` layers, else the base;
    everything else the base (Q4_K, or Q5_K for Q5_K_M); then Q4_K -> Q5_0, Q5_K -> Q5_1 and Q6_K -> Q8_0 when
    cols % 256 != 0, and F16 when even 32 does not divide cols.
    """
    base = MIX_BASE[mix]
    if not tensor_name.endswith("weight") or "_norm.weight" in tensor_name:
        return QT.F32
    is_output = tensor_name == "output.weight" or (tied_embeddings and tensor_name == "token_embd.weight")
    if is_output:
        if cols % QK_K != 0:
            used = QT.Q8_0 if cols % 32 == 0 else QT.F16
            if fallbacks is not None:
                fallbacks.append(
                    Fallback(tensor_name, "Q6_K", used.name, f"ncols {cols} not divisible by 256 (output-tensor rule)")
                )
            return used
        return QT.Q6_K
    if any(k in tensor_name for k in ("attn_v.weight", "attn_qkv.weight", "ffn_down")):
        wanted = QT.Q6_K if use_more_bits(layer, n_layers) else base
    else:
        wanted = base
    return _shape_fallback(tensor_name, wanted, cols, fallbacks)
