"""NF4 dequantization for whatever device the weight is on: the Triton kernel on CUDA, the torch reference elsewhere.

Its own module so that the import graph has no cycle: ``nf4_triton`` imports the reference's types and tables from
``nf4``, and only this dispatcher knows both (Triton imported lazily, so a CPU-only process never loads it).
"""

from __future__ import annotations

import torch

from qlora_pipeline.kernels.nf4 import NF4Weight, dequantize_nf4


def dequantize(nf4: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The one-launch Triton kernel on CUDA, the torch reference elsewhere (same bits)."""
    if nf4.packed.is_cuda:
        from qlora_pipeline.kernels.nf4_triton import dequantize_nf4_triton  # lazy: CPU processes never need Triton

        return dequantize_nf4_triton(nf4, dtype or nf4.dtype)
    return dequantize_nf4(nf4, dtype)
