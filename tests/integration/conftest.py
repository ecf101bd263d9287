from __future__ import annotations

from pathlib import Path

import pytest

from qlora_pipeline.stages import prepare, quantize
from qlora_pipeline.stages.contract.params import Params, parse_params


@pytest.fixture(scope="session")
def embedded_quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """prepare + quantize on the real embedded default, once per test session."""
    root = tmp_path_factory.mktemp("embedded")
    params = parse_params(
        {"tracking": {"mlflow": False, "artifacts_dir": str(root / "artifacts"), "metrics_dir": str(root / "m")}}
    )
    prepare.run(params)
    quantize.run(params)
    return root / "artifacts", params
