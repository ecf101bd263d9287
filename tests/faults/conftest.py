from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A params.yaml for a tiny model and dataset, every output under tmp_path."""
    import yaml

    model = tiny.make_model_dir(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "data" / "pairs.jsonl", tiny.qa_rows(40))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny.params_for(tmp_path, model, data)))
    return params


@pytest.fixture(scope="session")
def tiny_llama_dir_for_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama")
