"""A Hugging Face model folder read piece by piece: its weight files, lazy per-tensor reads, a meta-device skeleton of
its model class, and a sharded safetensors writer.

These are what lets quantize, merge and GPTQ hold one shard or one decoder layer at a time instead of the model
(docs/architecture.md, Memory on one host). Never unpickles: only safetensors are read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(model_dir: Path) -> list[str]:
    """The folder's safetensors files (from the index when there is one), each checked to exist."""
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face model folder")
    if (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:  # names are joined to this folder (and to the folders written from it)
            if not _plain_shard_name(name):
                raise ValueError(
                    f"{model_dir / INDEX_FILE} names {name!r} as a shard: not a .safetensors file in that folder; "
                    "the index is corrupt or hostile, replace it"
                )
    elif (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    for name in files:
        if not (model_dir / name).is_file():
            raise ValueError(f"{model_dir / name} listed in {INDEX_FILE} does not exist")
    return files


def _plain_shard_name(name: object) -> bool:
    """A file name of this folder: no directory part, no '..', a .safetensors suffix."""
    return (
        isinstance(name, str)
        and name.endswith(".safetensors")
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and not name.startswith(".")
    )


class LazyTensors:
    """Tensors of a folder by key, read on demand: the headers are read once, each ``read`` opens and closes the
    files it needs, so no mapping (and no page of a shard) outlives the call."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.file_of: dict[str, str] = {}
        for name in weight_files(self.model_dir):
            with safe_open(str(self.model_dir / name), framework="pt") as st:
                self.file_of.update(dict.fromkeys(st.keys(), name))

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``keys`` as tensors (floating ones cast to ``dtype`` when given), one file open at a time."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            with safe_open(str(self.model_dir / name), framework="pt") as st:
                for k in names:
                    t = st.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


class ShardWriter:
    """Writes tensors as they come into safetensors shards of at most ``max_shard_bytes`` (one tensor larger than
    that gets a shard of its own), then names them ``model-0000k-of-0000n.safetensors`` with an index, or
    ``model.safetensors`` when one shard holds everything. Only the shard being filled is in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor.detach().cpu().contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.written):05d}.tmp"
        safetensors.torch.save_file(self.pending, str(self.out_dir / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names (and the index when there are several); returns the names."""
        self.flush()
        n = len(self.written)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        weight_map: dict[str, str] = {}
        for (tmp, keys), final in zip(self.written, names, strict=True):
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update(dict.fromkeys(keys, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _compute_buffers(model: nn.Module) -> None:
    """Give the meta skeleton real non-persistent buffers (rotary tables: computed from the config, not loaded).

    They are rebuilt on the CPU by transformers' own initializer (``_init_weights``), which is what its
    ``from_pretrained`` does after building a model on the meta device. A buffer that initializer does not fill is
    an error, not garbage: it is pre-filled with NaN and checked.
    """
    for module in model.modules():
        names = [
            n
            for n, b in module._buffers.items()
            if b is not None and b.is_meta and n in module._non_persistent_buffers_set
        ]
        if not names:
            continue
        for n in names:
            b = module._buffers[n]
            module._buffers[n] = torch.full(b.shape, float("nan") if b.is_floating_point() else 0, dtype=b.dtype)
        model._init_weights(module)
        unset = [n for n in names if module._buffers[n].is_floating_point() and module._buffers[n].isnan().any()]
        if unset:
            raise ValueError(
                f"{type(module).__name__}.{unset[0]} is a computed buffer the loader cannot rebuild; "
                "this architecture is not supported"
            )


def meta_skeleton(config) -> nn.Module:
    """The HF causal-LM for ``config`` with meta parameters (no weight memory, no init cost) and real buffers.

    Built under ``torch.device("meta")`` (a per-thread context, nothing patched), then the computed buffers are
    made real by :func:`_compute_buffers`. A ``quantization_config`` is dropped: callers build plain modules. The
    attention is the one the family needs (kernels/attention.py, :func:`use_family_attention`).
    """
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels.attention import use_family_attention

    config = type(config).from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        arch = getattr(config, "architectures", None) or [config.model_type]
        raise ValueError(f"unsupported architecture {arch[0]}: {exc}") from None
    _compute_buffers(model)
    return use_family_attention(model)


__all__ = ["INDEX_FILE", "SINGLE_FILE", "LazyTensors", "ShardWriter", "meta_skeleton", "weight_files"]
