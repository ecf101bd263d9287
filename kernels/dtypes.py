"""The floating dtypes the project reads and writes, by the names configs use (params.yaml, HF config.json, bnb
quant state): the one map between those names and torch dtypes."""

from __future__ import annotations

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
