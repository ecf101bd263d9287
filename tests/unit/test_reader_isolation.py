"""A GGUF reader that crashes, hangs or is missing costs one line and exit 2, never the pipeline or pytest.

The stand-in reader (tests/fake_reader, put on the child's PYTHONPATH) kills itself with SIGSEGV as an AMX build
does on a CPU whose OS did not grant tile state, or sleeps forever, or fails to load its library. It is only ever
seen by child processes: this test process never imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qlora_pipeline.stages import export, merge, prepare, quantize, train
from qlora_pipeline.stages.contract.isolation import Reader, ReaderFailed, call_reader
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from tests import tiny

FAKE = REPO_ROOT / "tests" / "fake_reader"
READER = Reader(name="the stand-in reader", fix="fix it")


def _echo(payload: dict) -> dict:
    """A child target that works: JSON in, JSON and a numpy array out."""
    return {"x": payload["x"] * 2, "arr": np.arange(payload["x"], dtype=np.float32)}


def _fake_env(mode: str) -> dict[str, str]:
    return {"PYTHONPATH": str(FAKE), "QLORA_FAKE_READER": mode}


def test_child_result_and_arrays_come_back() -> None:
    out = call_reader(READER, "tests.unit.test_reader_isolation:_echo", {"x": 3}, "nothing", timeout_s=120)
    assert out["x"] == 6
    assert np.array_equal(out["arr"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("segv", "crashed with SIGSEGV while reading model.gguf"),
        ("importerror", "is not installed (ImportError: libllama.so: cannot open shared object file"),
    ],
)
def test_crash_and_missing_reader_are_one_line(mode: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_pipeline.stages.lm.llama_reader import gguf_reply_loss

    for k, v in _fake_env(mode).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ReaderFailed) as exc:
        gguf_reply_loss(Path("model.gguf"), [([1, 2, 3], [-100, 2, 3])], timeout_s=120)
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg
    assert "llama.cpp (llama-cpp-python)" in msg and "export.score_gguf: false" in msg


def test_a_hanging_reader_is_killed_at_its_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_pipeline.stages.lm.llama_reader import gguf_reply_loss

    for k, v in _fake_env("hang").items():
        monkeypatch.setenv(k, v)
    t0 = time.perf_counter()
    with pytest.raises(ReaderFailed, match=r"did not finish reading model\.gguf within 3 s \(killed\)"):
        gguf_reply_loss(Path("model.gguf"), [([1, 2, 3], [-100, 2, 3])], timeout_s=3)
    assert time.perf_counter() - t0 < 60
    left = subprocess.run(["pgrep", "-f", "qlora_pipeline.stages.contract.isolation"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the killed reader's process group is gone"


# ------------------------------------------------------------------------------------------ through the stages


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny pipeline up to merge; export is what the tests below run."""
    tmp = tmp_path_factory.mktemp("isolation")
    model = tiny.make_model_dir(tmp / "base", "llama")
    data = tiny.write_jsonl(tmp / "data" / "pairs.jsonl", tiny.qa_rows(40))
    raw = tiny.params_for(
        tmp,
        model,
        data,
        train={"batch_size": 4, "max_steps": 2, "lora_r": 4, "lora_alpha": 8},
        export={"gguf_types": ["F16"], "gptq": False},
    )
    params = parse_params(raw)
    for stage in (prepare, quantize, train, merge):
        stage.run(params)
    return tmp, raw


def _cli_stage(stage: str, raw: dict, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`qlora stage STAGE -p params.yaml` in a fresh process, with the stand-in reader for its children."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipeline.pipelines.cli", "stage", stage, "-p", str(params_file)],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _no_export_left(tmp: Path) -> None:
    root = tmp / "artifacts"
    assert not (root / "export").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".export")], "no temporary export dir left"


def test_cli_export_with_a_segfaulting_reader_is_one_line_exit_2(merged, tmp_path: Path) -> None:
    tmp, raw = merged
    proc = _cli_stage("export", raw, tmp_path, _fake_env("segv"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "crashed with SIGSEGV while reading" in errors[0] and "gguf/model-F16.gguf" in errors[0]
    _no_export_left(tmp)


def test_export_with_a_hanging_reader_stops_at_the_limit_and_leaves_nothing(
    merged, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, raw = merged
    for k, v in _fake_env("hang").items():
        monkeypatch.setenv(k, v)
    params = parse_params({**raw, "export": {**raw["export"], "reader_timeout_s": 3}})
    with pytest.raises(ReaderFailed, match="within 3 s"):
        export.run(params)
    _no_export_left(tmp)


def test_scoring_switched_off_says_not_scored_and_never_starts_the_reader(
    merged, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, raw = merged
    for k, v in _fake_env("segv").items():  # would crash if it were started
        monkeypatch.setenv(k, v)
    params = parse_params({**raw, "export": {**raw["export"], "score_gguf": False}})
    m = export.run(params)
    assert m.metrics["gguf_scored"] is False
    assert m.metrics["formats"]["gguf_F16"]["loss"] is None
    assert m.metrics["formats"]["merged_bf16"]["loss"] > 0
    report = (tmp / "artifacts" / "export" / "export_report.md").read_text()
    assert "| GGUF F16 |" in report and "| not scored | not scored |" in report
    assert "export.score_gguf is false" in report
    row = json.loads((tmp / "artifacts" / "export" / "export_report.json").read_text())["rows"][1]
    assert row["scored_by"] == "not scored"


def test_prepare_refuses_a_crashing_reader_before_any_work(merged, tmp_path: Path) -> None:
    """The smoke load at prepare catches the reader that would crash at export, before training."""
    _, raw = merged
    raw = {**raw, "tracking": {**raw["tracking"], "artifacts_dir": str(tmp_path / "artifacts")}}
    proc = _cli_stage("prepare", raw, tmp_path, {**_fake_env("segv"), "QLORA_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "crashed with SIGSEGV" in errors[0] and "SmolLM2" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "artifacts" / "prepare").exists()
