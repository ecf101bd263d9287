"""The compiled block kernel of kernels/dropout_cpu.py (imported only there, so that numba loads only on a CPU path).

For each block of `BLOCK` mask elements: the block's splitmix64 words (``seed + i·golden`` through the finalizer,
as kernels/lora.py's ``splitmix64``) are made in a buffer that stays in cache, then each signed 16-bit lane (lane k
is the k % 4-th little-endian piece of word k // 4, as the reference's int16 view) is turned into the mask's bits:
``one & ((t - 1 - lane) >> 31)`` is `one` (1.0's bit pattern) where lane >= t and 0 elsewhere. Blocks run on numba's
threads. Module-level constants keep the function cacheable (numba caches per CPU model and flags).
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 8192
"""Mask elements a block: 2,048 words, 16 KB of hash output, in cache before its lanes are compared."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SIGN = np.int32(31)


@numba.njit(parallel=True, nogil=True, cache=True)
def keep_bits(seed, lo_minus_1, one, out_bits):  # pragma: no cover - compiled; tested through dropout_cpu
    """Fill `out_bits` (an int32 or int16 view of the mask) for uint64 `seed` and int32 ``t - 1``."""
    n = out_bits.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    for b in numba.prange(blocks):
        k0 = b * BLOCK
        k1 = min(n, k0 + BLOCK)
        w0 = k0 // 4
        words = np.empty((k1 - k0 + 3) // 4, dtype=np.uint64)
        for i in range(words.shape[0]):
            z = seed + np.uint64(w0 + i) * _GOLDEN
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            words[i] = z ^ (z >> _S31)
        lanes = words.view(np.int16)
        dst = out_bits[k0:k1]
        for k in range(k1 - k0):
            dst[k] = one & ((lo_minus_1 - np.int32(lanes[k])) >> _SIGN)
