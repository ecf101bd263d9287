"""GGML K-quants (Q4_K, Q5_K, Q6_K) in numpy, written to reproduce llama.cpp's reference quantizers byte for byte.

Why our own code: the `gguf` wheel only *decodes* K-quants (its `quantize` raises NotImplementedError for them), and
llama.cpp's `llama-quantize` is a C tool we do not ship. Q4_K_M is still the format people expect to download, so we
implement the three block formats it needs (Q5_K only for a fused `attn_qkv`, Phi-3's).

What "reference" means here: without an importance matrix, `llama_model_quantize` calls `quantize_q4_K` /
`quantize_q6_K` (and `quantize_q5_K`) with `quant_weights == NULL`, which go straight to `quantize_row_q4_K_ref` /
`quantize_row_q5_K_ref` / `quantize_row_q6_K_ref` in `ggml/src/ggml-quants.c` (the `make_qkx2_quants` min/scale
search for Q4_K and Q5_K, the `make_qx_quants` RMSE search for Q6_K). Those live in ggml-base, which
llama-cpp-python compiles with `-O3 -std=gnu11` and *no* `-march` flag, so the arithmetic is plain IEEE float32, one
rounding per operation, sums accumulated left to right. We mirror exactly that:

* every intermediate is float32 (numpy keeps float32 for float32 ⊗ float32 and for weak Python scalars, NEP 50);
* every sum over the 16 or 32 values of a sub-block uses `np.add.accumulate` along the block, which is sequential
  (`np.sum` would use pairwise summation and round differently);
* `nearest_int` (the 1.5·2²³ magic-number trick) is round-half-to-even of a float32, i.e. `np.rint`;
* fp16 conversions are round-to-nearest-even, which is what both `astype(np.float16)` and ggml's software and F16C
  paths do.

Everything is vectorised across sub-blocks: the search loops (21 candidate scales for Q4_K, 19 for Q6_K) run in Python,
each step a handful of numpy ops over all sub-blocks at once. Rows are processed in chunks to bound memory.

Byte layouts (`ggml-common.h`), per super-block of QK_K = 256 values:

* ``block_q4_K`` (144 bytes): ``d`` fp16, ``dmin`` fp16, ``scales[12]`` (eight 6-bit scales and eight 6-bit mins),
  ``qs[128]`` (4-bit quants; byte ``32*c + l`` holds value ``64*c + l`` in the low nibble and ``64*c + 32 + l`` in the
  high nibble). A value decodes as ``d*sc*q - dmin*m``.
* ``block_q5_K`` (176 bytes): ``d``, ``dmin``, ``scales[12]`` as Q4_K, then ``qh[32]`` (bit ``2c`` of byte ``l`` is
  the fifth bit of value ``64*c + l``, bit ``2c + 1`` that of ``64*c + 32 + l``) and ``qs[128]`` (low 4 bits, as Q4_K).
* ``block_q6_K`` (210 bytes): ``ql[128]`` (low 4 bits), ``qh[64]`` (high 2 bits), ``scales[16]`` int8, ``d`` fp16.
  A value decodes as ``d*scale*(q - 32)``.

The Q4_K_M *mix* (which tensor gets which type) is :mod:`qlora_pipeline.kernels.kquant_mix`.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BLOCK_BYTES = 144
Q5_K_BLOCK_BYTES = 176
Q6_K_BLOCK_BYTES = 210
# GROUP_MAX_EPS in ggml-quants.c: below this absolute max a 16-value group counts as all-zero.
_GROUP_MAX_EPS = np.float32(1e-15)
# Sub-blocks handled per numpy pass; ~16k x 32 float32 temporaries keep peak memory in the tens of MB.
_CHUNK_SUBBLOCKS = 1 << 14

__all__ = [
    "Q4_K_BLOCK_BYTES",
    "Q5_K_BLOCK_BYTES",
    "Q6_K_BLOCK_BYTES",
    "QK_K",
    "quantize_q4_k",
    "quantize_q5_k",
    "quantize_q6_k",
]

_F32 = np.float32


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis, the order a C `for` loop with `+=` uses."""
    return np.add.accumulate(a, axis=-1, dtype=_F32)[..., -1]


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 then back: returns (fp16 storage, its exact float32 value)."""
    h = v.astype(np.float16)
    return h, h.astype(_F32)


def _check_input(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} expects a 2-D (rows, cols) array, got shape {x.shape}")
    if x.shape[1] % QK_K != 0:
        raise ValueError(
            f"{name} needs cols to be a multiple of {QK_K} (K-quant super-block), got cols={x.shape[1]}; "
            "llama.cpp falls back to Q5_0/Q8_0 for such tensors (see q4_k_m_type_for)"
        )
    x = np.ascontiguousarray(x, dtype=_F32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: input contains NaN or Inf; refusing to quantize a broken tensor")
    return x


# --------------------------------------------------------------------------------------------------------------------
# Q4_K
# --------------------------------------------------------------------------------------------------------------------


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised `make_qkx2_quants` (use_mad=false) over rows of x: returns (scale, the_min, L).

    Fits x ≈ scale*L + min with L in [0, nmax] and min <= 0, minimising the weighted squared error over a small
    grid of candidate inverse scales; each candidate's (scale, min) is the weighted least-squares solution.
    Note the C code updates `min` inside the search loop, so later candidates start from the best min found so far;
    per-row arrays reproduce that.
    """
    nmax_f = _F32(nmax)
    xmin = np.minimum(x.min(axis=1), _F32(0))  # `if (min > 0) min = 0`
    xmax = x.max(axis=1)
    sum_w = _seq_sum(w)
    # sum_x starts as w[0]*x[0] then accumulates w[i]*x[i]: the same left-to-right order as _seq_sum of w*x.
    sum_x = _seq_sum(w * x)

    degenerate = xmax == xmin
    rng = np.where(degenerate, _F32(1), xmax - xmin)
    mn = xmin.copy()

    iscale = nmax_f / rng
    scale = _F32(1) / iscale
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(_F32)
    diff = (scale[:, None] * L + mn[:, None]) - x
    best_error = _seq_sum(w * (diff * diff))

    rmin_f, rdelta_f = _F32(rmin), _F32(rdelta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            num = (rmin_f + rdelta_f * _F32(step)) + nmax_f
            iscale = num / np.where(degenerate, _F32(1), xmax - mn)
            laux = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(_F32)
            wl = w * laux
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * laux)
            sum_xl = _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            d2 = (this_scale[:, None] * laux + this_min[:, None]) - x
            cur_error = _seq_sum(w * (d2 * d2))
            upd = ok & (cur_error < best_error) & ~degenerate
            if upd.any():
                L[upd] = laux[upd]
                best_error = np.where(upd, cur_error, best_error)
                scale = np.where(upd, this_scale, scale)
                mn = np.where(upd, this_min, mn)

    scale = np.where(degenerate, _F32(0), scale).astype(_F32)
    L[degenerate] = 0
    return scale, (-mn).astype(_F32), L


_K_MIN_PARAMS = {4: (15, -1.0, 0.1, 20, Q4_K_BLOCK_BYTES), 5: (31, -0.5, 0.1, 15, Q5_K_BLOCK_BYTES)}
"""bits -> (nmax, rmin, rdelta, nstep, block bytes): the `make_qkx2_quants` search of quantize_row_q4_K_ref and
quantize_row_q5_K_ref, which differ in nothing else before the bit packing."""


def _quantize_k_min_blocks(xb: np.ndarray, bits: int) -> np.ndarray:
    """xb: (nb, 256) float32 super-blocks -> (nb, 144) Q4_K or (nb, 176) Q5_K uint8, as quantize_row_q{4,5}_K_ref."""
    nmax, rmin, rdelta, nstep, nbytes = _K_MIN_PARAMS[bits]
    nb = xb.shape[0]
    xs = xb.reshape(nb * 8, 32)
    av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
    weights = av_x[:, None] + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 8, 32)

    # `if (scale > max_scale)` starting from 0 == max(0, max(scales)).
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    # `uint8_t ls = nearest_int(...)` wraps modulo 256 before MIN(63, ls).
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)

    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4]
    packed[:, 4:8] = lm[:, 0:4]
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:8] >> 4) << 6

    d16, d32 = _fp16_round(max_scale / _F32(63))
    dmin16, dmin32 = _fp16_round(max_min / _F32(63))

    # Requantize against the scales that were actually stored (6-bit, fp16 super-scale).
    d = d32[:, None] * ls.astype(_F32)
    dm = dmin32[:, None] * lm.astype(_F32)
    keep = d == 0  # `if (!d) continue;` keeps the L from the search
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(np.rint((xb.reshape(nb, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    L = np.where(keep[:, :, None], L, lq).astype(np.uint8).reshape(nb, 4, 2, 32)

    out = np.empty((nb, nbytes), dtype=np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    out[:, 4:16] = packed
    low = L & 0xF
    if bits == 5:  # qh[32]: bit 2c of byte l is the 5th bit of value 64c + l, bit 2c + 1 that of value 64c + 32 + l
        high = (L >> 4).astype(np.uint8)  # (nb, 4 chunks, 2 halves, 32)
        shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None, None] + np.arange(2, dtype=np.uint8)[
            None, None, :, None
        ]
        out[:, 16:48] = np.bitwise_or.reduce((high << shifts).reshape(nb, 8, 32), axis=1)
    out[:, nbytes - 128 :] = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _quantize_k_min(x: np.ndarray, bits: int, name: str) -> np.ndarray:
    x = _check_input(x, name)
    rows, cols = x.shape
    nbytes = _K_MIN_PARAMS[bits][4]
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    step = max(1, _CHUNK_SUBBLOCKS // 8)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = _quantize_k_min_blocks(blocks[s : s + step], bits)
    return out.reshape(rows, cols // QK_K * nbytes)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Quantize a (rows, cols) float array to GGML Q4_K; returns uint8 (rows, cols // 256 * 144).

    cols must be a multiple of 256. The result has the byte shape `gguf.GGUFWriter.add_tensor(..., raw_dtype=Q4_K)`
    and `gguf.quants.dequantize(..., Q4_K)` expect.
    """
    return _quantize_k_min(x, 4, "quantize_q4_k")


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Quantize a (rows, cols) float array to GGML Q5_K; returns uint8 (rows, cols // 256 * 176). As Q4_K with
    5-bit values: the fifth bits in `qh`, the search over 31 levels (what Q4_K_M gives a fused `attn_qkv`)."""
    return _quantize_k_min(x, 5, "quantize_q5_k")


# --------------------------------------------------------------------------------------------------------------------
# Q6_K
# --------------------------------------------------------------------------------------------------------------------


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`: returns (scale, L with L in [0, 2*nmax)).

    Symmetric fit x ≈ scale*(L - nmax) weighted by x², trying 19 inverse scales around -nmax/max and keeping the one
    with the best weighted least-squares score sumlx²/suml2.
    """
    n = x.shape[0]
    idx = np.argmax(np.abs(x), axis=1)  # first index of the largest |x|, as the strict `>` scan
    vmax = x[np.arange(n), idx]
    amax = np.abs(vmax)
    zero = amax < _GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1), vmax)
    nmax_f = _F32(nmax)
    w = x * x
    wx = w * x

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(_F32)

    iscale = _F32(-nmax) / safe_max
    lv = levels(iscale)
    L = lv + nmax_f
    sumlx = _seq_sum(wx * lv)
    suml2 = _seq_sum((w * lv) * lv)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(nmax_f + _F32(0.1) * _F32(step)) / safe_max
            lv = levels(iscale)
            sumlx = _seq_sum(wx * lv)
            suml2 = _seq_sum((w * lv) * lv)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2) & ~zero
            if upd.any():
                L[upd] = lv[upd] + nmax_f
                scale = np.where(upd, sumlx / suml2, scale)
                best = np.where(upd, scale * sumlx, best)
    scale = np.where(zero, _F32(0), scale).astype(_F32)
    L[zero] = 0
    return scale, L


def _quantize_q6_k_blocks(xb: np.ndarray) -> np.ndarray:
    """xb: (nb, 256) float32 super-blocks -> (nb, 210) uint8, as quantize_row_q6_K_ref."""
    nb = xb.shape[0]
    scales, L = _make_qx_quants_rmse1(xb.reshape(nb * 16, 16), 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)

    # max by |scale| with a strict `>` scan: the first sub-block reaching the largest magnitude wins.
    arg = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nb), arg]
    zero_block = np.abs(max_scale) < _GROUP_MAX_EPS
    safe = np.where(zero_block, _F32(1), max_scale)
    iscale = _F32(-128) / safe
    d16, d32 = _fp16_round(_F32(1) / iscale)
    sc = np.minimum(np.rint(iscale[:, None] * scales).astype(np.int64), 127)
    sc8 = (sc & 0xFF).astype(np.uint8).view(np.int8)

    d = d32[:, None] * sc8.astype(_F32)
    keep = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(np.rint(xb.reshape(nb, 16, 16) / d[:, :, None]), -32, 31) + _F32(32)
    L = np.where(keep[:, :, None], L, lq).astype(np.uint8).reshape(nb, 2, 4, 32)

    # Per 128-value half h: ql[64h + l] = L[q0] | L[q2] << 4, ql[64h + 32 + l] = L[q1] | L[q3] << 4,
    # qh[32h + l] = the four 2-bit high parts, where q_k = L[128h + 32k + l].
    lo = L & 0xF
    hi = L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)

    out = np.empty((nb, Q6_K_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc8.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(nb, 2)
    out[zero_block] = 0  # memset(&y[i], 0, sizeof(block_q6_K))
    return out


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Quantize a (rows, cols) float array to GGML Q6_K; returns uint8 (rows, cols // 256 * 210).

    cols must be a multiple of 256.
    """
    x = _check_input(x, "quantize_q6_k")
    rows, cols = x.shape
    blocks = x.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], Q6_K_BLOCK_BYTES), dtype=np.uint8)
    step = max(1, _CHUNK_SUBBLOCKS // 16)
    for s in range(0, blocks.shape[0], step):
        out[s : s + step] = _quantize_q6_k_blocks(blocks[s : s + step])
    return out.reshape(rows, cols // QK_K * Q6_K_BLOCK_BYTES)
