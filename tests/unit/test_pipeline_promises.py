"""What the README promises about whole runs, checked on a real `qlora run` of all seven stages on tiny params.

- "Everything runs offline": every process of the run (the CLI, Prefect's server, reader children) refuses any
  connection or name lookup but loopback (tests/guard/sitecustomize.py) and logs attempts; the log stays empty.
- "bitsandbytes and peft are installed as test oracles only; the product never imports them": no process of the
  run has either in sys.modules when it exits.
- "each scored on the test split by a real reader": the F16 GGUF (lossless) is scored by llama.cpp within rounding
  of the merged model's torch loss; GPTQ calibrates on the training split only.
- The CLI: `qlora run`, `qlora run --stage … --force`, `qlora stage`, `qlora check-params`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from qlora_pipeline.pipelines.cli import app
from qlora_pipeline.stages.contract.registry import ORDER
from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from tests import tiny

GUARD = REPO_ROOT / "tests" / "guard"


def _qlora(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.pipelines.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("offline")
    model = tiny.make_model_dir(tmp / "base", "llama")
    data = tiny.write_jsonl(tmp / "data" / "pairs.jsonl", tiny.qa_rows(40))
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(tiny.whole_run_params(tmp, model, data, ["F16"])))
    log = tmp / "guard.log"
    log.touch()
    env = {
        "PYTHONPATH": os.pathsep.join([str(GUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "QLORA_GUARD_LOG": str(log),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "prefect-results"),
    }
    first = _qlora("run", "-p", str(params), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((tmp / "artifacts" / "quantize" / "manifest.json").read_text())
    forced = _qlora("run", "-p", str(params), "--stage", "quantize", "--force", env=env)
    assert forced.returncode == 0, forced.stderr[-3000:]
    return SimpleNamespace(tmp=tmp, params=params, env=env, log=log, first=first, forced=forced, quantize_before=before)


def test_a_whole_run_makes_every_artifact(offline_run) -> None:
    for stage in ORDER:
        assert (offline_run.tmp / "artifacts" / stage / "manifest.json").exists(), stage
    assert len(list((offline_run.tmp / "releases").iterdir())) == 1
    table = offline_run.first.stdout
    assert all(stage in table for stage in ORDER), table


def test_the_run_never_left_the_machine_nor_loaded_bnb_or_peft(offline_run) -> None:
    assert offline_run.log.read_text() == "", offline_run.log.read_text()


def test_the_guard_does_see_network_access_and_oracle_imports(tmp_path: Path) -> None:
    """Negative control: the same guard logs a lookup of a real host and an import of peft."""
    log = tmp_path / "guard.log"
    env = {**os.environ, "PYTHONPATH": str(GUARD), "QLORA_GUARD_LOG": str(log)}
    code = (
        "import urllib.request, peft\n"
        "try:\n urllib.request.urlopen('http://example.com', timeout=5)\n"
        "except OSError: pass"
    )
    subprocess.run([sys.executable, "-c", code], env=env, timeout=300, check=True)
    text = log.read_text()
    assert "resolve example.com" in text and "imported peft" in text, text


def test_force_reruns_exactly_the_named_stage(offline_run) -> None:
    art = offline_run.tmp / "artifacts"
    after = json.loads((art / "quantize" / "manifest.json").read_text())
    assert after["created_at"] > offline_run.quantize_before["created_at"] or after != offline_run.quantize_before
    assert after["outputs"] == offline_run.quantize_before["outputs"], "same inputs, same bytes"
    assert "quantize" in offline_run.forced.stdout and "train" not in offline_run.forced.stdout


def test_gguf_is_scored_by_llama_cpp_and_gptq_calibrates_on_train_only(offline_run) -> None:
    import datasets

    from qlora_pipeline.stages import export

    report = json.loads((offline_run.tmp / "artifacts" / "export" / "export_report.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["gguf_F16"]["scored_by"] == "llama.cpp" and report["gguf_scored"] is True
    # F16 holds the bf16 merged weights exactly; llama.cpp's loss differs from torch's by rounding only
    # (measured 2026-12-03: SmolLM2 2.0507 vs 2.0510; this tiny model within 0.002)
    assert abs(rows["gguf_F16"]["loss"] - rows["merged_bf16"]["loss"]) < 0.01
    data = datasets.load_from_disk(str(offline_run.tmp / "artifacts" / "prepare" / "data"))
    ctx = SimpleNamespace(parent_dir=lambda stage: offline_run.tmp / "artifacts" / stage)
    calib = {tuple(t[0].tolist()) for t in export.calibration_ids(ctx, 10_000)}
    train_rows = {tuple(r) for r in data["train"]["input_ids"]}
    held_out = {tuple(r) for split in ("validation", "test") for r in data[split]["input_ids"]}
    assert calib == train_rows and not calib & held_out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mimalloc is preloaded on Linux only")
def test_the_run_allocated_from_mimalloc_and_trains_the_same_bits_on_the_system_allocator(offline_run) -> None:
    """The CLI runs every stage on mimalloc (stages/contract/host_allocator.py). Which allocator serves memory must
    not change a value: a read of memory nothing wrote would differ between them. Last of the run's tests: it
    retrains."""
    art = offline_run.tmp / "artifacts"
    for stage in ORDER:
        manifest = json.loads((art / stage / "manifest.json").read_text())
        assert manifest["libraries"]["host_allocator"] == "mimalloc", stage
    before = json.loads((art / "train" / "manifest.json").read_text())
    env = {**offline_run.env, "QLORA_HOST_ALLOCATOR": "system"}
    rerun = _qlora("run", "-p", str(offline_run.params), "--stage", "train", "--force", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = json.loads((art / "train" / "manifest.json").read_text())
    assert after["libraries"]["host_allocator"] == "system" and after["created_at"] != before["created_at"]
    adapters = sorted(k for k in before["outputs"] if k.endswith("adapter_model.safetensors"))
    assert adapters and {k: after["outputs"][k] for k in adapters} == {k: before["outputs"][k] for k in adapters}


def test_cli_stage_and_check_params(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)))
    runner = CliRunner()
    ok = runner.invoke(app, ["check-params", "-p", str(params)])
    assert ok.exit_code == 0 and f"{params}: ok" in ok.output
    staged = runner.invoke(app, ["stage", "prepare", "-p", str(params)])
    assert staged.exit_code == 0 and "prepare: done in" in staged.output
    assert (tmp_path / "artifacts" / "prepare" / "manifest.json").exists()
    params.write_text(params.read_text().replace("max_length: 256", "max_length: 8"))
    bad = runner.invoke(app, ["check-params", "-p", str(params)])
    assert bad.exit_code == 2 and "data.max_length = 8 is out of range" in bad.output
    unknown = runner.invoke(app, ["stage", "prepar", "-p", str(params)])
    assert unknown.exit_code == 2 and "unknown stage 'prepar'" in unknown.output


def test_an_unwritable_mlflow_store_never_breaks_a_stage(tmp_path: Path, tiny_llama_dir: Path, qa_jsonl) -> None:
    from qlora_pipeline.stages import prepare
    from qlora_pipeline.stages.contract.params import parse_params

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the MLflow folder would go")
    raw = tiny.params_for(tmp_path, tiny_llama_dir, qa_jsonl)
    raw["tracking"].update({"mlflow": True, "mlflow_uri": f"sqlite:///{blocker / 'mlflow.db'}"})
    m = prepare.run(parse_params(raw))
    assert (tmp_path / "artifacts" / "prepare" / "manifest.json").exists()
    assert m.mlflow_run_id is None
