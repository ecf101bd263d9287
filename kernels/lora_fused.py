"""The LoRA branch of a training step as one autograd node: ``y = base_out + (s · dropout(x) Aᵀ) Bᵀ``.

Why: written as separate autograd ops, the branch of every adapted projection costs a scale and a mask for the
dropout, casts of A and B, two linears, the r-wide scaling and the sum with the base output, each with its own
backward node: about a dozen ops per projection and direction, 210 projections in a SmolLM2 step. Here the dropout's
keep-rate rescaling joins ``s``, and both scale A's product in its matmul's epilogue (:func:`scaled_mm`, as they
scale B's in backward: no pass of their own), B's product is added into the base output by ``addmm`` (the sum
happens in the matmul's epilogue, no extra pass), and the backward masks the input gradient in place. A and B come
in the compute dtype from the step's copies (kernels/lora_copies.py), or are cast here outside a training step;
their gradients go back in the masters' dtype, written so by the product itself on a GPU (:func:`widening_mm`).
Autograd keeps the input itself (a view: the projections that read one input, q/k/v or gate/up,
keep it once between them) and the r-wide product; backward re-applies the mask to the input for A's gradient
instead of keeping a dropped copy per projection (2 bytes an input element each). The mask is a function of one
seed (``SeededMask``, kernels/dropout.py) on every device: the branch keeps the seed, not the mask (the masks were
37 % of what a SmolLM2 layer keeps for backward, 10 of 27 KB a token), and the compiled CPU kernel or the Triton
twin zeroes the dropped elements of the input in forward, and of the input and its gradient in backward, as it
hashes their lanes: no mask is written.

When the base is a frozen NF4 layer (``Linear4bit``), its product joins the node too
(:func:`frozen_linear_with_lora`): one node per projection instead of two, and x's gradient is the branch's plus
the frozen product's accumulated by ``addmm_`` in one rounding, where autograd would add the two nodes' gradients
in a separate pass (210 sums a SmolLM2 step). Its forward is the two nodes' bit for bit; its input gradient
differs from theirs by the one rounding it saves.

The math is the op-by-op branch's (``LoraLinear.lora_delta``), with the keep-rate applied after A instead of
before it: the same value up to rounding. tests/unit/test_lora.py holds it to the closed-form gradients and to
the op-by-op branch with and without dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from qlora_pipeline.kernels.dropout import SeededMask


@cache
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d zero for ``addmm``'s ignored input (made once a dtype and device: no fill a call)."""
    return torch.zeros((), dtype=dtype, device=device)


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (m1 @ m2)`` as one matmul: ``addmm`` with beta 0 applies the scale to the fp32 accumulator in
    the GEMM's epilogue and rounds once, where ``(m1 @ m2).mul_(scale)`` is a second pass (a second launch on a
    GPU, 420 a SmolLM2 step) that rounds twice. beta 0 ignores the input (documented by ``torch.addmm``: not read,
    so no NaN or Inf from it)."""
    return torch.addmm(_zero(m1.dtype, m1.device), m1, m2, beta=0, alpha=scale)


def widening_mm_is_one_launch(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=)`` runs here: registered for CUDA only (torch 2.8 on; a CPU raises
    NotImplementedError), so a GPU is asked once per device and dtypes, with an (8 x 16) @ (16 x 8) product
    checked against the fp32 product of the same inputs. A refusal or a wrong value keeps the reference path."""
    if device.type != "cuda" or in_dtype not in (torch.bfloat16, torch.float16) or out_dtype != torch.float32:
        return False
    return _widening_mm_probe(device, in_dtype, out_dtype)


@cache
def _widening_mm_probe(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """One small widening product on `device` read back and checked (a host sync, once a device and dtypes); its
    first factor a transposed view, as the gradients' ``g.t()`` and ``du.t()`` are."""
    gen = torch.Generator().manual_seed(0)
    m1, m2 = (torch.randn(shape, generator=gen).to(in_dtype) for shape in ((16, 8), (16, 8)))
    try:
        got = torch.mm(m1.to(device).t(), m2.to(device), out_dtype=out_dtype).cpu()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return got.dtype == out_dtype and torch.allclose(got, m1.float().t() @ m2.float(), rtol=1e-5, atol=1e-5)


def widening_mm(m1: torch.Tensor, m2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``m1 @ m2`` returned in `out_dtype` (A's and B's gradients: a 16-bit product for fp32 masters).

    Reference: the product in the inputs' dtype, then a cast (two launches on a GPU, the product rounded to 16 bits
    first). Where cuBLAS can write fp32 from 16-bit inputs (``torch.mm(..., out_dtype=)``, a CUDA device) it does
    so in one launch, rounding the fp32 accumulator once: within one 16-bit rounding of the reference, and nearer
    the exact product (420 launches fewer a SmolLM2 step)."""
    if out_dtype == m1.dtype:
        return m1 @ m2
    if widening_mm_is_one_launch(m1.device, m1.dtype, out_dtype):
        return torch.mm(m1, m2, out_dtype=out_dtype)
    return (m1 @ m2).to(out_dtype)


def _branch_backward(ctx, saved: tuple[torch.Tensor, ...], g: torch.Tensor, need_x: bool, need_a: bool, need_b: bool):
    """The branch's gradients from ``g = dL/dy`` (2-D, compute dtype): x's (masked; None when not needed), A's
    and B's (in their own dtypes). `saved` is ``ctx.saved_tensors``, unpacked once: x2, the r-wide product u, A and
    B as cast."""
    x2, u, a, b = saved
    seeded: SeededMask | None = ctx.seeded
    grad_x = grad_a = grad_b = xk = None
    du = scaled_mm(g, b, ctx.scale)
    if need_b:
        grad_b = widening_mm(g.t(), u, ctx.b_dtype)
    if need_x:
        grad_x = du @ a
    if seeded is not None and grad_x is not None and need_a:
        xk = seeded.apply_pair_(x2, grad_x)  # one pass over the lanes for both uses of the mask
    elif seeded is not None:
        xk = seeded.apply(x2) if need_a else None
        if grad_x is not None:
            grad_x = seeded.apply(grad_x)
    if need_a:
        grad_a = widening_mm(du.t(), x2 if xk is None else xk, ctx.a_dtype)
    return grad_x, grad_a, grad_b


def _branch_forward(
    ctx,
    x2: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    seeded: SeededMask | None,
    copies: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch's forward on the 2-D input in its compute dtype: returns the r-wide product
    ``u = ((x ⊙ mask) Aᵀ) · scale`` and B in that dtype (the caller adds ``u Bᵀ`` into its output), and saves what
    :func:`_branch_backward` reads. `copies` are A and B already in that dtype (kernels/lora_copies.py), or None:
    cast here."""
    a, b = copies if copies is not None else (lora_A.to(x2.dtype), lora_B.to(x2.dtype))
    u = scaled_mm(x2 if seeded is None else seeded.apply(x2), a.t(), scale)
    ctx.save_for_backward(x2, u, a, b)
    ctx.seeded = seeded
    ctx.scale = scale
    ctx.a_dtype, ctx.b_dtype = lora_A.dtype, lora_B.dtype
    return u, b


class _LoraBranchAdd(torch.autograd.Function):
    """``base_out + ((x ⊙ mask) Aᵀ · scale) Bᵀ`` in ``base_out``'s dtype; A and B may be wider (fp32 masters)."""

    @staticmethod
    def forward(
        ctx,
        base_out: torch.Tensor,
        x: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        seeded: SeededMask | None,
        copies: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(base_out.dtype)
        u, b = _branch_forward(ctx, x2, lora_A, lora_B, scale, seeded, copies)
        y = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), u, b.t())
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        saved = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(saved[0].dtype)
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = _branch_backward(ctx, saved, g, need[1], need[2], need[3])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_y, grad_x, grad_a, grad_b, None, None, None


class _FrozenLinearLoraAdd(torch.autograd.Function):
    """``x Wᵀ + bias + ((x ⊙ mask) Aᵀ · scale) Bᵀ`` for a frozen W, one node, everything in x's dtype.

    The frozen product and the branch in one node: B's product is added into the base output in place
    (``addmm_``), and in backward the frozen product's input gradient is accumulated into the branch's
    (``addmm_``: the sum in the matmul's epilogue, rounded once) instead of autograd summing two nodes' gradients
    for x. W comes from `weight` each time (kernels/linear4bit.py ``Linear4bit.weight_source``): nothing
    dequantized is kept for backward."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: Callable[[], torch.Tensor],
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        seeded: SeededMask | None,
        copies: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = nn.functional.linear(x2, weight(), None if bias is None else bias.to(x.dtype))
        u, b = _branch_forward(ctx, x2, lora_A, lora_B, scale, seeded, copies)
        y.addmm_(u, b.t())
        ctx.weight, ctx.x_shape = weight, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        g = grad_y.reshape(-1, grad_y.shape[-1])
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = _branch_backward(ctx, ctx.saved_tensors, g, need[0], need[3], need[4])
        if grad_x is not None:
            grad_x = grad_x.addmm_(g, ctx.weight()).view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def add_lora_branch(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    seeded: SeededMask | None = None,
    copies: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``base_out + scale · ((x ⊙ mask) Aᵀ) Bᵀ``, computed in ``base_out``'s dtype.

    `scale` is the LoRA scaling times the dropout's keep-rate rescaling; `seeded` is the dropout mask held as its
    seed (``SeededMask``), which forward and backward apply without keeping or writing the mask, or None (no
    dropout); `copies` are A and B in the compute dtype (kernels/lora_copies.py), or None. Gradients flow to
    base_out (unchanged), x, A and B (in their own dtypes)."""
    return _LoraBranchAdd.apply(base_out, x, lora_A, lora_B, scale, seeded, copies)


def frozen_linear_with_lora(
    x: torch.Tensor,
    weight: Callable[[], torch.Tensor],
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    seeded: SeededMask | None = None,
    copies: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x Wᵀ + bias + scale · ((x ⊙ mask) Aᵀ) Bᵀ`` in x's dtype, W (out × in, x's dtype) from `weight()`, which
    is called again in backward. `scale`, `seeded` and `copies` as for :func:`add_lora_branch`. Gradients flow
    to x, A and B; W and the bias are frozen."""
    return _FrozenLinearLoraAdd.apply(x, weight, bias, lora_A, lora_B, scale, seeded, copies)
