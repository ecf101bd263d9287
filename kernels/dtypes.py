"""The floating dtypes the project reads and writes, by the names configs use (params.yaml, HF config.json, bnb
quant state): the one map between those names and torch dtypes, and the compute dtype a device runs fastest.

Compute dtype on a CPU, forward + backward of one SmolLM2-sized NF4 layer 576 -> 1536 on 8x256 tokens
(``bench/bench_linear4bit.py``, torch 2.13.0+cpu, 2 threads), medians:

    2-core AMD EPYC, AVX512-BF16:      fp32 45.5 ms   bf16 14.8-18.9 ms   (bf16 2.4-3.1x faster)
    2-core AMD EPYC, AVX2, no AVX-512: fp32 73.5 ms   bf16 1,773 ms       (bf16 24x slower)

Without bf16 dot-product instructions oneDNN takes no bf16 matmul and torch falls back to a scalar loop, so
bf16 is the default only where the CPU multiplies bf16 natively (docs/speed.md, "CPUs without bf16").
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import torch

# Order matters: error messages list the names in this order.
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NAMED_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` / ``"float16"`` / ``"float32"`` -> the torch dtype; any other name is a ValueError."""
    try:
        return NAMED_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {list(NAMED_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The inverse of :func:`torch_dtype` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no name here; expected one of {list(NAMED_DTYPES)}") from None


def config_dtype(config: dict[str, Any], default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a HF ``config.json`` says its weights are in (``dtype``, or the older ``torch_dtype``); ``default``
    when it names none or one we do not know (e.g. ``"auto"``)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return NAMED_DTYPES.get(str(name), default)


@functools.cache
def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions: AVX512-BF16 or AMX on x86, the BF16 extension on ARM
    (what oneDNN's bf16 matmuls run on). Private torch probes, so anything unexpected reads as no."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype matmuls run in when params say ``auto``: bf16 on a GPU and on a CPU that multiplies bf16
    natively, fp32 on any other CPU (see the module docstring for the measurements)."""
    if torch.device(device).type != "cpu" or cpu_multiplies_bf16():
        return torch.bfloat16
    return torch.float32


def compute_dtype_of(name: str, device: torch.device | str) -> torch.dtype:
    """A params compute dtype (``auto`` or a dtype name) on `device`."""
    return default_compute_dtype(device) if name == "auto" else torch_dtype(name)
