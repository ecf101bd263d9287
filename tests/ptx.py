"""Compile a Triton kernel to PTX without a GPU: the compiler, not the interpreter, in a child process.

The tests run under ``TRITON_INTERPRET=1`` (conftest), which replaces compilation; a child started without it can
still compile for a target it names (``GPUTarget("cuda", 90, 32)``), and what the PTX holds (no FMA where the
launch turns fusion off, IEEE-rounded division) is what the bit-exactness of a kernel rests on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe_counts(code: str, timeout_s: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Run `code` (it prints one line a compiled variant: two words naming it, then counts) in a child without the
    interpreter; the counts by variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0, res.stderr[-2000:]
    return {tuple(line.split()[:2]): tuple(map(int, line.split()[2:])) for line in res.stdout.strip().splitlines()}
