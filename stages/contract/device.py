"""The one device setting (`runtime.device`) every computing stage honours, its memory peaks, and the cap on the
CPU's caches of compiled matmul kernels (:func:`bound_cpu_kernel_caches`).

`auto` is cuda:0 when torch sees a GPU, else the CPU; anything named explicitly must exist, or the run stops
before any work with one line: a GPU node whose torch lost its CUDA build must not quietly train on the CPU for a
day. The resolved device goes into each manifest and MLflow run, with `max_memory_allocated/reserved` on CUDA.
"""

from __future__ import annotations

import os
from typing import Any

from qlora_pipeline.stages.contract.errors import InputError


def resolve_device(spec: str) -> Any:
    """`runtime.device` → a torch.device with an index (cpu stays plain), or InputError naming the fix."""
    import torch

    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(
            f"runtime.device = {spec!r} is not a device torch knows; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise InputError(
            f"runtime.device = {spec!r} but torch {torch.__version__} sees no {dev.type} device; install a torch "
            f"build with {dev.type} support (make setup TORCH_SPEC=...) or set runtime.device: cpu"
        )
    index = 0 if dev.index is None else dev.index
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else 1
    if index >= count:
        raise InputError(
            f"runtime.device = {spec!r} but only {count} {dev.type} device(s) are visible; use 0..{count - 1}"
        )
    return torch.device(dev.type, index)


def resolve_nproc(params: Any) -> int:
    """train.nproc, with auto = the GPUs of the node when the run computes on a GPU, else 1."""
    nproc = params.train.nproc
    if nproc != "auto":
        return int(nproc)
    import torch

    return torch.cuda.device_count() if resolve_device(params.runtime.device).type == "cuda" else 1


def check_nproc(params: Any) -> int:
    """train.nproc resolved, refused in one line when a batch cannot give every rank an example."""
    nproc, batch = resolve_nproc(params), params.train.batch_size
    if batch < nproc:
        raise InputError(
            f"train.batch_size={batch} gives some of the {nproc} processes no example; set train.batch_size to at "
            "least train.nproc"
        )
    return nproc


def reset_peak_memory(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.empty(0, device=device)  # the allocator must exist first, else "Invalid device argument" (torch 2.11)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: Any) -> dict[str, float]:
    """Allocator peaks since the last reset (CUDA), in MiB; {} for devices without an allocator API."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return {
        "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "cuda_max_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
    }


def describe(device: Any) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu' for reports."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


CPU_KERNEL_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "1"}
"""oneDNN's primitive cache (1,024 by default) and torch's ideep LRU cache of matmul primitives, capped."""


def bound_cpu_kernel_caches() -> None:
    """Cap the caches of compiled CPU matmul kernels for this process, unless the environment already sets them.

    Why: a 16-bit matmul on a CPU runs a oneDNN primitive compiled for its exact shape, and every new batch length
    is a new shape (about 40 primitives a step), which both caches keep. Training on batches of varying length, the
    process's RSS grew by ~25 MB a step without end; capped, it levels off within ten steps (SmolLM2, packed batches,
    20 steps: peak RSS 1,817 → 1,525 MB, step time unchanged, docs/speed.md). 64 holds one step's primitives, so
    a step's repeated shapes (forward, backward, recomputation) still hit. Both caches read their capacity once,
    at their first use, so this runs before the process's first 16-bit CPU matmul: at the CLI's and the flow's
    start and before train builds its model."""
    for name, value in CPU_KERNEL_CACHE_ENV.items():
        os.environ.setdefault(name, value)
