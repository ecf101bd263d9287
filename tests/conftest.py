"""Test-wide settings.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
test modules import kernels. Prefect, MLflow and DVC are kept offline and quiet.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def interrupt_training(monkeypatch: pytest.MonkeyPatch):
    """`interrupt_training(params, step)`: run the train stage and interrupt it (KeyboardInterrupt, in this process)
    as 0-based `step` begins; the stage's own code is restored afterwards."""
    from qlora_pipeline.stages import train

    def run(params, step: int) -> None:
        real_lr_at = train.lr_at

        def lr_at(s, t, total):
            if s == step:
                raise KeyboardInterrupt("killed")
            return real_lr_at(s, t, total)

        monkeypatch.setattr(train, "lr_at", lr_at)
        try:
            with pytest.raises(KeyboardInterrupt):
                train.run(params)
        finally:
            monkeypatch.setattr(train, "lr_at", real_lr_at)

    return run
