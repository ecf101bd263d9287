"""Cross-entropy through a frozen vocabulary projection, chunked so no full logits tensor ever exists.

For N labelled positions and a vocabulary V, plain `F.cross_entropy(h @ Wᵀ, y)` keeps N×V fp32 logits, its
softmax and its gradient alive until backward (3 × 400 MB for 2048 tokens of SmolLM2's 49,152 words).
The projection is frozen in QLoRA (tied embeddings, no LoRA on lm_head), so only ∂loss/∂h is needed, and
it can be formed chunk by chunk during the forward pass: ∂/∂h = (softmax(hWᵀ) − onehot(y)) W. Backward then
only scales that N×H gradient. Peak extra memory is one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 512


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            hs = h[s : s + chunk]
            logits = (hs @ weight.t()).float()
            ys = y[s : s + chunk]
            total += F.cross_entropy(logits, ys, reduction="sum")
            if need_grad:
                probs = torch.softmax(logits, dim=-1)
                probs[torch.arange(ys.shape[0], device=ys.device), ys] -= 1.0
                grad_h[s : s + chunk] = (probs.to(weight.dtype) @ weight).to(h.dtype)
                del probs
            del logits  # before the next chunk's are made, so one chunk's worth is alive at a time
        ctx.save_for_backward(grad_h if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
        return gh, None, None, None


def frozen_head_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Sum over rows of cross-entropy(h @ weightᵀ, y) in fp32; gradient flows to h only (weight is frozen)."""
    if weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy needs a frozen projection; use F.cross_entropy for a trained one")
    if h.shape[0] == 0:
        return h.new_zeros((), dtype=torch.float32) + 0.0 * h.sum()
    return _FrozenHeadCE.apply(h, weight, y, chunk)
