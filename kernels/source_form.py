"""Whether a function's source holds given lines: how the training patches (kernels/slim_activations.py,
kernels/rope.py) tell that a transformers class or function computes in the form their exact replacement relies on,
so another family or transformers version keeps its own code."""

from __future__ import annotations

import inspect
from typing import Any


def source_has(obj: Any, lines: tuple[str, ...]) -> bool:
    """True when `obj`'s source text contains every one of `lines`; False when it has no readable source."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    return all(line in source for line in lines)
