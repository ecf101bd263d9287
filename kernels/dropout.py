"""Dropout for the LoRA branch: ``FastDropout`` and the torch reference of its masks.

An element is dropped when a uniform 16-bit lane falls under ``round(p · 65536)``. The lanes come from splitmix64,
a counter-based generator seeded by one draw of torch's global CPU generator, so a mask is a pure function of that
seed, on every device: activation checkpointing's RNG replay and a resumed generator state give the same masks,
backward can rebuild a mask instead of keeping it, and a GPU run draws the masks a CPU run draws.
:func:`reference_keep_mask` builds it in torch ops; kernels/dropout_native.c is its compiled CPU twin (called through
kernels/dropout_cpu.py; tests/unit/test_dropout_cpu.py) and kernels/dropout_triton.py its GPU twin
(tests/unit/test_dropout_triton.py), the same bits, which :class:`SeededMask` uses where they apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qlora_pipeline.kernels import dropout_cpu

_SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's constants as int64 bit patterns (torch wraps)
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9 - 2**64
_SPLITMIX_M2 = 0x94D049BB133111EB - 2**64


def draw_seed() -> int:
    """One draw of torch's global CPU generator: the seed of a dropout mask on any device (checkpointing's RNG
    replay and a resumed generator state give the same draw; no device sync)."""
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


def reference_keep_mask(
    seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The keep mask in torch ops on `device`, the reference of the compiled and Triton twins: lane k is the k % 4-th
    signed 16-bit piece of :func:`splitmix64` word k // 4 of `seed`; kept (1) where it is at or above
    threshold - 32768. Built where it is used, so an accelerator without the Triton twin reads nothing back."""
    n = math.prod(shape)
    lanes = splitmix64(seed, -(-n // 4), torch.device(device)).view(torch.int16)[:n]
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
    input. The lanes come from :func:`splitmix64` seeded by one draw of torch's global CPU generator (four lanes a
    word; in torch ops about a third of ``bernoulli_``'s time, bench/results/profile_step-*.txt; in one compiled
    pass on a CPU, kernels/dropout_native.c, and one Triton launch on a GPU, kernels/dropout_triton.py, the same
    bits). Activation checkpointing's RNG replay reproduces the masks, and a saved generator state resumes them
    exactly.

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
        return self.mask_from_seed(draw_seed(), shape, dtype, device)

    def mask_from_seed(
        self, seed: int, shape: torch.Size, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The mask of one :func:`draw_seed` draw: a pure function of the seed, so the same call rebuilds it bit for
        bit, on any device (:meth:`SeededMask.mask`)."""
        return SeededMask(seed, self.threshold).mask(shape, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return (x * self.scale).mul_(self.keep_mask(x.shape, x.device, x.dtype))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _triton_twin_applies(device: torch.device) -> bool:
    """Masks on CUDA tensors come from the Triton twin, imported then: a CPU process never loads Triton."""
    return device.type == "cuda"


@dataclass(frozen=True)
class SeededMask:
    """One dropout mask held as its :func:`draw_seed` seed and threshold: applied to a tensor without the mask
    being written (the compiled CPU kernels and the Triton twin zero the dropped elements as they hash their
    lanes), and rebuilt bit for bit where it is needed again, so backward keeps two integers instead of a mask
    (kernels/lora_fused.py).

    On CUDA each method is one launch of kernels/dropout_triton.py; on a CPU, the compiled kernels where they are in
    use. Elsewhere (no compiled kernels, another accelerator) each method multiplies by :func:`reference_keep_mask`'s
    mask, built on the tensor's device. The values are the same; only the sign of a
    dropped zero may differ (the kernels write +0.0 where ``x * 0`` gives -0.0 for a negative x): the two compare
    equal, and a training step's output and gradients with and without the kernels are equal
    (tests/unit/test_dropout_cpu.py)."""

    seed: int
    threshold: int

    def mask(self, shape: torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """The 0/1 keep mask, `dtype`, `shape`, on `device`."""
        if self.threshold == 0:
            return torch.ones(shape, dtype=dtype, device=device)
        device = torch.device(device)
        if _triton_twin_applies(device):
            from qlora_pipeline.kernels.dropout_triton import keep_mask_triton

            return keep_mask_triton(self.seed, self.threshold, shape, dtype, device)
        fast = dropout_cpu.keep_mask(self.seed, self.threshold, shape, dtype) if device.type == "cpu" else None
        return fast if fast is not None else reference_keep_mask(self.seed, self.threshold, shape, dtype, device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor: `x` with its dropped elements zeroed."""
        if _triton_twin_applies(x.device):
            from qlora_pipeline.kernels.dropout_triton import masked_triton

            return masked_triton(self.seed, self.threshold, x)
        fast = dropout_cpu.masked(self.seed, self.threshold, x)
        return fast if fast is not None else x * self.mask(x.shape, x.dtype, x.device)

    def apply_pair_(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """`x` with its dropped elements zeroed (a new tensor), and the same elements of `grad` (x's shape and
        dtype) zeroed in place: backward's two uses of one mask, from one pass over its lanes."""
        if _triton_twin_applies(x.device):
            from qlora_pipeline.kernels.dropout_triton import masked_pair_triton

            return masked_pair_triton(self.seed, self.threshold, x, grad)
        fast = dropout_cpu.masked_pair_(self.seed, self.threshold, x, grad)
        if fast is not None:
            return fast
        keep = self.mask(x.shape, x.dtype, x.device)
        grad.mul_(keep)
        return x * keep
