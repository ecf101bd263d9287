"""The switch for the compiled CPU kernels (kernels/dropout_native.c, kernels/optim/adamw8bit_native.c), and how
their twins load and check them.

Each kernel family has a torch reference and a compiled twin (kernels/dropout_cpu.py, kernels/optim/adamw8bit_cpu.py)
that stages/contract/cpu_kernels.py builds for this CPU, probes in a child process and hands over; this is the one
place that says whether a process may use them at all, and the one way a twin takes a library into use.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

SWITCH_VAR = "QLORA_CPU_KERNELS"
"""``off`` (or ``0``/``false``/``no``): never use the compiled kernels; the torch references compute the same bits."""


def switched_off() -> bool:
    """Whether `QLORA_CPU_KERNELS` turns the compiled kernels off for this process."""
    return os.environ.get(SWITCH_VAR, "").strip().lower() in {"off", "0", "false", "no"}


def load_checked(
    path: Path, load: Callable[[Path], ctypes.CDLL], self_check: Callable[[ctypes.CDLL], str | None]
) -> tuple[ctypes.CDLL | None, str | None]:
    """`load` the library at `path` and `self_check` it against the torch reference in this process: (the library,
    None) when it may be used, else (None, why not): a check that differed, or a file the loader cannot load or
    that lacks a kernel's symbol."""
    try:
        library = load(path)
        problem = self_check(library)
    except (OSError, AttributeError) as e:
        return None, f"{type(e).__name__}: {e}"
    return (library, None) if problem is None else (None, problem)
