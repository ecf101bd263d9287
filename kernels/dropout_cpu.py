"""The CPU's dropout masks in one compiled pass: the twin of kernels/dropout.py's torch reference.

Why: the reference builds a mask in about seventeen whole-buffer tensor passes (the counter, splitmix64's shifts,
masks, xors and multiplies over int64 words, then the lanes' clamp, shift and widening to the mask's dtype), and
on the 2-core AVX2 VM those passes and the multiplies that applied the mask were 8 % of a padded training step
(bench/results/profile_step-avx2-fp32-padded-before.txt). Here the same function runs block by block in loops numba
compiles for this CPU (kernels/dropout_numba.py): each block's splitmix64 words are made in a 16 KB buffer that
stays in cache, and each 16-bit lane is compared with the threshold straight into the result's bits: the 0/1 mask
(:func:`keep_mask`), or a tensor with its dropped elements zeroed (:func:`masked`; :func:`masked_pair_` does a
second tensor from the same lanes), so the LoRA branch never writes or reads a mask. Blocks run on numba's threads,
as many as torch uses. The results are the reference's, bit for bit, for every seed, threshold, size and dtype
(tests/unit/test_dropout_cpu.py); docs/speed.md has the measured step times.

Fallback: numba is a declared dependency, but where it cannot be imported, `QLORA_NUMBA=off` is set, a tensor's
dtype has no kernel (float64) or it is not contiguous, or the compiled kernels' first results differ from the
reference's on this machine (checked once per process, on several sizes, with one warning), these functions
return None and the caller uses the torch reference: the same values, only slower. numba caches the compiled code
per CPU model and flags.
"""

from __future__ import annotations

import os
import threading
import warnings
from types import ModuleType

import numpy as np
import torch

SWITCH_VAR = "QLORA_NUMBA"
"""``off`` (or ``0``/``false``/``no``): never use the compiled kernel."""

_ONE_BITS = {
    torch.float32: (torch.int32, 0x3F800000),
    torch.bfloat16: (torch.int16, 0x3F80),
    torch.float16: (torch.int16, 0x3C00),
}
"""Each supported mask dtype: the integer view the kernel writes and the bit pattern of 1.0 in it."""

_lock = threading.Lock()
_kernels: ModuleType | None = None
_checked = False


def _build() -> ModuleType:
    """The compiled kernels (numba compiles them, or loads them from its cache); raises if numba cannot be imported."""
    from qlora_pipeline.kernels import dropout_numba

    return dropout_numba


def _switched_off() -> bool:
    return os.environ.get(SWITCH_VAR, "").strip().lower() in {"off", "0", "false", "no"}


def _ready(*tensors: torch.Tensor) -> ModuleType | None:
    """The kernels, if they run here and can take these tensors (contiguous CPU tensors of a supported dtype)."""
    global _kernels, _checked
    if _switched_off() or any(
        t.dtype not in _ONE_BITS or t.device.type != "cpu" or not t.is_contiguous() for t in tensors
    ):
        return None
    if not _checked:
        with _lock:
            if not _checked:
                _kernels = _checked_kernels()
                _checked = True
    if _kernels is not None:
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return _kernels


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(-1).view(_ONE_BITS[t.dtype][0]).numpy()


def _args(seed: int, threshold: int) -> tuple[np.uint64, np.int32]:
    """The kernels' seed (its 64 bits, unsigned) and ``t - 1`` for the lane threshold t = threshold - 32768."""
    return np.uint64(seed % 2**64), np.int32(threshold - 32768 - 1)


def keep_mask(seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The 0/1 mask ``reference_keep_mask`` (kernels/dropout.py) returns for these arguments, or None where the
    compiled kernels do not run (the caller then calls the reference). `threshold` is the drop threshold in
    1/65536ths: an element is kept when its signed 16-bit lane is at or above ``threshold - 32768``."""
    out = torch.empty(shape, dtype=dtype)
    kernels = _ready(out)
    if kernels is None:
        return None
    bits = _bits(out)
    kernels.keep_bits(*_args(seed, threshold), bits.dtype.type(_ONE_BITS[dtype][1]), bits)
    return out


def masked(seed: int, threshold: int, x: torch.Tensor) -> torch.Tensor | None:
    """`x` times that mask (a new tensor; dropped elements +0.0), or None where the kernels do not run."""
    kernels = _ready(x)
    if kernels is None:
        return None
    out = torch.empty_like(x)
    kernels.masked_bits(*_args(seed, threshold), _bits(x), _bits(out))
    return out


def masked_pair_(seed: int, threshold: int, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """`x` times that mask (a new tensor) and `grad` times it in place, or None (nothing done) where the kernels do
    not run. `grad` has x's shape and dtype."""
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad {tuple(grad.shape)} {grad.dtype} is not x's {tuple(x.shape)} {x.dtype}")
    kernels = _ready(x, grad)
    if kernels is None:
        return None
    out = torch.empty_like(x)
    kernels.masked_pair_bits(*_args(seed, threshold), _bits(x), _bits(out), _bits(grad))
    return out


def _self_check(kernels: ModuleType) -> str | None:
    """None if the kernels' results equal the reference's here (odd sizes, both bit widths), else what differed."""
    from qlora_pipeline.kernels.dropout import reference_keep_mask

    for n, seed, threshold in ((1, 0, 3277), (4099, -(2**63), 3277), (2 * 8192 + 5, 2**63 - 1, 32768)):
        for dtype in (torch.float32, torch.bfloat16):
            shape = torch.Size([n])
            want = reference_keep_mask(seed, threshold, shape, dtype)
            x, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            mask, xk, grad_k = torch.empty(shape, dtype=dtype), torch.empty_like(x), grad.clone()
            seed_u, lo = _args(seed, threshold)
            kernels.keep_bits(seed_u, lo, _bits(mask).dtype.type(_ONE_BITS[dtype][1]), _bits(mask))
            kernels.masked_bits(seed_u, lo, _bits(x), _bits(xk))
            same = torch.equal(mask, want) and torch.equal(xk, x * want)
            kernels.masked_pair_bits(seed_u, lo, _bits(x), _bits(xk), _bits(grad_k))
            if not (same and torch.equal(xk, x * want) and torch.equal(grad_k, grad * want)):
                return f"{n} {dtype} elements, threshold {threshold}: the compiled mask differs from the reference"
    return None


def _checked_kernels() -> ModuleType | None:
    try:
        kernels = _build()
        problem = _self_check(kernels)
    except Exception as e:  # any failure to import, compile or run them means the reference path
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return kernels
    message = f"dropout masks use the torch reference (slower): the numba kernels are unusable here ({problem})"
    warnings.warn(message, stacklevel=4)
    return None


def compiled_in_use() -> bool | None:
    """Whether this process's masks come from the compiled kernels (None: no mask made yet)."""
    return None if not _checked else _kernels is not None and not _switched_off()


def main() -> None:
    """``make setup``: compile (or load) the kernel, check it against the reference here, and say which runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_mask(0, 3277, torch.Size([8]), torch.float32)
    if compiled_in_use():
        from importlib import metadata

        print(f"CPU dropout masks: numba {metadata.version('numba')} kernel (matches the torch reference here)")
    else:
        reason = str(caught[0].message) if caught else f"{SWITCH_VAR}={os.environ.get(SWITCH_VAR)}"
        print(f"CPU dropout masks: torch reference ({reason})")


if __name__ == "__main__":
    main()
