"""Cross-entropy through a frozen vocabulary projection, chunked so no full logits tensor ever exists.

For N labelled positions and a vocabulary V, plain `F.cross_entropy(h @ Wᵀ, y)` keeps N×V fp32 logits, its
softmax and its gradient alive until backward (3 × 400 MB for 2048 tokens of SmolLM2's 49,152 words).
The projection is frozen in QLoRA (tied embeddings, no LoRA on lm_head), so only ∂loss/∂h is needed, and
it can be formed chunk by chunk during the forward pass: ∂/∂h = (softmax(hWᵀ) − onehot(y)) W. Backward then
only scales that N×H gradient. A chunk's fp32 logits become its probabilities in place (loss = logsumexp − the
target's logit), so its peak is :data:`BYTES_PER_LOGIT` bytes per logit: the matmul's 16-bit output while it is
widened, then the fp32 probabilities beside their 16-bit copy for the gradient matmul.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 64
"""Rows per chunk: 64 x 49,152 logits of SmolLM2 peak at 18 MiB (256 rows: 72 MiB, on top of every activation a
step keeps, since the loss runs at the end of the forward). Measured on the 2-core dev VM, loss + gradient of 200 /
400 rows through SmolLM2's head: 256 rows a chunk 187 / 382 ms, 128: 216 / 354, 64: 200 / 402, 32: 293 / 510 ms,
so 64 costs no time that the noise does not."""
BYTES_PER_LOGIT = 6


def _chunk_loss_and_grad(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed cross-entropy and, if asked, its ∂/∂h; its logits die when this returns.

    The logits are computed transposed, vocabulary × rows (``weight @ hᵀ``), and reduced over the vocabulary along
    dim 0: with 64 rows against 49,152 words, a BLAS library runs the long dimension as the product's rows far better
    than as its columns (MKL fp32 on the 2-core AVX2 VM: 32 against 51 ms for SmolLM2's head; the whole chunk, loss
    and gradient, 72 against 88 ms; docs/speed.md). The values are the same sums, in the library's order."""
    rows = torch.arange(y.shape[0], device=y.device)
    logits = (weight @ h.t()).float()
    target = logits[y, rows]
    peak = logits.amax(dim=0)
    exps = logits.sub_(peak).exp_()  # in place: logsumexp would allocate a chunk-sized temporary
    sums = exps.sum(dim=0)
    loss = (peak + sums.log() - target).sum()
    if not need_grad:
        return loss, None
    probs = exps.div_(sums)
    probs[y, rows] -= 1.0
    return loss, (probs.to(weight.dtype).t() @ weight).to(h.dtype)


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            loss, grad = _chunk_loss_and_grad(h[s : s + chunk], weight, y[s : s + chunk], need_grad)
            total += loss
            if grad_h is not None:
                grad_h[s : s + chunk] = grad
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
