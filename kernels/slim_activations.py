"""Cheap elementwise blocks that keep their inputs, not their intermediates, for backward.

Why: autograd over transformers' RMSNorm keeps its input upcast to fp32 (4 bytes an element where the input
is 2), and over the gated MLP ``down(act(gate(x)) * up(x))`` it keeps gate, act(gate) and up (three 16-bit
tensors of the FFN width). Recomputing these few elementwise ops in backward from their 16-bit inputs costs a
handful of passes over small tensors and frees 69 KB + 92 KB of saved activations per token on SmolLM2
(30 layers: 2 norms × 576 × 2 bytes, 1536 × 2 bytes per layer), about a sixth of what a layer keeps.

Exact: backward reruns the module's own forward code on the same inputs and differentiates it with autograd,
so values and gradients are the unpatched ones bit for bit (tests/unit/test_slim_activations.py). A module is
patched only when its class's ``forward`` is the source form this relies on (checked on the source text), so a
family or a transformers version that computes it differently keeps its own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from types import MethodType
from typing import Any

import torch
from torch import nn

RMSNORM_FORM = (
    "hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
"""Lines of the Llama-style RMSNorm forward (Llama, Mistral, Qwen2/3, Phi-3); Gemma's (1 + w) form differs."""
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
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return all(line in source for line in lines)


def _gate_times_up(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _slim_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's own line, its product kept as (gate, up)."""
    product = recomputed_in_backward(partial(_gate_times_up, self.act_fn), self.gate_proj(x), self.up_proj(x))
    return self.down_proj(product)


def _slim_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's own forward, keeping its 16-bit input (a trained norm weight keeps autograd's graph)."""
    own = type(self).forward.__get__(self)
    return own(x) if self.weight.requires_grad else recomputed_in_backward(own, x)


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
