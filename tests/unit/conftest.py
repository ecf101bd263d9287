from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.make_model_dir(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture
def qa_jsonl(tmp_path: Path) -> Path:
    return tiny.write_jsonl(tmp_path / "data" / "pairs.jsonl", tiny.qa_rows(40))
