"""Cheap elementwise blocks that keep their inputs, not their intermediates, for backward.

Why: autograd over transformers' RMSNorm keeps its input upcast to fp32 (4 bytes an element where the input
is 2), and over the gated MLP ``down(act(gate(x)) * up(x))`` it keeps gate, act(gate) and up (three 16-bit
tensors of the FFN width). Recomputing these few elementwise ops in backward from their 16-bit inputs costs a
handful of passes over small tensors and frees 69 KB + 92 KB of saved activations per token on SmolLM2
(30 layers: 2 norms × 576 × 2 bytes, 1536 × 2 bytes per layer), about a sixth of what a layer keeps.

Exact: backward reruns the module's own forward code on the same inputs and differentiates it with autograd, or,
for the frozen Llama RMSNorm and the SiLU-gated MLP (Llama, Mistral, Qwen), applies autograd's own formulas to them
op by op without the nested autograd (``_FrozenRMSNorm``, ``_SiluGateTimesUp``); either way the values and
gradients are the unpatched module's bit for bit in bf16 (tests/unit/test_slim_activations.py; in fp32, where the
norm's fp32 input is its input itself, the unpatched graph sums that input's gradient terms in another order). A
module is patched only when its class's ``forward`` is the source form this relies on (checked on the source text),
so a family or a transformers version that computes it differently keeps its own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from types import MethodType
from typing import Any

import torch
from torch import nn

from qlora_pipeline.kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from qlora_pipeline.kernels.source_form import source_has
from qlora_pipeline.kernels.swiglu import swiglu_backward, swiglu_forward

RMSNORM_FORM = (
    "hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
"""Lines of the Llama-style RMSNorm forward (Llama, Mistral, Qwen2/3, Phi-3); Gemma's (1 + w) form differs."""
RMSNORM_WHOLE_FORM = (
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    *RMSNORM_FORM,
)
"""Every line of the Llama RMSNorm forward: a class whose forward has them all backs up by hand (``_FrozenRMSNorm``),
any other Llama-style one through the recompute."""
GATED_MLP_FORM = ("self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",)
"""The gated MLP's one line (Llama, Mistral, Qwen2/3, Gemma 2/3)."""


class _RecomputedInBackward(torch.autograd.Function):
    """``fn(*inputs)`` keeping only `inputs` for backward; backward reruns `fn` under autograd."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        with torch.enable_grad():
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def recomputed_in_backward(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)``, keeping the inputs instead of fn's intermediates. fn must be pure elementwise work whose
    only differentiable inputs are `inputs` (a parameter it closes over gets no gradient)."""
    return _RecomputedInBackward.apply(fn, *inputs)


def _has_form(cls: type, lines: tuple[str, ...]) -> bool:
    return source_has(cls.forward, lines)


def _gate_times_up(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


class _SiluGateTimesUp(torch.autograd.Function):
    """``silu(gate) * up`` keeping gate and up: backward computes what autograd computes over the two ops, the
    product's two gradients and ``silu_backward``, in the same dtypes and order, so the bits are the recompute's.
    Both directions are kernels/swiglu.py's: the torch reference, or on CUDA its Triton twin, one launch a
    direction instead of 2 and 4 (within one rounding of the reference).

    Why not :class:`_RecomputedInBackward` here: rerunning autograd inside backward builds and walks a nested graph
    for three ops: 0.3 ms a call of its own time in a profiled SmolLM2 step on the 2-core AMX machine, 91 calls
    a step (docs/speed.md)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


@cache
def _has_whole_norm_form(cls: type) -> bool:
    return _has_form(cls, RMSNORM_WHOLE_FORM)


@cache
def _is_silu_module_class(cls: type) -> bool:
    """Transformers' SiLU module: its forward is the one line ``nn.functional.silu(input)`` (read once a class)."""
    return _has_form(cls, ("return nn.functional.silu(input)",))


def _is_plain_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether `act` is ``F.silu`` as an ``nn.SiLU`` (not in place) or transformers' one-line SiLU module."""
    if isinstance(act, nn.SiLU):
        return not act.inplace
    return isinstance(act, nn.Module) and _is_silu_module_class(type(act))


def _slim_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's own line, its product kept as (gate, up)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype == up.dtype and _is_plain_silu(self.act_fn):
        return self.down_proj(_SiluGateTimesUp.apply(gate, up))
    return self.down_proj(recomputed_in_backward(partial(_gate_times_up, self.act_fn), gate, up))


class _FrozenRMSNorm(torch.autograd.Function):
    """The Llama RMSNorm of :data:`RMSNORM_WHOLE_FORM` with a frozen weight, keeping only its input: backward
    recomputes the fp32 input and its rsqrt and applies, op by op, the formulas autograd applies to the forward's
    ops, so the gradient is autograd's bit for bit without rerunning autograd inside backward (see
    :class:`_SiluGateTimesUp`). Both directions are kernels/rmsnorm.py's: the torch reference, or on CUDA its Triton
    twin, one launch a direction instead of 8 and 18 ops (within one rounding of the reference)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.eps = weight, eps  # a frozen parameter the module holds anyway: nothing new is kept
        return rmsnorm_forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return rmsnorm_backward(x, ctx.weight, ctx.eps, grad), None, None


def _slim_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's own forward, keeping its 16-bit input (a trained norm weight keeps autograd's graph)."""
    if self.weight.requires_grad:
        return type(self).forward(self, x)
    if _has_whole_norm_form(type(self)):
        return _FrozenRMSNorm.apply(x, self.weight, self.variance_epsilon)
    return recomputed_in_backward(type(self).forward.__get__(self), x)


def slim_saved_activations(model: nn.Module) -> dict[str, int]:
    """Patch every Llama-style RMSNorm and gated MLP of `model` (instances, not classes) to keep only their inputs
    for backward; returns how many of each it patched."""
    counts = {"rmsnorm": 0, "gated_mlp": 0}
    forms: dict[type, str | None] = {}
    for module in model.modules():
        cls = type(module)
        if cls not in forms:
            forms[cls] = (
                "rmsnorm" if _has_form(cls, RMSNORM_FORM) else "gated_mlp" if _has_form(cls, GATED_MLP_FORM) else None
            )
        kind = forms[cls]
        if kind:  # bound to the instance, so a deep copy of the model rebinds it to the copy
            module.forward = MethodType(_slim_norm_forward if kind == "rmsnorm" else _slim_mlp_forward, module)
            counts[kind] += 1
    return counts


def saved_tensor_bytes(run: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward while `run` runs, each distinct storage counted once (for tests and
    benches: what a change to the saved activations saves)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())
