"""The AdamW update itself, 32-bit and 8-bit blockwise state: pure functions on flat tensors, apart from the
optimizer's state layout and paging (``adamw.py``).

32-bit state runs torch's own AdamW ops in torch's order (``_single_tensor_adam``, decoupled decay), so parameters
and state match ``torch.optim.AdamW(foreach=False)`` bit for bit on the CPU (fp32 params). The ops are torch's
``_foreach_*`` ops over a list of tensors: on a CPU they run the per-tensor kernels one tensor after another (the
same bits), without a Python-level op per tensor; on CUDA they are torch's multi-tensor kernels, the ones
``torch.optim.AdamW`` uses by default there. A single tensor is a list of one, so every path takes the same kernels.

8-bit state is bitsandbytes' blockwise format (signed dynamic map for m, unsigned for v, one fp32 absmax per
``blocksize`` elements). The update follows bnb's CPU backend (``backends/cpu/ops.py``, 0.50.x): dequantize, AdamW
in fp32 with decoupled decay applied first, requantize with bnb's CPU 65536-bin rule. What differs from
``bnb.optim.AdamW8bit`` on CPU, and why:

* rounding: bnb's torch ops use FMA for ``add_(alpha=)``/``addcmul_`` and torch's CPU ``sqrt`` is not correctly
  rounded (AVX-512 path); ours does every op with one IEEE rounding so the Triton kernel can reproduce it exactly
  on CPU and GPU. m/v then differ from bnb's by <= 1 ulp for ~0.3% of elements before quantization. From an
  identical state one step gives params equal to fp32 rounding, absmax within a few ulp and > 99.9% identical
  codes, the rest on the neighbouring *reachable* code (bnb's CPU rule only emits ~249/246 of the 256 codes).
  Over a free-running sequence an element whose code flipped follows its own, decaying, trajectory: its
  dequantized m/v stay within the largest reachable-code gap (0.0141 / 0.0070 x absmax), and the few such
  params differ by a fraction of one step's update (tests/unit/test_adamw8bit.py);
* non-finite gradients follow bnb's CPU backend: no skipping; the param element becomes NaN, a NaN state value
  gets code 0, absmax ignores NaN but not Inf (an Inf poisons its block). bnb's CUDA kernel instead zeroes m and
  v of non-finite elements and leaves the param unchanged, applies weight decay *after* the update, uses a
  nearest-code search plus a sign fix for m; we do not copy those (device-independent results matter more here,
  and the trainer stops on a NaN loss anyway).

Many tensors at once (:func:`adamw8bit_update_many`): the reference is two dozen tensor ops, and a LoRA model has
hundreds of small state tensors (420 in SmolLM2 with r = 16), so on a CPU a step paid each op's overhead per tensor:
401 ms a step against 122 ms for one tensor of the same 4.9 M elements (AVX2 VM, docs/speed.md). The tensors'
blocks are laid end to end, each tensor padded to whole blocks with values that stay exactly zero through the
update, and updated by one call: every block sees the values it would alone, so the bits are those of one call
per tensor (tests/unit/test_adamw_math.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlora_pipeline.kernels.dynamic_map import (
    bin_to_code_table,
    create_dynamic_map,
    dequantize_blockwise,
    requantize_blockwise,
)
from qlora_pipeline.kernels.optim import adamw8bit_cpu
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars

BATCH_ELEMENTS = 2**19
"""Elements the optimizer updates in one call of the functions below (several small tensors together; a larger
tensor alone): enough that per-op overhead no longer shows, few enough that the 8-bit path's temporaries stay a few
MB each. SmolLM2's 420 LoRA tensors with 8-bit state, AVX2 VM: 185 / 163 / 172 / 159 / 235 ms a step for 2^18 /
2^19 / 2^20 / 2^21 / 2^23 elements a call (one tensor at a time: 401 ms)."""
UPDATE_BYTES_PER_ELEMENT = {32: 4, 8: 56}
"""Peak bytes of temporaries per element of one call, by state width: 32-bit, the square roots of v; 8-bit, the
laid-out copies and the torch reference's fp32 and index temporaries (53-62 counted by
stages/contract/memory_track.py on a CPU; the Triton kernel needs only the copies; the compiled CPU kernel, none:
it updates each tensor where it lies). The memory plan counts them (``TrainShape.compiled_update``)."""


# ---- 32-bit --------------------------------------------------------------------------------------------------
def adamw32_update_many(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """torch's ``_single_tensor_adam`` (decoupled decay) op for op, over lists of tensors that share the step and
    the hyperparameters; fp32 state also for bf16/fp16 params (those are updated in an fp32 copy, rounded once)."""
    beta1, beta2 = betas
    work = [p if p.dtype == torch.float32 else p.float() for p in params]
    grad = [g if g.dtype == torch.float32 else g.float() for g in grads]
    m, v = list(exp_avgs), list(exp_avg_sqs)
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_lerp_(m, grad, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bias_correction2**0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(work, m, denom, value=-step_size)
    for w, p in zip(work, params, strict=True):
        if w is not p:
            p.copy_(w)


# ---- 8-bit ---------------------------------------------------------------------------------------------------
def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt. torch's CPU fp32 sqrt is not (17% of values differ by 1 ulp on AVX-512)."""
    return x.double().sqrt().float()


def adamw8bit_update_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    q1: torch.Tensor,
    q2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    lut1: torch.Tensor,
    lut2: torch.Tensor,
    s: AdamScalars,
    blocksize: int,
) -> None:
    """Torch reference of the 8-bit step (in place, flat tensors); the Triton kernel is bit-identical to it.
    Every op is a separate IEEE fp32 op with scalars rounded to fp32, in bnb's CPU order."""
    g32 = g.float()
    m = dequantize_blockwise(q1, absmax1, code1, blocksize)
    v = dequantize_blockwise(q2, absmax2, code2, blocksize)
    m = m * s.beta1 + g32 * s.one_minus_beta1
    v = v * s.beta2 + (g32 * g32) * s.one_minus_beta2
    denom = _sqrt_rn(v) / s.bias_correction2_sqrt + s.eps
    p32 = p.float()
    if s.apply_decay:
        p32 = p32 * s.decay
    p32 = p32 + (m * s.neg_step_size) / denom
    p.copy_(p32)
    for x, q, a, lut in ((m, q1, absmax1, lut1), (v, q2, absmax2, lut2)):
        nq, na = requantize_blockwise(x, lut, blocksize)
        q.copy_(nq)
        a.copy_(na)


@dataclass(frozen=True)
class QuantMaps:
    """Signed map + bin table for m, unsigned map + bin table for v (``dynamic_map.bin_to_code_table``), on one
    device, and the code of 0.0 in each map. The tables are passed to the Triton kernel as plain tensors, so both
    paths share the exact rule."""

    code1: torch.Tensor
    code2: torch.Tensor
    lut1: torch.Tensor
    lut2: torch.Tensor
    zero1: int
    zero2: int

    @classmethod
    def create(cls, device: torch.device | str = "cpu") -> QuantMaps:
        c1, c2 = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
        zeros = (int((c == 0).nonzero()[0]) for c in (c1, c2))  # both dynamic maps hold 0.0 exactly
        # copies: the bin tables are cached and shared inside dynamic_map
        tables = (t.to(device, copy=True) for t in (c1, c2, bin_to_code_table(c1), bin_to_code_table(c2)))
        return cls(*tables, *zeros)


@dataclass(frozen=True)
class State8bit:
    """One tensor's flat param, gradient and 8-bit state (codes and absmax of m and v), updated in place."""

    p: torch.Tensor
    g: torch.Tensor
    q1: torch.Tensor
    q2: torch.Tensor
    absmax1: torch.Tensor
    absmax2: torch.Tensor


def adamw8bit_update(st: State8bit, maps: QuantMaps, s: AdamScalars, blocksize: int) -> None:
    """Triton kernel for CUDA tensors, the compiled CPU kernel where it is in use and takes them, the torch
    reference otherwise (the same bits every way)."""
    if adamw8bit_cpu.update_many([st], maps, s, blocksize):
        return
    if st.p.is_cuda:
        # lazy: a CPU-only process never imports Triton
        from qlora_pipeline.kernels.optim.adam8bit_triton import adamw8bit_update_triton as impl
    else:
        impl = adamw8bit_update_reference
    tables = (maps.code1, maps.code2, maps.lut1, maps.lut2)
    impl(st.p, st.g, st.q1, st.q2, st.absmax1, st.absmax2, *tables, s, blocksize)


def adamw8bit_update_many(states: Sequence[State8bit], maps: QuantMaps, s: AdamScalars, blocksize: int) -> None:
    """:func:`adamw8bit_update` of every tensor in `states` (same step, hyperparameters, dtypes and device) in one
    call: each tensor's blocks laid end to end, its last block padded with a zero param, a zero gradient and the
    codes of 0.0, which stay exactly 0 through the update (m = 0·β1 + 0, v likewise, p = 0 + 0/eps) and so leave
    every block's absmax as it is alone. The compiled CPU kernel needs no laying out: it takes each tensor where it
    lies."""
    if adamw8bit_cpu.update_many(states, maps, s, blocksize):
        return
    if len(states) == 1:
        adamw8bit_update(states[0], maps, s, blocksize)
        return
    sizes = [st.p.numel() for st in states]
    blocks = [-(-n // blocksize) for n in sizes]
    pads = [b * blocksize - n for b, n in zip(blocks, sizes, strict=True)]

    def laid_out(values: list[torch.Tensor], pad_value: int) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for t, pad in zip(values, pads, strict=True):
            parts.append(t)
            if pad:
                parts.append(t.new_full((pad,), pad_value))
        return torch.cat(parts)

    p = laid_out([st.p for st in states], 0)
    g = laid_out([st.g for st in states], 0)
    q1 = laid_out([st.q1 for st in states], maps.zero1)
    q2 = laid_out([st.q2 for st in states], maps.zero2)
    absmax1 = torch.cat([st.absmax1 for st in states])
    absmax2 = torch.cat([st.absmax2 for st in states])
    adamw8bit_update(State8bit(p, g, q1, q2, absmax1, absmax2), maps, s, blocksize)
    for laid, field in ((p, "p"), (q1, "q1"), (q2, "q2")):
        parts = [part[:n] for part, n in zip(laid.split([b * blocksize for b in blocks]), sizes, strict=True)]
        torch._foreach_copy_([getattr(st, field) for st in states], parts)
    for laid, field in ((absmax1, "absmax1"), (absmax2, "absmax2")):
        torch._foreach_copy_([getattr(st, field) for st in states], list(laid.split(blocks)))
