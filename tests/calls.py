"""Counting the calls a code path makes to a module's function, for tests that must show a kernel really ran."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest


def count_calls(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: MutableMapping[str, int], key: str
) -> None:
    """Replace ``module.name`` (for the test's duration) by a wrapper that adds one to ``calls[key]`` a call."""
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
