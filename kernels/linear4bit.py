"""Frozen NF4 linear layer for QLoRA: ``y = x @ dequant(W).T + b`` with an input-only backward.

The weight is frozen, so backward needs only ``dL/dx = dL/dy @ dequant(W)``. Nothing dequantized is kept
between forward and backward: the autograd node holds a reference to the (already resident) packed weight
and dequantizes it again, trading one cheap dequant for ``out*in`` 16-bit bytes per layer of activation
memory. The module's state never depends on what ran before (no eval-time repacking as in bnb 0.50.2 on
AVX512-BF16 CPUs, see docs/formats.md, bitsandbytes CPU quirks), so eval-then-train gives the same gradients as
train alone.

The compute dtype, when not given, is the device's default (``kernels/dtypes.py``: bf16 on a GPU and on a CPU
that multiplies bf16 natively, else fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qlora_pipeline.kernels.dtypes import default_compute_dtype
from qlora_pipeline.kernels.nf4 import NF4Weight, nf4_error_stats, quantize_nf4
from qlora_pipeline.kernels.nf4_dispatch import dequantize


@dataclass(frozen=True)
class FrozenWeightSource:
    """A frozen NF4 weight in the compute dtype on demand, for forward and again for backward.

    What an autograd node holds instead of a dequantized weight: the packed bytes and, when the layer keeps one, its
    resident dequantized copy (``cached``), both held by the layer anyway, so keeping the source for backward costs
    no memory."""

    nf4: NF4Weight
    cached: torch.Tensor | None
    dtype: torch.dtype

    def __call__(self) -> torch.Tensor:
        return self.cached if self.cached is not None else dequantize(self.nf4, self.dtype)


class _NF4Linear(torch.autograd.Function):
    """Autograd for a frozen NF4 weight: no weight/bias grad, backward asks `weight` for the weight again."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: FrozenWeightSource,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        b = None if bias is None else bias.to(compute_dtype)
        y = nn.functional.linear(x.to(compute_dtype), weight(), b)
        ctx.weight = weight  # packed bytes or the resident cache (both held by the module anyway), nothing new
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y.to(ctx.compute_dtype) @ ctx.weight()).to(ctx.x_dtype)
        return grad_x, None, None, None


_NF4_STATE = ("packed", "absmax", "nested_absmax", "nested_code")

BYTES_AS_PARAMETER = torch.float8_e5m2
"""The dtype whose view carries the uint8 codes (the packed weight, the double-quantized absmax) while they are
parameters. FSDP2 wraps each shard in ``nn.Parameter(...)`` before it sets ``requires_grad``: torch 2.11 asks a new
parameter to require grad, which no integer tensor can (2.13 passes ``requires_grad`` in). A 1-byte float view of
the same bits is taken; FSDP2 all-gathers tensors of mixed dtypes as their bytes, and :attr:`Linear4bit.nf4` views
them back to uint8, so no bit is ever read as a float."""


def _codes(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """uint8 codes as the dequant reads them, whether held as a buffer (uint8) or a parameter (the float view)."""
    return tensor.view(torch.uint8) if tensor is not None and tensor.dtype == BYTES_AS_PARAMETER else tensor


class Linear4bit(nn.Module):
    """A frozen NF4 ``nn.Linear`` replacement; packed state lives in buffers so ``.to()`` moves it.

    ``state_dict()`` uses bitsandbytes' key layout (``weight``, ``weight.absmax``, ...), so a model made of
    these saves the same keys as a transformers bnb 4-bit checkpoint.
    """

    def __init__(
        self,
        nf4: NF4Weight,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(nf4.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(nf4.shape)}")
        self.out_features, self.in_features = int(nf4.shape[0]), int(nf4.shape[1])
        self.compute_dtype = compute_dtype
        self.dequantized_cache: torch.Tensor | None = None
        """The weight in the compute dtype, kept when :func:`cache_dequantized_weights` gave this layer room: a
        frozen weight never changes, so each forward and backward then skips its dequant. A plain attribute, not a
        buffer: never saved, never sharded, dropped when the layer moves."""
        self._set_nf4(nf4)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _set_nf4(self, nf4: NF4Weight) -> None:
        # Non-persistent: the state dict gets bnb's key names from _save_to_state_dict instead.
        self._meta = {k: getattr(nf4, k) for k in ("offset", "blocksize", "nested_blocksize", "dtype", "shape")}
        self.register_buffer("packed", nf4.packed, persistent=False)
        self.register_buffer("absmax", nf4.absmax, persistent=False)
        self.register_buffer("nested_absmax", nf4.nested_absmax, persistent=False)
        self.register_buffer("nested_code", nf4.nested_code, persistent=False)

    @property
    def nf4(self) -> NF4Weight:
        """The weight as an NF4Weight built from the current buffers or parameters (so it follows ``.to(device)``
        and FSDP2's gathers)."""
        return NF4Weight(
            packed=_codes(self.packed),
            absmax=_codes(self.absmax),
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            **self._meta,
        )

    def store_as_parameters(self) -> None:
        """Hold the packed state as frozen parameters instead of buffers, so FSDP2 shards it with the layer (it
        shards parameters only; each rank then keeps 1/N of the codes and absmax and gathers them around the
        layer's forward and backward). The nested code table is copied: a tensor shared by two layers cannot be
        sharded by both. A dequantized cache is dropped: a rank holds only its shard of the weight. The uint8 codes
        are held as a float view of their bytes (:data:`BYTES_AS_PARAMETER`)."""
        self.dequantized_cache = None
        for name in _NF4_STATE:
            tensor = self._buffers.pop(name)
            if tensor is None:
                self._buffers[name] = None
                continue
            if name == "nested_code":
                tensor = tensor.clone()
            if tensor.dtype == torch.uint8:
                tensor = tensor.view(BYTES_AS_PARAMETER)
            self._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def _apply(self, fn, recurse=True):
        """Let ``.to(device)`` move the packed state but never ``.half()``/``.to(bf16)`` cast it.

        Casting the fp32 nested absmax (or plain absmax) would silently change every dequantized value; the
        bias follows dtype changes like any float tensor.
        """
        held = {}
        for name in _NF4_STATE:
            store = self._parameters if name in self._parameters else self._buffers
            held[name] = (store, store.pop(name))
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (store, tensor) in held.items():
                if tensor is not None and not tensor.is_meta:
                    target = fn(torch.empty(0, device=tensor.device)).device  # where fn sends tensors
                    if tensor.device != target:
                        moved = tensor.data.to(target)
                        tensor = nn.Parameter(moved, requires_grad=False) if store is self._parameters else moved
                        self.dequantized_cache = None
                store[name] = tensor
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._meta["dtype"]

    def resolved_compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype this layer multiplies in on `device`: its own, else the device's default."""
        return self.compute_dtype or default_compute_dtype(device)

    def weight_source(self, dtype: torch.dtype, device: torch.device) -> FrozenWeightSource:
        """Where forward, and backward again, get the weight in `dtype` on `device`: the resident cache when it is
        in that dtype and place, else a fresh dequant of the packed bytes."""
        cache = self.dequantized_cache
        resident = cache is not None and cache.dtype == dtype and cache.device == device
        return FrozenWeightSource(self.nf4, cache if resident else None, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.resolved_compute_dtype(x.device)
        return _NF4Linear.apply(x, self.weight_source(dtype, x.device), self.bias, dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 16/32-bit weight this layer computes with (for merging, checks, export)."""
        return dequantize(self.nf4, dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self._meta['blocksize']}, double_quant={self.nested_absmax is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        from qlora_pipeline.kernels.formats.bnb_folder import nf4_to_state_dict

        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        for key, value in nf4_to_state_dict(prefix, self.nf4).items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        from qlora_pipeline.kernels.formats.bnb_folder import nf4_from_state_dict

        weight_prefix = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == weight_prefix or k.startswith(weight_prefix + ".")}
        if weight_prefix in mine:
            try:
                nf4 = nf4_from_state_dict(prefix, mine)
            except ValueError as exc:
                error_msgs.append(str(exc))
            else:
                if tuple(nf4.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{weight_prefix}: shape {tuple(nf4.shape)} != {tuple(self._meta['shape'])}")
                else:
                    self._set_nf4(nf4 if self.packed.is_meta else nf4.to(self.packed.device))
        elif strict:
            missing_keys.append(weight_prefix)
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_linears_with_4bit(
    model: nn.Module, nf4_weights: dict[str, NF4Weight], compute_dtype: torch.dtype | None = None
) -> None:
    """Swap each named ``nn.Linear`` (module name, no ``.weight``) for a Linear4bit holding its NF4 weight.

    The Linear may live on the meta device (a skeleton being loaded); its bias is kept only if real.
    """
    for name, nf4 in nf4_weights.items():
        parent, attr = _parent_and_attr(model, name)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        if tuple(nf4.shape) != (old.out_features, old.in_features):
            raise ValueError(
                f"{name}: NF4 weight shape {tuple(nf4.shape)} != Linear ({old.out_features}, {old.in_features})"
            )
        bias = old.bias if old.bias is not None and not old.bias.is_meta else None
        new = Linear4bit(nf4, bias=bias, compute_dtype=compute_dtype)
        if old.bias is not None and bias is None:
            new.bias = torch.empty(old.out_features, device="meta", dtype=old.bias.dtype)  # filled by loader
        setattr(parent, attr, new)


def quantize_model_linears(
    model: nn.Module,
    target: Callable[[str], bool],
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """NF4-quantize in place every ``nn.Linear`` whose module name satisfies ``target``.

    Returns per-layer stats ``{rel_error, bytes_before, bytes_after}`` (relative Frobenius error of the
    dequantized weight).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and target(n)]
    stats: dict[str, dict[str, float]] = {}
    weights: dict[str, NF4Weight] = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        nf4 = quantize_nf4(w, blocksize=blocksize)
        weights[name] = nf4
        stats[name] = nf4_error_stats(w, nf4)
    replace_linears_with_4bit(model, weights, compute_dtype)
    return stats


@torch.no_grad()
def cache_dequantized_weights(model: nn.Module, budget_bytes: int, dtype: torch.dtype) -> int:
    """Keep the dequantized weight of every Linear4bit, in model order, while the copies fit ``budget_bytes``;
    returns the bytes kept.

    Training re-dequantizes each frozen weight two or three times a step (forward, recomputed forward,
    backward); on a CPU that costs a quarter of a SmolLM2 step (bench/results/profile_step-before.txt). Keeping
    the copies trades memory the host has for that time; on a GPU the memory is what QLoRA saves, so the caller
    budgets it. The copies are views of one buffer allocated up front, so the dequant's temporaries cannot
    fragment the heap between them. The values are the dequant's own: a cached layer computes exactly what an
    uncached one does.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for module in layers:
        module.dequantized_cache = None
    chosen, kept = [], 0
    item = torch.empty(0, dtype=dtype).element_size()
    for module in layers:
        size = module.out_features * module.in_features
        if kept + size * item <= budget_bytes:
            chosen.append(module)
            kept += size * item
    if not chosen:
        return 0
    flat = torch.empty(kept // item, dtype=dtype, device=chosen[0].packed.device)
    offset = 0
    for module in chosen:
        size = module.out_features * module.in_features
        view = flat[offset : offset + size].view(module.out_features, module.in_features)
        view.copy_(module.dequantized_weight(dtype))
        module.dequantized_cache = view
        offset += size
    return kept


def cached_weight_bytes(model: nn.Module) -> int:
    """Bytes of dequantized weights the model's Linear4bit layers keep now."""
    caches = (m.dequantized_cache for m in model.modules() if isinstance(m, Linear4bit))
    return sum(c.numel() * c.element_size() for c in caches if c is not None)
