"""The switch for the compiled CPU kernels (kernels/dropout_native.c, kernels/optim/adamw8bit_native.c).

Each kernel family has a torch reference and a compiled twin (kernels/dropout_cpu.py, kernels/optim/adamw8bit_cpu.py)
that stages/contract/cpu_kernels.py builds for this CPU, probes in a child process and hands over; this is the one
place that says whether a process may use them at all.
"""

from __future__ import annotations

import os

SWITCH_VAR = "QLORA_CPU_KERNELS"
"""``off`` (or ``0``/``false``/``no``): never use the compiled kernels; the torch references compute the same bits."""


def switched_off() -> bool:
    """Whether `QLORA_CPU_KERNELS` turns the compiled kernels off for this process."""
    return os.environ.get(SWITCH_VAR, "").strip().lower() in {"off", "0", "false", "no"}
