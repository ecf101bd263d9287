"""The one code path under Prefect, MLflow and DVC: cross-run skipping, tracking, lineage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.pipelines import dvcgen
from qlora_pipeline.stages import prepare
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_harness():
    """One temporary Prefect server for this module's flow tests (starting one takes about 11 s); each test keeps
    its own results folder and its own flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _params_file(tmp_path: Path, model_dir: Path, data: Path, mlflow: bool = False) -> Path:
    raw = tiny.params_for(tmp_path, model_dir, data)
    raw["tracking"]["mlflow"] = mlflow
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_dvc_yaml_is_generated_from_the_registry() -> None:
    assert (REPO / "dvc.yaml").read_text() == dvcgen.render(), (
        "run: python -m qlora_pipeline.pipelines.dvcgen > dvc.yaml"
    )


def test_prepare_logs_params_metrics_and_memory_to_mlflow(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    from mlflow.tracking import MlflowClient

    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)
    raw["tracking"]["mlflow"] = True
    m = prepare.run(parse_params(raw))
    client = MlflowClient(raw["tracking"]["mlflow_uri"])
    exp = client.get_experiment_by_name("qlora")
    assert exp.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == m.mlflow_run_id
    assert run.data.params["data.max_length"] == "256"
    assert run.data.metrics["records_after_dedupe"] == 40
    assert run.data.metrics["splits.train.examples"] == 32
    assert run.data.metrics["memory.peak_rss_mb"] > 50
    assert run.data.metrics["wall_s"] > 0
    assert run.data.tags["git_commit"] == m.code_version["commit"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_skips_unchanged_stage_on_second_run(tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from qlora_pipeline.pipelines.flow import qlora_pipeline

    f = _params_file(tmp_path, tiny_llama_dir, qa_jsonl, mlflow=True)
    calls: list[int] = []
    original = prepare.run
    monkeypatch.setattr(prepare, "run", lambda p, **kw: calls.append(1) or original(p, **kw))
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        first = qlora_pipeline(str(f), stages=["prepare"])
        second_state = qlora_pipeline(str(f), stages=["prepare"], return_state=True)
        second = second_state.result()
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[second_state.state_details.flow_run_id]))
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=flow_run, limit=100, sort=TaskRunSort.ID_DESC)
            states = [tr.state.name for tr in runs]
        # a changed param invalidates the key: the stage runs again
        raw = yaml.safe_load(f.read_text())
        raw["data"]["seed"] = 3
        f.write_text(yaml.safe_dump(raw))
        third = qlora_pipeline(str(f), stages=["prepare"])
    assert calls == [1, 1]
    assert states == ["Completed"], "the second run's prepare task reuses the artifact on disk"
    assert first["prepare"]["created_at"] == second["prepare"]["created_at"]
    assert third["prepare"]["params"]["data"]["seed"] == 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qlora").experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    children = [r for r in runs if r.info.run_name == "prepare"]
    assert len(parents) == 3 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} <= {p.info.run_id for p in parents}


@pytest.mark.slow
def test_dvc_repro_runs_then_skips_then_reruns_on_param_change(tmp_path, tiny_llama_dir, qa_jsonl) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    for d in ("stages", "pipelines", "kernels", "data"):
        shutil.copytree(REPO / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)
    raw["tracking"].update({"artifacts_dir": "artifacts", "metrics_dir": "metrics"})
    raw["data"]["seed"] = 0
    raw = parse_params(raw).model_dump(mode="json")  # every section: dvc.yaml lists them all
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    # As the README runs it: the checkout's .venv/bin/dvc, no venv activated, the venv's bin not on the PATH.
    venv_bin = Path(sys.executable).parent
    (work / ".venv").symlink_to(venv_bin.parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv_bin)
    # The venv's editable install points at this checkout; `qlora_pipeline` links to the copy make it import the
    # copy's code (and so write the copy's artifacts), as a venv installed from the copy would.
    links = tmp_path / "links" / "qlora_pipeline"
    links.mkdir(parents=True)
    for d in ("stages", "pipelines", "kernels"):
        (links / d).symlink_to(work / d, target_is_directory=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path, "VIRTUAL_ENV": "", "PYTHONPATH": str(links.parent)}
    dvc = str(work / ".venv" / "bin" / "dvc")

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    sh("git", "init", "-q")
    (work / ".gitignore").write_text(".venv\n")
    sh(dvc, "init", "-q")
    out1 = sh(dvc, "repro", "prepare")
    assert "Running stage 'prepare'" in out1
    assert (work / "artifacts" / "prepare" / "manifest.json").exists()
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["seed"] == 0
    out2 = sh(dvc, "repro", "prepare")
    assert "Running stage" not in out2 and "didn't change" in out2
    raw["data"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "modified:           data" in sh(dvc, "status")
    assert "Running stage 'prepare'" in sh(dvc, "repro", "prepare")
    metrics = json.loads((work / "metrics" / "prepare.json").read_text())
    assert metrics["metrics"]["splits"]["train"]["examples"] == 32


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_reruns_only_train_and_later_when_a_train_param_changes(
    tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch
) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from qlora_pipeline.pipelines.flow import qlora_pipeline
    from qlora_pipeline.stages import merge, quantize, train

    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl, train={"batch_size": 4, "max_steps": 3, "lora_r": 4})
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    calls: list[str] = []
    for name, module in (("prepare", prepare), ("quantize", quantize), ("train", train), ("merge", merge)):
        original = module.run
        monkeypatch.setattr(module, "run", lambda p, _o=original, _n=name, **kw: calls.append(_n) or _o(p, **kw))
    stages = ["prepare", "quantize", "train", "merge"]
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        qlora_pipeline(str(f), stages=stages)
        assert calls == stages
        calls.clear()
        qlora_pipeline(str(f), stages=stages)
        assert calls == [], "unchanged inputs: nothing re-runs"
        raw["train"]["learning_rate"] = 1e-3
        f.write_text(yaml.safe_dump(raw))
        qlora_pipeline(str(f), stages=stages)
    assert calls == ["train", "merge"]


def _source_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the product's source folders that the code hashes read instead of the checkout."""
    from qlora_pipeline.stages.contract import codedeps

    source = tmp_path / "source"
    for folder in codedeps.FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "SOURCE_ROOT", source)
    return source


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_flow_reruns_a_stage_whose_artifact_code_or_data_changed(
    tmp_path, tiny_llama_dir, qa_jsonl, monkeypatch
) -> None:
    """Tampered artifact → that stage; deleted artifact → it and its children; a changed code file of a stage →
    that stage; new rows in the data → everything from prepare. Nothing changed → nothing."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from qlora_pipeline.pipelines.flow import qlora_pipeline
    from qlora_pipeline.stages import quantize

    # the code is read from a copy of the source folders, so the test can edit a file quantize imports
    source = _source_copy(tmp_path, monkeypatch)
    f = _params_file(tmp_path, tiny_llama_dir, qa_jsonl)
    calls: list[str] = []
    for name, module in (("prepare", prepare), ("quantize", quantize)):
        original = module.run
        monkeypatch.setattr(module, "run", lambda p, _o=original, _n=name, **kw: calls.append(_n) or _o(p, **kw))
    stages = ["prepare", "quantize"]
    art = tmp_path / "artifacts"

    def run() -> list[str]:
        calls.clear()
        qlora_pipeline(str(f), stages=stages)
        return list(calls)

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        assert run() == stages
        assert run() == []
        report = art / "quantize" / "layer_errors.json"
        report.write_text(report.read_text() + " ")
        assert run() == ["quantize"], "tampered artifact"
        shutil.rmtree(art / "prepare")
        assert run() == ["prepare", "quantize"], "deleted artifact, and the child built from it"
        nf4 = source / "kernels" / "nf4.py"  # imported by quantize (through the bnb folder writer), not by prepare
        nf4.write_text(nf4.read_text() + "\n# edited\n")
        assert run() == ["quantize"], "the stage's code changed"
        with qa_jsonl.open("a") as fh:
            fh.write(json.dumps({"instruction": "A brand new question?", "response": "A brand new answer."}) + "\n")
        assert run() == ["prepare", "quantize"], "new data"
        assert run() == []
