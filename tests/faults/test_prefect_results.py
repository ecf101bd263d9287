"""No pickle on the load path: the flow persists no Prefect result, so a pickle planted where Prefect keeps results
is never loaded, and a second run still reuses the artifact on disk."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from tests import tiny

pytestmark = pytest.mark.slow


class _Bomb:
    """Unpickling it writes a marker file (what a hostile payload would do with os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_planted_pickle_in_the_results_folder_is_never_loaded(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from qlora_pipeline.pipelines.flow import qlora_pipeline

    model = tiny.make_model_dir(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.qa_rows(20))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny.params_for(tmp_path, model, data)))
    results = tmp_path / "prefect-results"
    marker = tmp_path / "marker"
    results.mkdir()
    (results / "prepare-planted").write_bytes(pickle.dumps(_Bomb(marker)))
    with prefect_test_harness(server_startup_timeout=120), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        first = qlora_pipeline(str(params), stages=["prepare"])
        second = qlora_pipeline(str(params), stages=["prepare"])
    assert first["prepare"]["created_at"] == second["prepare"]["created_at"], "reused, not re-run"
    assert sorted(p.name for p in results.iterdir()) == ["prepare-planted"], "nothing persisted"
    assert not marker.exists(), "the planted pickle was never loaded"
