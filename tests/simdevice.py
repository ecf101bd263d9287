"""A simulated accelerator for CPU-only machines: catches tensors on the wrong device and counts host syncs.

torch cannot make fake "cuda" tensors on a CPU build that survive `module.to("cuda")` (no CUDA device guard), and
the meta device carries no values. So this registers torch's Python-side PrivateUse1 backend under the name
``sim``; a ``sim`` tensor is a wrapper subclass around a real CPU tensor that reports ``device='sim:0'``. Every op
on it unwraps, computes on the CPU and re-wraps, so losses, optimizers and checkpoints produce real numbers, while:

- an op that mixes a ``sim`` tensor with a CPU tensor of one or more dimensions raises the error CUDA raises
  ("Expected all tensors to be on the same device ..."); copies between devices, CPU index tensors and CPU
  0-dim scalars are allowed, as on CUDA;
- every host sync is recorded with the frame of repository code that caused it: a scalar read (`item`, `float`,
  `tolist`, `bool`), a device-to-host copy, a blocking host-to-device copy, and the ops whose output size depends
  on values (`nonzero`, boolean indexing, `masked_select`, ...).

Use ``with simulated_device() as sim:`` and pass ``runtime.device: sim`` to the stages; ``sim.syncs`` lists the
syncs. Code that tests ``tensor.is_cuda`` takes its non-CUDA branch on ``sim`` (Triton kernels are tested on their
own under the interpreter).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

NAME = "sim"
REPO = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

_MIXING_ALLOWED = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_VALUE_SIZED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


class _SimModule:
    """`torch.sim`: what torch asks of a device module (availability, RNG hooks for activation checkpointing,
    autocast dtypes). Random numbers come from the CPU generator, which checkpointing saves and restores anyway."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass

    @staticmethod
    def get_rng_state(device: object = None) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: object = None) -> None:
        pass

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @staticmethod
    def synchronize(device: object = None) -> None:
        pass

    class device(contextlib.nullcontext):  # torch looks the name up as `torch.<backend>.device`
        def __init__(self, index: object = None) -> None:
            super().__init__()


def _register() -> None:
    """Once per process: name PrivateUse1 `sim`, with Python-side hooks, device guard and `torch.sim` module."""
    if torch._C._get_privateuse1_backend_name() == NAME:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(NAME, backend_module=_SimModule())


_register()
SIM = torch.device(NAME, 0)


@dataclass
class Sync:
    op: str
    where: str


@dataclass
class SimDevice:
    syncs: list[Sync] = field(default_factory=list)

    def record(self, op: str) -> None:
        frames = [
            f
            for f in traceback.extract_stack()[:-3]
            if f.filename.startswith(str(REPO)) and "site-packages" not in f.filename and f.filename != __file__
        ]
        where = f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno}" if frames else "outside the repo"
        self.syncs.append(Sync(op, where))


_active: SimDevice | None = None


class SimTensor(torch.Tensor):
    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> SimTensor:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=SIM,
            requires_grad=inner.requires_grad,
        )
        r.inner = inner
        return r

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"SimTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_sim_device(dev: object) -> bool:
    return dev is not None and torch.device(dev).type == NAME


def _check_same_device(func, args, kwargs) -> None:
    if func in _MIXING_ALLOWED:
        return
    checked = args
    if func in _INDEX_OPS:  # CUDA accepts index tensors on the CPU
        checked = (args[0], *args[2:])
    flat, _ = tree_flatten((checked, kwargs))
    for x in flat:
        if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor) and x.dim() > 0:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {SIM} and "
                f"{x.device}! (in {func}, a CPU tensor of shape {tuple(x.shape)})"
            )


def _note_syncs(func, args, kwargs, sim_in: bool, to_sim: bool) -> None:
    if _active is None or not (sim_in or to_sim):
        return
    name = str(func.overloadpacket.__name__)
    if func is aten._local_scalar_dense.default or func in _VALUE_SIZED:
        _active.record(name)
    elif func in _INDEX_OPS and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
    ):
        _active.record(f"{name} (boolean mask)")
    elif func is aten._to_copy.default:
        src_sim = isinstance(args[0], SimTensor)
        if src_sim and not to_sim and kwargs.get("device") is not None:
            _active.record("copy to host")
        elif to_sim and not src_sim and not kwargs.get("non_blocking", False):
            _active.record("blocking copy to device")
    elif func is aten.copy_.default:
        dst_sim, src_sim = isinstance(args[0], SimTensor), isinstance(args[1], SimTensor)
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        if src_sim and not dst_sim:
            _active.record("copy to host")
        elif dst_sim and not src_sim and args[1].dim() > 0 and not non_blocking:
            _active.record("blocking copy to device")


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    sim_in = [x for x in flat if isinstance(x, SimTensor)]
    to_sim = _is_sim_device(kwargs.get("device"))
    if sim_in:
        _check_same_device(func, args, kwargs)
    _note_syncs(func, args, kwargs, bool(sim_in), to_sim)
    inner_of = {id(x.inner): x for x in sim_in}
    a = tree_map(lambda x: x.inner if isinstance(x, SimTensor) else x, args)
    k = tree_map(lambda x: x.inner if isinstance(x, SimTensor) else x, kwargs)
    if "device" in k and to_sim:
        k["device"] = torch.device("cpu")
    k.pop("pin_memory", None) if to_sim else None
    out = func(*a, **k)
    if func is aten._to_copy.default and not to_sim and kwargs.get("device") is not None:
        return out  # to the host: a plain CPU tensor
    if not (sim_in or to_sim):
        return out

    def wrap(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, SimTensor):
            same = inner_of.get(id(x))  # an in-place op returns its own argument
            return SimTensor(x) if same is None else same
        return x

    return tree_map(wrap, out)


class _DeviceMode(TorchDispatchMode):
    """Catches factory calls with device='sim' (torch.empty(..., device=...), .to('sim') of a CPU tensor)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _ConstructorMode(TorchFunctionMode):
    """torch.tensor(data, device='sim') builds in C++ past the dispatch modes: build on the CPU, then move; and
    Tensor.tolist, which torch refuses for subclasses, reads the wrapped values (a host sync)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _is_sim_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).to(SIM)
        if func is torch.Tensor.tolist and isinstance(args[0], SimTensor):  # not dispatched for subclasses
            if _active is not None:
                _active.record("tolist")
            return args[0].inner.tolist()
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_device() -> Iterator[SimDevice]:
    """Make ``sim`` a usable device for the duration of the block; yields the sync log."""
    global _active
    sim = SimDevice()
    _active = sim
    try:
        with _ConstructorMode(), _DeviceMode():
            yield sim
    finally:
        _active = None
