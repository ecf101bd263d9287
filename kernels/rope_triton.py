"""Triton twin of kernels/rope.py: the rotary embedding of q and k together (or of one tensor), forward or
backward, in one launch: the first programs take q's rows, the rest k's.

Each program takes a tile of rows (one head of one token each) and writes ``v·cos ± partner·s``, where the partner
of column c is the other half's column (c ± head_dim/2): forward ``x·cos + rotate_half(x)·sin`` (sin at c, the
first half's partner negated), backward ``g·cos + cat(t₂, -t₁)`` with ``t = g·sin`` (sin at the partner, the
second half's negated). Every product is rounded to the tensor's dtype before the sum, as the reference's torch ops
round it, and the sum is one fp32 add rounded on store; with no contracted multiply-add (``enable_fp_fusion=False``)
and bf16 rounded by integer arithmetic (kernels/triton_bits.py), the twin gives the reference's bits, on CUDA and
under the interpreter (tests/unit/test_rope.py).

Each tensor may be any 4-D view whose last dimension is contiguous (transformers hands q and k over as (batch,
heads, tokens, head_dim) views of (batch, tokens, heads, head_dim) rows); the result is written in that token-major
layout and returned as the same kind of view, so neither direction copies its input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qlora_pipeline.kernels.triton_bits import KIND, bits_view, load_f32, round_bf16, store_f32


@triton.jit
def _rope_tile(
    x_ptr, cos_ptr, sin_ptr, y_ptr, tile, n_rows, heads, tokens, stride_xb, stride_xh, stride_xt, stride_cb,
    head_dim, half, KIND_X: tl.constexpr, BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # token-major: (batch, token, head)
    head = rows % heads
    token = (rows // heads) % tokens
    batch = rows // heads // tokens
    cols = tl.arange(0, BLOCK)[None, :]
    valid = (rows[:, None] < n_rows) & (cols < head_dim)
    first = cols < half
    partner = tl.where(first, cols + half, cols - half)
    x_row = (batch * stride_xb + head * stride_xh + token * stride_xt)[:, None]
    c_row = (batch * stride_cb + token * head_dim)[:, None]
    v = load_f32(x_ptr, x_row + cols, valid, KIND_X)
    v_partner = load_f32(x_ptr, x_row + partner, valid, KIND_X)
    c = load_f32(cos_ptr, c_row + cols, valid, KIND_X)
    if BACKWARD:  # t = g·sin at the partner; the second half takes -t₁
        s = load_f32(sin_ptr, c_row + partner, valid, KIND_X)
        sign = tl.where(first, 1.0, -1.0)
    else:  # rotate_half: the first half takes -x₂
        s = load_f32(sin_ptr, c_row + cols, valid, KIND_X)
        sign = tl.where(first, -1.0, 1.0)
    direct = v * c
    rotated = v_partner * s
    if KIND_X == 1:  # each product in bf16, as torch's ops round it
        direct = round_bf16(direct)
        rotated = round_bf16(rotated)
    out = (rows[:, None] * head_dim) + cols
    store_f32(y_ptr, out, direct + sign * rotated, valid, KIND_X)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, yq_ptr, yk_ptr, q_tiles, q_rows, k_rows, q_heads, k_heads, tokens, stride_qb,
    stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_cb, head_dim, half, KIND_X: tl.constexpr,
    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The first `q_tiles` programs rotate q, the rest k (k_rows 0: q alone)."""
    pid = tl.program_id(0)
    if pid < q_tiles:
        _rope_tile(
            q_ptr, cos_ptr, sin_ptr, yq_ptr, pid, q_rows, q_heads, tokens, stride_qb, stride_qh, stride_qt,
            stride_cb, head_dim, half, KIND_X, BACKWARD, ROWS, BLOCK,
        )  # fmt: skip
    else:
        _rope_tile(
            k_ptr, cos_ptr, sin_ptr, yk_ptr, pid - q_tiles, k_rows, k_heads, tokens, stride_kb, stride_kh,
            stride_kt, stride_cb, head_dim, half, KIND_X, BACKWARD, ROWS, BLOCK,
        )  # fmt: skip


def _launch_shape(n_rows: int, head_dim: int, on_gpu: bool) -> tuple[tuple[int], int, int, int]:
    """(grid, ROWS, BLOCK, num_warps): whole heads in a program's registers, about 4,096 elements a tile on a GPU
    (64 heads of 64, 32 of 128); the interpreter, which pays per program, gets 256 rows a program."""
    block = triton.next_power_of_2(head_dim)
    rows = max(1, 4096 // block) if on_gpu else 256
    rows = min(rows, triton.next_power_of_2(n_rows))
    warps = 4 if rows * block <= 4096 else 8
    return (triton.cdiv(n_rows, rows),), rows, block, warps


def rope_triton(
    xs: tuple[torch.Tensor, ...], cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, ...]:
    """kernels/rope.py ``rope_forward_reference`` (or, with `backward`, ``rope_backward_reference`` with each x an
    output's gradient) of one tensor or two (q and k, which may have different head counts) in one launch. Each x
    (batch, heads, tokens, head_dim), cos and sin (batch or 1, tokens, head_dim), all fp32 or all bf16."""
    if not 1 <= len(xs) <= 2:
        raise ValueError(f"the Triton rotary embedding takes one tensor or two, got {len(xs)}")
    if any(x.dtype not in KIND or x.dtype == torch.float16 or not x.dtype == cos.dtype == sin.dtype for x in xs):
        dtypes = ", ".join(str(t.dtype) for t in (*xs, cos))
        raise ValueError(f"the Triton rotary embedding takes fp32 or bf16 alike, got {dtypes}")
    batch, _, tokens, head_dim = xs[0].shape
    if any(x.shape[0] != batch or x.shape[2:] != (tokens, head_dim) for x in xs):
        raise ValueError(f"q and k differ in batch, tokens or head size: {[tuple(x.shape) for x in xs]}")
    xs = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)
    cos, sin = cos.contiguous(), sin.contiguous()
    ys = tuple(torch.empty((batch, tokens, x.shape[1], head_dim), dtype=x.dtype, device=x.device) for x in xs)
    n_rows = [batch * tokens * x.shape[1] for x in xs]
    _, rows, block, warps = _launch_shape(max(n_rows), head_dim, xs[0].is_cuda)
    tiles = [triton.cdiv(n, rows) for n in n_rows]
    (q, k), (yq, yk) = (xs * 2)[:2], (ys * 2)[:2]  # q alone: k is q again, with no rows of its own
    k_rows = n_rows[1] if len(xs) == 2 else 0
    _rope_kernel[(sum(tiles),)](
        bits_view(q), bits_view(k), bits_view(cos), bits_view(sin), bits_view(yq), bits_view(yk), tiles[0],
        n_rows[0], k_rows, q.shape[1], k.shape[1], tokens, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), 0 if cos.shape[0] == 1 else tokens * head_dim, head_dim, head_dim // 2,
        KIND_X=KIND[q.dtype], BACKWARD=backward, ROWS=rows, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return tuple(y.transpose(1, 2) for y in ys)
