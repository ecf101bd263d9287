"""The compiled block kernels of kernels/dropout_cpu.py (imported only there, so that numba loads only on a CPU path).

For each block of `BLOCK` mask elements: the block's splitmix64 words (``seed + i·golden`` through the finalizer,
as kernels/lora.py's ``splitmix64``) are made in a buffer that stays in cache, then each signed 16-bit lane (lane k
is the k % 4-th little-endian piece of word k // 4, as the reference's int16 view) becomes an all-ones or all-zeros
integer: ``(t - 1 - lane) >> 31`` is -1 where lane >= t (kept) and 0 where it is dropped. ANDed with 1.0's bit
pattern it is the 0/1 mask; ANDed with a tensor's bits it is the tensor with its dropped elements zeroed, without
the mask ever being written. Blocks run on numba's threads. Module-level constants keep the functions cacheable
(numba caches per CPU model and flags).
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 8192
"""Mask elements a block: 2,048 words, 16 KB of hash output, in cache before its lanes are used."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_SIGN = np.int32(31)


@numba.njit(nogil=True, cache=True, inline="always")
def _block_lanes(seed, k0, k1):  # pragma: no cover - compiled
    """The signed 16-bit lanes of mask elements k0..k1 (k0 a multiple of 4), a view of the words they sit in."""
    w0 = k0 // 4
    words = np.empty((k1 - k0 + 3) // 4, dtype=np.uint64)
    for i in range(words.shape[0]):
        z = seed + np.uint64(w0 + i) * _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        words[i] = z ^ (z >> _S31)
    return words.view(np.int16)


@numba.njit(parallel=True, nogil=True, cache=True)
def keep_bits(seed, lo_minus_1, one, out_bits):  # pragma: no cover - compiled; tested through dropout_cpu
    """`out_bits` (an int32 or int16 view of the mask) = `one` where kept, 0 where dropped; ``lo_minus_1`` is t - 1."""
    n = out_bits.shape[0]
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        k0 = b * BLOCK
        k1 = min(n, k0 + BLOCK)
        lanes = _block_lanes(seed, k0, k1)
        dst = out_bits[k0:k1]
        for k in range(k1 - k0):
            dst[k] = one & ((lo_minus_1 - np.int32(lanes[k])) >> _SIGN)


@numba.njit(parallel=True, nogil=True, cache=True)
def masked_bits(seed, lo_minus_1, src_bits, dst_bits):  # pragma: no cover - compiled; tested through dropout_cpu
    """``dst = src`` where kept, 0 where dropped (integer views of one width; `dst` may be `src`)."""
    n = src_bits.shape[0]
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        k0 = b * BLOCK
        k1 = min(n, k0 + BLOCK)
        lanes = _block_lanes(seed, k0, k1)
        src = src_bits[k0:k1]
        dst = dst_bits[k0:k1]
        for k in range(k1 - k0):
            dst[k] = src[k] & ((lo_minus_1 - np.int32(lanes[k])) >> _SIGN)


@numba.njit(parallel=True, nogil=True, cache=True)
def masked_pair_bits(seed, lo_minus_1, x_bits, xk_bits, g_bits):  # pragma: no cover - compiled; tested as above
    """``xk = x`` and `g` unchanged where kept, both 0 where dropped: one mask for two tensors of one shape."""
    n = x_bits.shape[0]
    for b in numba.prange((n + BLOCK - 1) // BLOCK):
        k0 = b * BLOCK
        k1 = min(n, k0 + BLOCK)
        lanes = _block_lanes(seed, k0, k1)
        x = x_bits[k0:k1]
        xk = xk_bits[k0:k1]
        g = g_bits[k0:k1]
        for k in range(k1 - k0):
            m = (lo_minus_1 - np.int32(lanes[k])) >> _SIGN
            xk[k] = x[k] & m
            g[k] = g[k] & m
