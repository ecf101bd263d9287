"""The bytes of live torch tensors on one device type, and their peak, counted op by op (any device, the CPU too).

The check on :mod:`memory_plan`'s arithmetic: the process's RSS mixes in the allocator, Python and libraries, and
`torch.cuda.max_memory_allocated` exists only on CUDA, so on the CPU we count storages ourselves. A dispatch mode
sees every tensor an operator returns; each new storage is added when first seen and subtracted when Python frees
it. (torch's own `MemTracker` refuses models with frozen parameters, which is every QLoRA model.)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """`with AllocationTracker("cpu") as t: ...` then `t.peak` (bytes); `track(...)` first what existed before."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._refs: list[weakref.ref] = []

    def track(self, *objects: Any) -> None:
        """Count tensors that exist already: modules' parameters and buffers, optimizers' state, plain tensors."""
        for obj in objects:
            for tensor in _tensors_of(obj):
                self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type:
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(storage, lambda _ref, key=key: self._free(key)))

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


def _tensors_of(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from (b for b in obj.buffers() if b is not None)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from (v for v in tree_flatten(state)[0] if isinstance(v, torch.Tensor))


__all__ = ["AllocationTracker"]
