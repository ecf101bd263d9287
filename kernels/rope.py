"""Rotary position embedding in its rotate-half form (transformers' ``apply_rotary_pos_emb`` for Llama, Mistral,
Qwen2/3 and Gemma 1-3) as one autograd node for q and k: the torch reference here, on CUDA its Triton twin
(kernels/rope_triton.py), one launch for both tensors a direction.

Why: transformers writes it as ``q * cos + rotate_half(q) * sin``, five torch ops a tensor forward (a negation, a
concatenation, two products, a sum) and, through autograd, two products, a negation and two zero-padded slice
gradients summed into q's backward: 750 ops a SmolLM2 step (30 layers, q and k, both directions; counted in
docs/speed.md), each a launch on a GPU step bound by launches.

Exact: the reference is transformers' forward op for op, and its backward applies what autograd applies to those
ops, in the same dtypes: ``g·cos`` plus the rotation's transpose of ``g·sin`` (``cat(t₂, -t₁)``), each element one
sum of two rounded products, as autograd's sum of one product and two zero-padded halves is. So the values and
gradients are the unpatched model's bit for bit (up to the sign of a zero). The twin rounds where the reference
rounds, so it gives the same bits (tests/unit/test_rope.py).

Only an attention module whose forward calls ``apply_rotary_pos_emb(query_states, key_states, cos, sin)`` and whose
family's function has the rotate-half form (checked on the source text) takes it (:func:`fuse_rotary_embedding`);
Phi-3's partial rotation keeps its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from functools import cache
from types import MethodType, ModuleType
from typing import Any

import torch
from torch import nn

from qlora_pipeline.kernels.source_form import source_has

ROPE_FORM = (
    "cos = cos.unsqueeze(unsqueeze_dim)",
    "q_embed = (q * cos) + (rotate_half(q) * sin)",
    "k_embed = (k * cos) + (rotate_half(k) * sin)",
)
"""Lines of transformers' ``apply_rotary_pos_emb`` in its rotate-half form."""
ROTATE_HALF_FORM = ("return torch.cat((-x2, x1), dim=-1)",)
"""The line of its ``rotate_half``: the second half negated, then the first."""
CALL_FORM = "apply_rotary_pos_emb(query_states, key_states, cos, sin)"
"""How an attention module's forward calls it: the family module's global, with the default unsqueeze_dim 1."""
TRITON_MAX_HEAD_DIM = 1024
"""Widest head the Triton twin takes (a program holds whole rows in registers); wider ones take the reference."""

_TWIN_ON: ContextVar[bool] = ContextVar("qlora_rope_twin", default=False)
"""Set while a patched attention module runs: only its calls of the family's function take the node, so another
model in the process (a baseline, an oracle) keeps transformers' ops."""


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def rope_forward_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (batch, heads, tokens, head_dim), cos and sin (batch, tokens,
    head_dim): transformers' ops."""
    x1, x2 = _halves(x)
    return x * cos.unsqueeze(1) + torch.cat((-x2, x1), dim=-1) * sin.unsqueeze(1)


def rope_backward_reference(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x's gradient from the output's: ``grad * cos`` plus the rotation's transpose of ``grad * sin``."""
    t1, t2 = _halves(grad * sin.unsqueeze(1))
    return grad * cos.unsqueeze(1) + torch.cat((t2, -t1), dim=-1)


def _takes_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] <= TRITON_MAX_HEAD_DIM


def rope_forward(xs: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of `xs` (q and k, or one tensor) rotated: the Triton twin on CUDA (fp32 or bf16; one launch for all),
    the reference elsewhere."""
    if all(_takes_triton(x) for x in xs):  # imported here: a CPU process never loads Triton
        from qlora_pipeline.kernels.rope_triton import rope_triton

        return rope_triton(xs, cos, sin, backward=False)
    return tuple(rope_forward_reference(x, cos, sin) for x in xs)


def rope_backward(grads: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each input's gradient from its output's: the Triton twin on CUDA (one launch for all), the reference
    elsewhere."""
    if all(_takes_triton(g) for g in grads):
        from qlora_pipeline.kernels.rope_triton import rope_triton

        return rope_triton(grads, cos, sin, backward=True)
    return tuple(rope_backward_reference(g, cos, sin) for g in grads)


class _RotaryEmbedding(torch.autograd.Function):
    """q's and k's rotation (or one tensor's) as one node; keeps cos and sin (shared by every layer), as autograd
    does. An output nobody reads gets a zero gradient (autograd materializes it), rotated back to zero."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, sin: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(cos, sin)
        return rope_forward(xs, cos, sin)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return None, None, *rope_backward(grads, cos, sin)


def _fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes and dtypes the node takes: x (batch, heads, tokens, even head_dim), cos and sin (batch or 1,
    tokens, head_dim) in x's dtype and without gradients of their own."""
    return (
        x.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1:] == (x.shape[2], x.shape[3])
        and x.shape[-1] % 2 == 0
        and x.dtype == cos.dtype == sin.dtype
        and not (cos.requires_grad or sin.requires_grad)
    )


def rotary_embedding(*xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q and k (or one tensor) rotated as transformers rotates them, as one autograd node (shapes as :func:`_fits`
    says)."""
    return _RotaryEmbedding.apply(cos, sin, *xs)


def _dispatching(original: Callable[..., Any]) -> Callable[..., Any]:
    """The family's function, taking the node while a patched attention module runs and the call fits."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (
            _TWIN_ON.get()
            and not args
            and kwargs.get("unsqueeze_dim", 1) == 1
            and set(kwargs) <= {"unsqueeze_dim"}
            and _fits(q, cos, sin)
            and _fits(k, cos, sin)
        ):
            return rotary_embedding(q, k, cos=cos, sin=sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.qlora_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


@cache
def _family_module(cls: type) -> ModuleType | None:
    """The modeling module of an attention class that calls its family's rotate-half function, else None."""
    module = sys.modules.get(cls.__module__)
    function = getattr(module, "apply_rotary_pos_emb", None)
    function = getattr(function, "qlora_original", function)
    rotate = getattr(module, "rotate_half", None)
    if function is None or rotate is None or not source_has(cls.forward, (CALL_FORM,)):
        return None
    if not (source_has(function, ROPE_FORM) and source_has(rotate, ROTATE_HALF_FORM)):
        return None
    return module


def _forward_with_node(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The attention module's own forward, its rotary embedding taken as the node."""
    token = _TWIN_ON.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _TWIN_ON.reset(token)


def fuse_rotary_embedding(model: nn.Module) -> int:
    """Route the rotary embedding of every attention module of `model` whose family uses the rotate-half form
    through :func:`rotary_embedding`; returns how many modules. The family module's function is wrapped once (it
    keeps transformers' ops for every other caller); the instances, not the class, are patched."""
    count = 0
    for module in model.modules():
        family = _family_module(type(module))
        if family is None:
            continue
        if not hasattr(family.apply_rotary_pos_emb, "qlora_original"):
            family.apply_rotary_pos_emb = _dispatching(family.apply_rotary_pos_emb)
        module.forward = MethodType(_forward_with_node, module)  # a deep copy rebinds it to the copy
        count += 1
    return count
