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
