"""8-bit AdamW on a CPU in one compiled pass a block: the twin of adamw_math.py's torch reference.

Why: the reference is about two dozen whole-tensor passes (dequantize m and v, the update, requantize both), run
over the optimizer's tensors laid end to end in copies; on the 2-core AVX2 VM SmolLM2's 420 LoRA tensors took
163-175 ms a step with 8-bit state against 33 ms with 32-bit (docs/speed.md). kernels/optim/adamw8bit_native.c
does the same ops per block while the block is in cache, on each tensor where it lies (no copies), with every op
one IEEE rounding in the reference's order: parameters, codes and absmax are the reference's bit for bit
(tests/unit/test_adamw8bit_cpu.py).

As the dropout kernels (kernels/dropout_cpu.py): built for this CPU and probed in a child process by
stages/contract/cpu_kernels.py, checked once more in this process by :func:`use_library`, switched off by
``QLORA_CPU_KERNELS=off`` (kernels/cpu_native.py). Until then, or for tensors it does not take (not fp32, not
contiguous, not on the CPU, blocks over 4,096), :func:`update_many` returns False and the caller runs the reference.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_pipeline.kernels.cpu_native import load_checked, switched_off
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars

if TYPE_CHECKING:
    from qlora_pipeline.kernels.optim.adamw_math import QuantMaps, State8bit

MAX_BLOCK = 4096
"""The largest state block the kernel takes (its per-block buffers live on each thread's stack)."""

_library: ctypes.CDLL | None = None


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    fn = library.qlora_adamw8bit_many_f32
    arrays, tables, scalars = [ctypes.c_void_p] * 7, [ctypes.c_void_p] * 4, [ctypes.c_float] * 7
    # count, p, g, q1, q2, absmax1, absmax2, n; code1, code2, lut1, lut2; blocksize; the scalars; apply_decay; step
    fn.argtypes = [ctypes.c_int64, *arrays, *tables, ctypes.c_int64, *scalars, ctypes.c_int32, ctypes.c_float]
    fn.restype = ctypes.c_int
    return library


def use_library(path: Path) -> str | None:
    """Load the built kernel and check it against the reference in this process: None when it is in use from now
    on, else why not (the reference stays in use)."""
    global _library
    _library, problem = load_checked(path, _load, _self_check)
    return problem


def compiled_in_use() -> bool:
    """Whether this process's 8-bit AdamW steps on a CPU run the compiled kernel."""
    return _library is not None and not switched_off()


def _takes(st: State8bit, blocksize: int) -> bool:
    tensors = (st.p, st.g, st.q1, st.q2, st.absmax1, st.absmax2)
    if not 1 <= blocksize <= MAX_BLOCK or st.p.dtype != torch.float32 or st.g.dtype != torch.float32:
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def update_many(states: Sequence[State8bit], maps: QuantMaps, s: AdamScalars, blocksize: int) -> bool:
    """The 8-bit AdamW step of every tensor in `states`, in place, through the compiled kernel; False (nothing
    done) where it is not in use or does not take one of them."""
    library = _library
    if library is None or switched_off() or not all(_takes(st, blocksize) for st in states):
        return False
    _run(library, states, maps, s, blocksize)
    return True


def _run(library: ctypes.CDLL, states: Sequence[State8bit], maps: QuantMaps, s: AdamScalars, blocksize: int) -> None:
    count = len(states)
    fields = ("p", "g", "q1", "q2", "absmax1", "absmax2")
    arrays = [(ctypes.c_void_p * count)(*(getattr(st, f).data_ptr() for st in states)) for f in fields]
    sizes = (ctypes.c_int64 * count)(*(st.p.numel() for st in states))
    tables = (t.data_ptr() for t in (maps.code1, maps.code2, maps.lut1, maps.lut2))
    scalars = (s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.bias_correction2_sqrt, s.eps, s.decay)
    done = library.qlora_adamw8bit_many_f32(
        count, *arrays, sizes, *tables, blocksize, *scalars, int(s.apply_decay), s.neg_step_size
    )
    if done != 0:
        raise ValueError(f"the compiled 8-bit AdamW kernel refused blocksize {blocksize}")


def _self_check(library: ctypes.CDLL) -> str | None:
    """None if the kernel's parameters, codes and absmax equal the reference's here (several tensors in one call
    and a lone one, ragged tails, a zero block, NaN and Inf gradients, with and without decay), else what differed.
    Its random inputs come from a generator of its own: checking must not move the training's random stream."""
    from qlora_pipeline.kernels.optim.adamw_math import QuantMaps, State8bit, adamw8bit_update_reference

    maps = QuantMaps.create()
    generator = torch.Generator().manual_seed(0)
    tables = (maps.code1, maps.code2, maps.lut1, maps.lut2)
    for sizes, blocksize, decay in (((1, 4099, 2 * 256 + 3), 256, 0.0), ((1, 4099), 256, 0.01), ((197,), 64, 0.1)):
        s = AdamScalars.make(1e-3, (0.9, 0.999), 1e-8, decay, 3)
        want = [_random_state(n, blocksize, maps, generator) for n in sizes]
        got = [State8bit(*(t.clone() for t in st)) for st in want]
        for st in want:
            adamw8bit_update_reference(*st, *tables, s, blocksize)
        _run(library, got, maps, s, blocksize)
        for st_got, st_want in zip(got, want, strict=True):
            fields = (st_got.p, st_got.g, st_got.q1, st_got.q2, st_got.absmax1, st_got.absmax2)
            pairs = zip(fields, st_want, strict=True)
            if not all(_same_bits(a, b) for a, b in pairs):
                n = st_want[0].numel()
                return f"{n} elements in blocks of {blocksize}: the compiled 8-bit AdamW differs from the reference"
    return None


def _random_state(n: int, blocksize: int, maps: QuantMaps, generator: torch.Generator) -> list[torch.Tensor]:
    """p, g (a NaN and an Inf among them where n > 8), codes and absmax of m (its first block all zero) and v."""
    from qlora_pipeline.kernels.dynamic_map import requantize_blockwise

    p = torch.randn(n, generator=generator)
    g = torch.randn(n, generator=generator) * 1e-2
    if n > 8:
        g[3], g[7] = float("nan"), float("inf")
    m = torch.randn(n, generator=generator) * 1e-2
    m[:blocksize] = 0.0
    v = torch.rand(n, generator=generator) * 1e-4
    (q1, a1), (q2, a2) = requantize_blockwise(m, maps.lut1, blocksize), requantize_blockwise(v, maps.lut2, blocksize)
    return [p, g, q1, q2, a1, a2]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, a NaN matching a NaN (its sign bit depends on the instruction that made it)."""
    if a.dtype != torch.float32:
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))
