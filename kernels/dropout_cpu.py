"""The CPU's dropout masks in one compiled pass: the twin of kernels/dropout.py's torch reference.

Why: the reference builds a mask in about seventeen whole-buffer tensor passes (the counter, splitmix64's shifts,
masks, xors and multiplies over int64 words, then the lanes' clamp, shift and widening to the mask's dtype), and
on the 2-core AVX2 VM those passes and the multiplies that applied the mask were 8 % of a padded training step
(bench/results/profile_step-avx2-fp32-padded-before.txt). kernels/dropout_native.c computes the same function block
by block: each block's splitmix64 words are made in a buffer that stays in cache, and each 16-bit lane is compared
with the threshold straight into the result's bits: the 0/1 mask (:func:`keep_mask`), or a tensor with its dropped
elements zeroed (:func:`masked`; :func:`masked_pair_` does a second tensor from the same lanes), so the LoRA branch
never writes or reads a mask. The results are the reference's, bit for bit, for every seed, threshold, size and
dtype (tests/unit/test_dropout_cpu.py); docs/speed.md has the measured step times.

The library is built for this CPU and run in a child process first by stages/contract/cpu_kernels.py, which hands
it to :func:`use_library`; this process then checks it once more against the reference before using it. Until
then, where it could not be built or failed a check, or with ``QLORA_CPU_KERNELS=off``, these functions return None
and the caller uses the torch reference: the same values, only slower. Loaded through ctypes, the library adds
about nothing to the process's memory (a JIT compiler such as numba added 130 MB of peak RSS: docs/speed.md).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from qlora_pipeline.kernels.cpu_native import load_checked, switched_off

_WIDTHS = {
    torch.float32: (torch.int32, ctypes.c_int32, "32", 0x3F800000),
    torch.bfloat16: (torch.int16, ctypes.c_int16, "16", 0x3F80),
    torch.float16: (torch.int16, ctypes.c_int16, "16", 0x3C00),
}
"""Each supported dtype: the integer view the kernels work on, its ctypes type, the functions' suffix, 1.0's bits."""

_library: ctypes.CDLL | None = None


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for suffix, scalar in (("32", ctypes.c_int32), ("16", ctypes.c_int16)):
        args = [ctypes.c_uint64, ctypes.c_int32]
        getattr(library, f"qlora_keep_bits_{suffix}").argtypes = [*args, scalar, ctypes.c_void_p, ctypes.c_int64]
        getattr(library, f"qlora_masked_bits_{suffix}").argtypes = [*args, *[ctypes.c_void_p] * 2, ctypes.c_int64]
        getattr(library, f"qlora_masked_pair_bits_{suffix}").argtypes = [*args, *[ctypes.c_void_p] * 3, ctypes.c_int64]
    return library


def use_library(path: Path) -> str | None:
    """Load the built kernels and check them against the reference in this process: None when they are in use from
    now on, else why not (the reference stays in use)."""
    global _library
    _library, problem = load_checked(path, _load, _self_check)
    return problem


def _ready(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, if they are in use and can take these tensors (contiguous, on the CPU, a supported dtype)."""
    if _library is None or switched_off():
        return None
    if any(t.dtype not in _WIDTHS or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    return _library


def _args(seed: int, threshold: int) -> tuple[int, int]:
    """The kernels' seed (its 64 bits, unsigned) and ``t - 1`` for the lane threshold t = threshold - 32768."""
    return seed % 2**64, threshold - 32768 - 1


def keep_mask(seed: int, threshold: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The 0/1 mask ``reference_keep_mask`` (kernels/dropout.py) returns for these arguments, or None where the
    kernels are not in use (the caller then calls the reference). `threshold` is the drop threshold in 1/65536ths:
    an element is kept when its signed 16-bit lane is at or above ``threshold - 32768``."""
    library = _ready(torch.empty(0, dtype=dtype))
    if library is None:
        return None
    out = torch.empty(shape, dtype=dtype)
    _run(library, "keep_bits", seed, threshold, out)
    return out


def masked(seed: int, threshold: int, x: torch.Tensor) -> torch.Tensor | None:
    """`x` times that mask (a new tensor; dropped elements +0.0), or None where the kernels are not in use."""
    library = _ready(x)
    if library is None:
        return None
    out = torch.empty_like(x)
    _run(library, "masked_bits", seed, threshold, x, out)
    return out


def masked_pair_(seed: int, threshold: int, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """`x` times that mask (a new tensor) and `grad` times it in place, or None (nothing done) where the kernels are
    not in use. `grad` has x's shape and dtype."""
    if grad.shape != x.shape or grad.dtype != x.dtype:
        raise ValueError(f"grad {tuple(grad.shape)} {grad.dtype} is not x's {tuple(x.shape)} {x.dtype}")
    library = _ready(x, grad)
    if library is None:
        return None
    out = torch.empty_like(x)
    _run(library, "masked_pair_bits", seed, threshold, x, out, grad)
    return out


def _run(library: ctypes.CDLL, what: str, seed: int, threshold: int, *tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    _, scalar, suffix, one = _WIDTHS[dtype]
    head = [*_args(seed, threshold), *([scalar(one)] if what == "keep_bits" else [])]
    getattr(library, f"qlora_{what}_{suffix}")(*head, *(t.data_ptr() for t in tensors), tensors[0].numel())


def _self_check(library: ctypes.CDLL) -> str | None:
    """None if the kernels' results equal the reference's here (odd sizes, both bit widths), else what differed.
    Its random inputs come from a generator of its own: checking must not move the training's random stream."""
    from qlora_pipeline.kernels.dropout import reference_keep_mask

    generator = torch.Generator().manual_seed(0)
    for n, seed, threshold in ((1, 0, 3277), (4099, -(2**63), 3277), (2 * 8192 + 5, 2**63 - 1, 32768)):
        for dtype in (torch.float32, torch.bfloat16):
            shape = torch.Size([n])
            want = reference_keep_mask(seed, threshold, shape, dtype)
            x, grad = (torch.randn(shape, generator=generator).to(dtype) for _ in range(2))
            mask, xk, xk2, grad_k = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), grad.clone()
            _run(library, "keep_bits", seed, threshold, mask)
            _run(library, "masked_bits", seed, threshold, x, xk)
            _run(library, "masked_pair_bits", seed, threshold, x, xk2, grad_k)
            same = torch.equal(mask, want) and torch.equal(xk, x * want) and torch.equal(xk2, xk)
            if not (same and torch.equal(grad_k, grad * want)):
                return f"{n} {dtype} elements, threshold {threshold}: the compiled kernels differ from the reference"
    return None


def compiled_in_use() -> bool:
    """Whether this process's CPU masks come from the compiled kernels."""
    return _library is not None and not switched_off()
