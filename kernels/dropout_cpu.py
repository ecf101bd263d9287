"""The CPU's dropout keep mask in one compiled pass: the twin of ``FastDropout``'s torch reference (kernels/lora.py).

Why: the reference builds a mask in about seventeen whole-buffer tensor passes (the counter, splitmix64's shifts,
masks, xors and multiplies over int64 words, then the lanes' clamp, shift and widening to the mask's dtype), and
on the 2-core AVX2 VM those passes were 8 % of a padded training step (bench/results/profile_step-*.txt). Here the
same function runs block by block in a loop numba compiles for this CPU (kernels/dropout_numba.py): each block's
splitmix64 words are made in a 16 KB buffer that stays in cache, and each 16-bit lane is compared with the threshold
straight into the mask's bit pattern, so the mask is written once.
Blocks run on numba's threads, as many as torch uses. The result is the reference's, bit for bit, for every seed,
threshold, size and dtype (tests/unit/test_dropout_cpu.py); docs/speed.md has the measured step times.

Fallback: numba is a declared dependency, but if it cannot be imported, `QLORA_NUMBA=off` is set,
the mask's dtype has no kernel (float64), or the compiled kernel's first masks differ from the reference's on this
machine (checked once per process, on several sizes), :func:`keep_mask` returns None and the caller uses the torch
reference: the same masks, only slower. Compiled code is cached by numba per CPU model and flags.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable

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
_kernel: Callable | None = None
_checked = False


def _build() -> Callable:
    """The compiled kernel (numba compiles it, or loads it from its cache); raises if numba cannot be imported."""
    from qlora_pipeline.kernels.dropout_numba import keep_bits

    return keep_bits


def _switched_off() -> bool:
    return os.environ.get(SWITCH_VAR, "").strip().lower() in {"off", "0", "false", "no"}


def _run(kernel: Callable, seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    import numba
    import numpy as np

    view, one = _ONE_BITS[dtype]
    out = torch.empty(shape, dtype=dtype)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    bits = out.view(-1).view(view).numpy()
    kernel(np.uint64(seed % 2**64), np.int32(threshold - 32768 - 1), bits.dtype.type(one), bits)
    return out


def _self_check(kernel: Callable, reference: Callable[[int, int, torch.Size, torch.dtype], torch.Tensor]) -> str | None:
    """None if the kernel's masks equal the reference's here, else what differed (odd sizes, both bit widths)."""
    for n, seed, threshold in ((1, 0, 3277), (4099, -(2**63), 3277), (2 * 8192 + 5, 2**63 - 1, 32768)):
        for dtype in (torch.float32, torch.bfloat16):
            shape = torch.Size([n])
            got = _run(kernel, seed, threshold, shape, dtype)
            want = reference(seed, threshold, shape, dtype)
            if not torch.equal(got.view(_ONE_BITS[dtype][0]), want.view(_ONE_BITS[dtype][0])):
                return f"{n} {dtype} elements, threshold {threshold}: the compiled mask differs from the reference"
    return None


def keep_mask(
    seed: int,
    threshold: int,
    shape: torch.Size,
    dtype: torch.dtype,
    reference: Callable[[int, int, torch.Size, torch.dtype], torch.Tensor],
) -> torch.Tensor | None:
    """The keep mask `reference` would return for (`seed`, `threshold`, `shape`, `dtype`), or None where the compiled
    kernel is unavailable, switched off or failed its check (the caller then calls `reference`).

    `threshold` is the drop threshold in 1/65536ths (``FastDropout.threshold``): an element is kept when its signed
    16-bit lane is at or above ``threshold - 32768``. The first call in a process compiles or loads the kernel and
    compares it with `reference`; a failure warns once and is final for the process."""
    global _kernel, _checked
    if dtype not in _ONE_BITS or _switched_off():
        return None
    if not _checked:
        with _lock:
            if not _checked:
                _kernel = _checked_kernel(reference)
                _checked = True
    if _kernel is None:
        return None
    return _run(_kernel, seed, threshold, shape, dtype)


def _checked_kernel(reference: Callable[[int, int, torch.Size, torch.dtype], torch.Tensor]) -> Callable | None:
    try:
        kernel = _build()
        problem = _self_check(kernel, reference)
    except Exception as e:  # any failure to import, compile or run it means the reference path
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        return kernel
    message = f"dropout masks use the torch reference (slower): the numba kernel is unusable here ({problem})"
    warnings.warn(message, stacklevel=3)
    return None


def compiled_in_use() -> bool | None:
    """Whether this process's masks come from the compiled kernel (None: no mask made yet)."""
    return None if not _checked else _kernel is not None and not _switched_off()


def main() -> None:
    """``make setup``: compile (or load) the kernel, check it against the reference here, and say which runs."""
    from qlora_pipeline.kernels.lora import reference_keep_mask

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep_mask(0, 3277, torch.Size([8]), torch.float32, reference_keep_mask)
    if compiled_in_use():
        from importlib import metadata

        print(f"CPU dropout masks: numba {metadata.version('numba')} kernel (matches the torch reference here)")
    else:
        reason = str(caught[0].message) if caught else f"{SWITCH_VAR}={os.environ.get(SWITCH_VAR)}"
        print(f"CPU dropout masks: torch reference ({reason})")


if __name__ == "__main__":
    main()
