"""The compiled CPU kernels put in use in a test process as training puts them (built and probed once per machine)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qlora_pipeline.stages.contract import cpu_kernels


def require_compiled(in_use: Callable[[], bool]) -> None:
    """Skip where this machine has no C compiler; otherwise take the kernels into use and assert that the twin
    `in_use` reports is among them (the assertion's message is the line training would log)."""
    if cpu_kernels.compiler() is None:
        pytest.skip("no C compiler on this machine")
    line = cpu_kernels.enable()
    assert in_use(), line
