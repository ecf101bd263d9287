"""Dropout for the LoRA branch: ``FastDropout`` and the torch reference of its CPU masks.

An element is dropped when a uniform 16-bit lane falls under ``round(p · 65536)``. On a CPU the lanes come from
splitmix64, a counter-based generator seeded by one draw of torch's global generator, so a mask is a pure function
of that seed: activation checkpointing's RNG replay and a resumed generator state give the same masks, and backward
can rebuild a mask instead of keeping it. :func:`reference_keep_mask` builds it in torch ops; kernels/dropout_native.c
is its compiled twin (called through kernels/dropout_cpu.py; the same bits, tests/unit/test_dropout_cpu.py), which
:class:`SeededMask` uses where it is in use.
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
    one compiled pass, kernels/dropout_native.c, the same bits in less again); elsewhere from the
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
        bit for bit. Made by the compiled kernels (kernels/dropout_cpu.py) where they are in use, else by
        :func:`reference_keep_mask`: the same bits."""
        return SeededMask(seed, self.threshold).mask(shape, dtype)

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


@dataclass(frozen=True)
class SeededMask:
    """One CPU dropout mask held as its :func:`draw_seed` seed and threshold: applied to a tensor without the mask
    being written (the compiled kernels zero the dropped elements as they hash their lanes), and rebuilt bit for bit
    where it is needed again, so backward keeps two integers instead of a mask (kernels/lora_fused.py).

    Where the compiled kernels are not in use, each method multiplies by :func:`reference_keep_mask`'s mask. The
    values are the same; only the sign of a dropped zero may differ (the kernels write +0.0 where ``x * 0`` gives
    -0.0 for a negative x): the two compare equal, and a training step's output and gradients with and without the
    kernels are equal (tests/unit/test_dropout_cpu.py)."""

    seed: int
    threshold: int

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The 0/1 keep mask, `dtype`, `shape`."""
        if self.threshold == 0:
            return torch.ones(shape, dtype=dtype)
        fast = dropout_cpu.keep_mask(self.seed, self.threshold, shape, dtype)
        return fast if fast is not None else reference_keep_mask(self.seed, self.threshold, shape, dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor: `x` with its dropped elements zeroed."""
        fast = dropout_cpu.masked(self.seed, self.threshold, x)
        return fast if fast is not None else x * self.mask(x.shape, x.dtype)

    def apply_pair_(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """`x` with its dropped elements zeroed (a new tensor), and the same elements of `grad` (x's shape and
        dtype) zeroed in place: backward's two uses of one mask, from one pass over its lanes."""
        fast = dropout_cpu.masked_pair_(self.seed, self.threshold, x, grad)
        if fast is not None:
            return fast
        keep = self.mask(x.shape, x.dtype)
        grad.mul_(keep)
        return x * keep
