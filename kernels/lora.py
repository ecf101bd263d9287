"""LoRA adapters around frozen linear layers: ``y = base(x) + s * (dropout(x) @ A.T) @ B.T``.

Why a wrapper and not a subclass: the base may be a plain ``nn.Linear`` (merge tests, 16-bit bases) or our frozen
NF4 ``Linear4bit``; anything exposing ``in_features``/``out_features`` and ``forward(x) -> x @ W.T (+ b)`` works,
so the quantized path needs no LoRA-specific code. One shortcut: when training over a ``Linear4bit`` in the branch's
compute dtype, the wrapper asks the base for its weight (``weight_source``) and runs the frozen product and the
branch as one autograd node (kernels/lora_fused.py ``frozen_linear_with_lora``): the same forward, bit for bit,
and an input gradient rounded once instead of twice.

Numerics follow peft 0.21 ``LoraConfig(init_lora_weights=True)`` so that adapters move freely between the two:
A ~ kaiming_uniform_(a=sqrt(5)) (i.e. U(-1/sqrt(in), 1/sqrt(in))), B = 0, s = alpha/r or alpha/sqrt(r) (rsLoRA),
dropout on the LoRA branch input only. Parameter names ``lora_A``/``lora_B`` make the PEFT key of a tensor
``base_model.model.<module path>.lora_A.weight`` a pure string rewrite (see
``qlora_pipeline.kernels.formats.peft_adapter``, the one home of that key format).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from qlora_pipeline.kernels.dropout import FastDropout, SeededMask, draw_seed
from qlora_pipeline.kernels.linear4bit import Linear4bit
from qlora_pipeline.kernels.lora_fused import add_lora_branch, frozen_linear_with_lora

LORA_PARAM_NAMES = ("lora_A", "lora_B")


def _has_linear_shape(module: nn.Module) -> bool:
    """A module we can wrap: it says how many features go in and out (nn.Linear, Linear4bit, ...)."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def module_device(module: nn.Module) -> torch.device:
    """Where a module lives (parameters, else buffers: Linear4bit keeps its packed weight in buffers)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) with rsLoRA (keeps the update's scale stable as r grows)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(nn.Module):
    """A frozen ``base`` plus a trainable low-rank update; only ``lora_A`` (r x in) and ``lora_B`` (out x r) train."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not _has_linear_shape(base):
            raise ValueError(f"LoRA needs a base with int in_features/out_features, got {type(base).__name__}")
        if isinstance(base, LoraLinear):
            raise ValueError("LoRA base is already a LoraLinear; inject LoRA once")
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not adapter_dtype.is_floating_point:
            raise ValueError(f"LoRA adapter dtype must be floating point, got {adapter_dtype}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # None: compute in the adapter dtype, op by op (peft's behaviour). A dtype (training: bf16, or fp32 on a CPU
        # without bf16): the matmuls run in it while A/B stay in adapter_dtype as master weights, as under
        # torch.autocast, and the branch is one autograd node (kernels/lora_fused.py).
        self.compute_dtype = compute_dtype
        # nn.Identity when p == 0 (as peft does): no RNG draw, no extra kernel.
        self.dropout: nn.Module = FastDropout(dropout) if dropout > 0 else nn.Identity()
        device = module_device(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=adapter_dtype))
        # A and B in compute_dtype, handed over for one training step's scope (kernels/lora_copies.py), else None
        self.compute_copies: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default init: A kaiming-uniform(a=sqrt(5)) from torch's global RNG, B zeros, so y == base(x).

        Drawn in fp32 on the CPU then cast and moved, so a seed gives the same A (up to rounding) whatever the
        adapter dtype and device (CUDA's generator would draw other numbers).
        """
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight, for code that inspects ``module.weight`` (dtype/device); LoRA is not folded in."""
        return self.base.weight

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch alone, in the adapter dtype: ``s * (dropout(x) @ A.T) @ B.T``."""
        cd = self.compute_dtype
        if cd is not None and cd != self.lora_A.dtype:
            # scale the r-wide intermediate, not the out-wide result: same math, r/out of the multiplies
            h = self.dropout(x.to(cd))
            return nn.functional.linear(nn.functional.linear(h, self.lora_A.to(cd)) * self.scaling, self.lora_B.to(cd))
        h = self.dropout(x).to(self.lora_A.dtype)
        # Same association order as peft (B(A(x)) * s), so fp32 results agree to the last bits.
        return nn.functional.linear(nn.functional.linear(h, self.lora_A), self.lora_B) * self.scaling

    def _branch_dropout(self) -> tuple[float, SeededMask | None]:
        """The training path's dropout as (scale, seeded mask): the LoRA scaling times the keep-rate rescaling, and
        the mask as its seed (applied without being written, rebuilt in backward; on every device) or none."""
        dropout = self.dropout
        if not isinstance(dropout, FastDropout) or not dropout.training or dropout.threshold == 0:
            return self.scaling, None
        return self.scaling * dropout.scale, SeededMask(draw_seed(), dropout.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        base = self.base
        if (
            cd is not None
            and x.dtype == cd
            and isinstance(base, Linear4bit)
            and base.resolved_compute_dtype(x.device) == cd
        ):
            # the training path on an NF4 base: the frozen product and the branch in one node (kernels/lora_fused.py)
            scale, seeded = self._branch_dropout()
            weight = base.weight_source(cd, x.device)
            return frozen_linear_with_lora(
                x, weight, base.bias, self.lora_A, self.lora_B, scale, seeded=seeded, copies=self.compute_copies
            )
        out = base(x)
        if cd is not None and out.dtype == cd and x.dtype == cd:
            # the training path (a compute dtype set, bf16 or a CPU's fp32) on another base: the branch as one node
            scale, seeded = self._branch_dropout()
            return add_lora_branch(out, x, self.lora_A, self.lora_B, scale, seeded=seeded, copies=self.compute_copies)
        # The sum is taken in the wider of (base output, adapter) dtypes, then cast back to the base output dtype,
        # which is x's dtype for nn.Linear and Linear4bit.
        return (out + self.lora_delta(x)).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.6g}, adapter_dtype={self.adapter_dtype}"
        )


def matches_target(name: str, target: str) -> bool:
    """peft's rule for one entry of a target list: the full name, or a dotted suffix of it (``q_proj``,
    ``self_attn.q_proj``)."""
    return name == target or name.endswith("." + target)


def is_targeted(name: str, targets: list[str] | str) -> bool:
    """peft's ``target_modules`` rule: a string is a regex the full module name must match; a list matches the name
    by :func:`matches_target`. The one place the rule lives (injection here, adapter checks in ``peft_adapter``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(matches_target(name, t) for t in targets)


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Sorted last-name components of the wrappable modules (what a user can put in ``target_modules``)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _has_linear_shape(m)})


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA layer by its module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def inject_lora(
    model: nn.Module,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool = False,
    adapter_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap every targeted linear module in a ``LoraLinear`` and freeze all other parameters; return wrapped names.

    All targets are validated before the model is touched, so a typo leaves the model exactly as it was.
    """
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules must be a list of module names, got the string {target_modules!r}")
    if not target_modules:
        raise ValueError("target_modules is empty; name at least one linear module (e.g. q_proj)")
    existing = lora_modules(model)
    if existing:
        raise ValueError(f"model already has LoRA layers (e.g. {next(iter(existing))}); inject LoRA once")
    linear = {name: m for name, m in model.named_modules() if name and _has_linear_shape(m)}
    available = ", ".join(linear_leaf_names(model))
    for target in target_modules:
        if not any(matches_target(name, target) for name in linear):
            raise ValueError(f"unknown LoRA target {target!r}; linear modules in this model: {available}")
    wrapped = [name for name in linear if is_targeted(name, target_modules)]

    for p in model.parameters():
        p.requires_grad_(False)
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoraLinear(linear[name], r, alpha, dropout, use_rslora, adapter_dtype, compute_dtype)
        setattr(parent, child, lora)
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, ``<module path>.lora_A`` / ``.lora_B``, as detached copies (safe to save later)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().clone()
        out[f"{name}.lora_B"] = m.lora_B.detach().clone()
    return out


def load_lora_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    display_key: Callable[[str], str] = str,
) -> None:
    """Copy A/B tensors into the model's LoRA layers (cast to the adapter dtype); all-or-nothing.

    Every key, shape and missing tensor is checked before the first copy, so a bad file never half-loads.
    ``display_key`` maps our keys to the ones the user sees in their file (e.g. PEFT keys) for error messages.
    """
    params: dict[str, nn.Parameter] = {}
    for name, m in lora_modules(model).items():
        params[f"{name}.lora_A"] = m.lora_A
        params[f"{name}.lora_B"] = m.lora_B
    if not params:
        raise ValueError("model has no LoRA layers; call inject_lora before loading an adapter")
    for key, t in state.items():
        if key not in params:
            module = key.rsplit(".", 1)[0]
            names = list(lora_modules(model))
            some = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(
                f"adapter key {display_key(key)} is for {module!r}, a module the model has no LoRA layer for "
                f"(model LoRA layers: {some})"
            )
        if tuple(t.shape) != tuple(params[key].shape):
            raise ValueError(
                f"shape mismatch for {display_key(key)}: adapter has {tuple(t.shape)}, "
                f"model expects {tuple(params[key].shape)}"
            )
    missing = [k for k in params if k not in state]
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} LoRA tensors the model has, e.g. {display_key(missing[0])}")
    with torch.no_grad():
        for key, t in state.items():
            params[key].copy_(t.to(device=params[key].device, dtype=params[key].dtype))


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s * B @ A`` in fp32 on the tensors' device: the update a merge adds to the base weight."""
    return (lora_B.float() @ lora_A.float()) * scaling


def merged_weight(
    base_weight: torch.Tensor,
    lora: LoraLinear | None = None,
    *,
    delta: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W + s * B @ A`` computed in fp32 and rounded once to ``dtype``, default W's dtype (what peft's merge gives).

    The update comes from a LoRA layer (``lora``) or ready-made from :func:`lora_delta_weight` (``delta``, for a
    caller that also reports it). Takes W separately because the merge goes into the original 16-bit weights, not
    the NF4 base being trained. The one home of the merge arithmetic (the merge stage calls it too).
    """
    if (lora is None) == (delta is None):
        raise ValueError("merged_weight needs exactly one of lora and delta")
    if lora is not None:
        expected = (lora.out_features, lora.in_features)
        if tuple(base_weight.shape) != expected:
            raise ValueError(f"merge: base weight has shape {tuple(base_weight.shape)}, LoRA layer expects {expected}")
        a = lora.lora_A.detach().to(device=base_weight.device, dtype=torch.float32)
        b = lora.lora_B.detach().to(device=base_weight.device, dtype=torch.float32)
        delta = lora_delta_weight(a, b, lora.scaling)
    elif tuple(delta.shape) != tuple(base_weight.shape):
        raise ValueError(f"merge: base weight has shape {tuple(base_weight.shape)}, the update {tuple(delta.shape)}")
    return (base_weight.float() + delta).to(dtype or base_weight.dtype)


def count_trainable(model: nn.Module) -> int:
    """Number of elements that will receive gradients (after inject_lora: only A and B)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters an optimizer should see (after inject_lora: only A and B)."""
    return (p for p in model.parameters() if p.requires_grad)
