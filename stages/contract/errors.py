"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad input, corrupt artifact).

    The CLI prints the message alone, on one line, and exits with status 2; no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ParamsError(PipelineError):
    """params.yaml does not parse or does not validate."""


class InputError(PipelineError):
    """A stage input (model, dataset, parent artifact) is missing, corrupt or unsupported."""
