"""LoRA adapters around frozen linear layers: ``y = base(x) + s * (dropout(x) @ A.T) @ B.T``.

Why a wrapper and not a subclass: the base may be a plain ``nn.Linear`` (merge tests, 16-bit bases) or our frozen
NF4 ``Linear4bit``; anything exposing ``in_features``/``out_features`` and ``forward(x) -> x @ W.T (+ b)`` works,
so the quantized path needs no LoRA-specific code.

Numerics follow peft 0.21 ``LoraConfig(init_lora_weights=True)`` so that adapters move freely between the two:
A ~ kaiming_uniform_(a=sqrt(5)) (i.e. U(-1/sqrt(in), 1/sqrt(in))), B = 0, s = alpha/r or alpha/sqrt(r) (rsLoRA),
dropout on the LoRA branch input only. Parameter names ``lora_A``/``lora_B`` make the PEFT key of a tensor
``base_model.model.<module path>.lora_A.weight`` a pure string rewrite (see
``qlora_pipeline.kernels.formats.peft_adapter``, the one home of that key format).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from qlora_pipeline.kernels import dropout_cpu
from qlora_pipeline.kernels.lora_fused import add_lora_branch

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


_SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as int64 bit patterns (torch wraps)
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9 - 2**64
_SPLITMIX_M2 = 0x94D049BB133111EB - 2**64


def draw_seed() -> int:
    """One draw of torch's global CPU generator: the seed of a CPU dropout mask (checkpointing's RNG replay and a
    resumed generator state give the same draw)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def splitmix64(seed: int, count: int, device: torch.device) -> torch.Tensor:
    """Words ``seed + i·golden`` for i < count through splitmix64's finalizer: 64 random bits each, in a dozen
    vectorized in-place tensor ops over two buffers (a counter-based generator, so it runs on every core; torch's
    CPU ``random_`` is one serial Mersenne twister)."""
    z = torch.arange(count, dtype=torch.int64, device=device).mul_(_SPLITMIX_GOLDEN).add_(seed)
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _SPLITMIX_M1), (27, _SPLITMIX_M2), (31, None)):
        # z ^= z >>> bits (a logical shift: torch's >> on int64 is arithmetic, so the sign copies are masked off)
        torch.bitwise_right_shift(z, bits, out=shifted).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(multiplier)
    return z


_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}
"""The int16 bit pattern of 1.0 in each 16-bit float dtype."""


def reference_keep_mask(seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The CPU keep mask in torch ops, the reference of kernels/dropout_cpu.py: lane k is the k % 4-th signed
    16-bit piece of :func:`splitmix64` word k // 4 of `seed`; kept (1) where it is at or above threshold - 32768."""
    n = math.prod(shape)
    lanes = splitmix64(seed, -(-n // 4), torch.device("cpu")).view(torch.int16)[:n]
    return _keep_from_lanes(lanes, threshold, shape, dtype)


def _keep_from_lanes(lanes: torch.Tensor, threshold: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    # signed lanes: dropped below t = threshold - 32768. Clamped to {t - 1, t}, minus (t - 1): 0 dropped, 1 kept
    t = threshold - 32768
    keep = lanes.clamp_(t - 1, t).sub_(t - 1)
    one = _ONE_BITS.get(dtype)
    return (keep.mul_(one).view(dtype) if one is not None else keep.to(dtype)).view(shape)


class FastDropout(nn.Module):
    """Inverted dropout with the same semantics as ``nn.Dropout`` and a cheaper mask.

    An element is dropped when a uniform 16-bit lane falls under a threshold, so the drop probability is p rounded
    to a multiple of 1/65536 (0.05 → 0.0500031) and survivors are scaled by the exact inverse keep rate: E[output] =
    input. On a CPU the lanes come from :func:`splitmix64` seeded by one draw of torch's global generator (four
    lanes a word; in torch ops about a third of ``bernoulli_``'s time, bench/results/profile_step-*.txt, and in
    one compiled pass, kernels/dropout_cpu.py, the same bits in a fraction of that); elsewhere from the
    device generator's ``random_`` (three lanes of each non-negative 64-bit draw). Either way activation
    checkpointing's RNG replay reproduces the masks, and a saved generator state resumes them exactly.

    The mask is a tensor of 0 (dropped) and 1 (kept) in the input's dtype, applied by a multiply: a lane clamped to
    the two values either side of the threshold and shifted to 0/1 is two fast integer passes, and for a 16-bit
    dtype one more multiply makes it the bit pattern of 1.0 (no conversion pass; a mixed-dtype multiply would
    convert the mask at every use). A 16-bit multiply costs about a sixth of a boolean ``masked_fill`` on a CPU
    (docs/speed.md).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)
        self.scale = 65536.0 / (65536 - self.threshold)

    def keep_mask(self, shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`dtype`, `shape`: 1 where an element is kept, 0 where it is dropped."""
        if self.threshold == 0:
            return torch.ones(shape, dtype=dtype, device=device)
        if device.type == "cpu":
            return self.mask_from_seed(draw_seed(), shape, dtype)
        n = math.prod(shape)
        words = torch.empty(-(-n // 3), dtype=torch.int64, device=device).random_()
        lanes = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n]
        return _keep_from_lanes(lanes, self.threshold, shape, dtype)

    def mask_from_seed(self, seed: int, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The CPU's mask of one :func:`draw_seed` draw: a pure function of the seed, so the same call rebuilds it
        bit for bit (kernels/lora_fused.py rebuilds it in backward instead of keeping it). Made by the compiled
        one-pass kernel (kernels/dropout_cpu.py) where it runs, else by :func:`reference_keep_mask`: the same bits."""
        if self.threshold == 0:
            return torch.ones(shape, dtype=dtype)
        fast = dropout_cpu.keep_mask(seed, self.threshold, shape, dtype, reference_keep_mask)
        return fast if fast is not None else reference_keep_mask(seed, self.threshold, shape, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return (x * self.scale).mul_(self.keep_mask(x.shape, x.device, x.dtype))

    def mask_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """(the keep mask for `x` or None, the survivors' rescaling) for a caller that applies both itself: the
        same draw as :meth:`forward` makes, so the two give the same mask from the same generator state."""
        if not self.training or self.threshold == 0:
            return None, 1.0
        return self.keep_mask(x.shape, x.device, x.dtype), self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        cd = self.compute_dtype
        if cd is not None and out.dtype == cd and x.dtype == cd:
            # the training path (a compute dtype set, bf16 or a CPU's fp32): one autograd node (kernels/lora_fused.py)
            dropout = self.dropout
            if not isinstance(dropout, FastDropout) or not dropout.training or dropout.threshold == 0:
                return add_lora_branch(out, x, self.lora_A, self.lora_B, self.scaling)
            if x.device.type != "cpu":
                keep = dropout.keep_mask(x.shape, x.device, x.dtype)
                return add_lora_branch(out, x, self.lora_A, self.lora_B, self.scaling * dropout.scale, keep)
            # on the CPU the mask is a function of one seed: rebuilt in backward rather than kept (2 bytes an element)
            rebuild = functools.partial(dropout.mask_from_seed, draw_seed(), x.shape, x.dtype)
            scale = self.scaling * dropout.scale
            return add_lora_branch(out, x, self.lora_A, self.lora_B, scale, rebuild(), rebuild)
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
